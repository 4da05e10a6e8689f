"""Query benchmark: DuckDB over a synthetic cache, and diff, against issue 4's targets.

Writes a synthetic top-32 cache (vocab 49152, sequences of 512 tokens, Zipf-like ids,
sorted random logprobs) of ``--positions`` positions (default 10M) and times, in a fresh
DuckDB connection each:

- a sequence-level filter: ``SELECT count(*) FROM sequences WHERE mean_entropy < 1.5``
  (target < 0.5 s), and its plan (it must read only scalar columns);
- an entropy histogram over all positions:
  ``SELECT floor(entropy * 4) AS b, count(*) FROM tokens GROUP BY b`` (target < 5 s);
- ``logitstore diff`` of two 1M-position caches of the same sequences (target < 30 s);
- a query that decodes every entry list of the 1M-position cache (no target; its cost).

    python tools/bench_query.py [--positions 10000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logitstore as ls  # noqa: E402
from logitstore.diff import diff  # noqa: E402
from logitstore.query import connect  # noqa: E402

V, K, T = 49152, 32, 512


def synthetic(path: Path, positions: int, seed: int, tokens_seed: int = 0) -> None:
    """A cache of ``positions`` positions; ``tokens_seed`` fixes the token sequences (so two caches line up)."""
    rng, trng = np.random.default_rng(seed), np.random.default_rng(tokens_seed)
    n_seq = -(-positions // (T - 1))
    with ls.CacheWriter(path, vocab_size=V, rule=ls.TopK(K)) as w:
        for _ in range(n_seq):
            tok = (trng.zipf(1.3, T) % V).astype(np.int32)
            N = T - 1
            # K distinct ids per position: a Zipf-distributed base plus K distinct offsets (31 * 1531 < V)
            base = rng.zipf(1.2, (N, 1)) % V
            ids = ((base + rng.permutation(K)[None, :] * 1531) % V).astype(np.int32)
            lp = -np.sort(rng.exponential(1.5, (N, K)).cumsum(1), axis=1).astype(np.float32)
            tail = np.clip(1 - np.exp(lp.astype(np.float64)).sum(1), 0, 1)
            ent = rng.gamma(2.0, 0.8, N).astype(np.float32)
            w.add(ls.SequenceRecord(input_ids=tok, scored=ls.Scored(
                ids=ids, logprobs=lp, label_logprob=np.minimum(lp[:, 0] - rng.exponential(1, N), 0), entropy=ent,
                tail_mass=tail)))


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=10_000_000)
    ap.add_argument("--diff-positions", type=int, default=1_000_000)
    ap.add_argument("--workdir", default=None, help="where to write the caches (default: a temp dir, removed)")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_query_"))
    big = work / "big"
    if not (big / "manifest.json").is_file():
        t0 = time.perf_counter()
        synthetic(big, a.positions, seed=1)
        print(f"wrote a {a.positions:,}-position synthetic cache in {time.perf_counter() - t0:.0f} s", flush=True)
    cache = ls.open(big)
    print(f"query benchmark on 2 cores: {cache.num_positions:,} positions, {len(cache):,} sequences, "
          f"{cache.manifest.bytes / 2**20:.0f} MiB, top-{K}, V={V}\n")
    q1 = "SELECT count(*) FROM sequences WHERE mean_entropy < 1.5"
    t1 = timed(lambda: connect(big).execute(q1).fetchall())
    plan = "\n".join(r[1] for r in connect(big).execute("EXPLAIN " + q1).fetchall())
    lists_read = [c for c in ("topk_codes", "topk_logprob_deltas", "input_ids", "label_logprob") if c in plan]
    print(f"| sequence filter `{q1}` (new connection each time, best of 3) | {t1:.3f} s | target < 0.5 s | "
          f"list columns in the plan: {lists_read or 'none'} |")
    q2 = "SELECT floor(entropy * 4) AS b, count(*) FROM tokens GROUP BY b ORDER BY b"
    t2 = timed(lambda: connect(big).execute(q2).fetchall())
    print(f"| entropy histogram `{q2}` | {t2:.2f} s | target < 5 s | |")
    da, db = work / "diff_a", work / "diff_b"
    for p, seed in ((da, 2), (db, 3)):
        if not (p / "manifest.json").is_file():
            synthetic(p, a.diff_positions, seed=seed, tokens_seed=7)
    out = work / "diff_out"

    def run_diff():
        shutil.rmtree(out, ignore_errors=True)
        diff(da, db, out)

    t3 = timed(run_diff, repeat=1)
    print(f"| `logitstore diff` of two {ls.open(da).num_positions:,}-position caches | {t3:.1f} s | "
          f"target < 30 s | |")
    q4 = "SELECT avg(topk_logprobs[1]), avg(topk_ids[1]) FROM tokens"
    t4 = timed(lambda: connect(da).execute(q4).fetchall(), repeat=1)
    print(f"| decoding every entry list: `{q4}` on {ls.open(da).num_positions:,} positions | {t4:.1f} s | "
          f"no target | ids through the id map, logprobs by an O(k) prefix sum per entry in SQL |")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
