"""Corruption sweep: flip single bytes of a shard and check the reader never returns wrong data.

For each of N random byte offsets in the first shard of CACHE, a copy of the cache gets
that byte inverted and is read in full; the outcome is counted as ``error`` (the reader
raised CorruptCacheError), ``same`` (decoded values identical: a byte no value depends
on) or ``WRONG`` (decoded values differ: silent corruption, the thing that must not happen).

    python tools/flip_sweep.py CACHE [--flips 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logitstore as ls  # noqa: E402


def decoded(path) -> dict:
    return {s.seq_id: [s.input_ids, s.pos, s.ids, s.logprobs, s.entropy, s.label_logprob, s.tail_mass, s.counts]
            for s in ls.open(path)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache")
    ap.add_argument("--flips", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    src = Path(a.cache)
    want = decoded(src)
    shard = ls.open(src).shard_paths[0]
    rel = shard.relative_to(src)
    rng = np.random.default_rng(a.seed)
    outcomes = {"error": 0, "same": 0, "WRONG": 0}
    with tempfile.TemporaryDirectory() as tmp:
        for offset in rng.choice(shard.stat().st_size, min(a.flips, shard.stat().st_size), replace=False):
            dst = Path(tmp) / "c"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)
            data = bytearray((dst / rel).read_bytes())
            data[offset] ^= 0xFF
            (dst / rel).write_bytes(bytes(data))
            try:
                got = decoded(dst)
            except ls.CorruptCacheError:
                outcomes["error"] += 1
                continue
            same = got.keys() == want.keys() and all(
                (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y, equal_nan=True))
                for k in want for x, y in zip(got[k], want[k]))
            outcomes["same" if same else "WRONG"] += 1
    print(f"{sum(outcomes.values())} single-byte flips in {rel} ({shard.stat().st_size} bytes): "
          + ", ".join(f"{k} {v}" for k, v in outcomes.items()))
    return 1 if outcomes["WRONG"] else 0


if __name__ == "__main__":
    sys.exit(main())
