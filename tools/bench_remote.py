"""Benchmark: training from a cache in an object store against training from the same cache on local disk.

One cache (synthetic top-32 distributions over SmolLM2's vocabulary of 49,152: the loader's work does not depend
on the values) is written to local disk and copied, object by object, into a local S3 server (moto, started by
this script on 127.0.0.1: no network latency, but every byte goes through the S3 HTTP API, s3fs and the disk
cache, and the server shares the CPU with the trainer). The same ``logitstore train`` run then reads it from disk,
from S3 with an empty disk cache (every shard downloaded during the run), and from S3 with the disk cache warm.
Steps per second come from each run's summary (after its first ``--skip`` steps, which hold the model and loader
start); the runs alternate, ``--repeats`` times, and the median and range are printed with the ratio to local
(target >= 0.9).

    python tools/bench_remote.py [--sequences 400 --steps 60 --repeats 3 --workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STUDENT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512, tie_word_embeddings=True)


def write_cache(path: Path, sequences: int, length: int, k: int, shard_mb: float) -> None:
    import numpy as np

    import logitstore as ls

    rng = np.random.default_rng(0)
    with ls.CacheWriter(path, vocab_size=49152, rule=ls.TopK(k), shard_bytes=int(shard_mb * 2**20),
                        row_group_positions=4096) as w:
        for _ in range(sequences):
            ids = rng.integers(0, 49152, length).astype(np.int32)
            n = length - 1
            # distinct ids per position, the label first: label + j * 1531 (32 * 1531 < 49,152)
            top = ((ids[1:, None].astype(np.int64) + np.arange(k) * 1531) % 49152).astype(np.int32)
            lp = np.sort(rng.normal(-6, 2, (n, k)).astype(np.float32), axis=1)[:, ::-1]
            lp = (lp - np.log(np.exp(lp).sum(1, keepdims=True) / 0.95)).astype(np.float32)  # 5% tail mass
            w.add(ls.SequenceRecord(input_ids=ids, positions=np.arange(1, n + 1),
                                    scored=ls.Scored(ids=top, logprobs=lp, entropy=np.full(n, 3.0, np.float32),
                                                     label_logprob=lp[:, 0].copy(),
                                                     tail_mass=np.full(n, 0.05, np.float32))))


def run_train(cache: str, student: Path, out: Path, steps: int, workers: int, env: dict) -> dict:
    cmd = [sys.executable, "-m", "tools.cli", "train", cache, "--student", str(student), "--loss", "forward_kl",
           "-o", str(out), "--max-steps", str(steps), "--batch-size", "8", "--max-length", "256",
           "--num-workers", str(workers), "--log-every", "1", "--quiet", "--skip-verify"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if r.returncode != 0:
        raise SystemExit(f"train failed on {cache}: {r.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"rows": [x for x in rows if "loss" in x and "lr" in x],
            "summary": json.loads((out / "summary.json").read_text())}


def steps_per_s(res: dict, skip: int) -> float:
    """Steps per second over the logged steps after the first ``skip`` (each row's ``step_time`` includes waiting
    for its batch)."""
    t = [x["step_time"] for x in res["rows"][skip:]]
    return len(t) / sum(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, default=400)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--shard-mb", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the rate (start-up)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)

    from transformers import LlamaConfig

    import logitstore as ls
    from logitstore import remote
    from tools.s3server import s3_server

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        local = tmp / "cache"
        t0 = time.perf_counter()
        write_cache(local, args.sequences, args.length, 32, args.shard_mb)
        m = ls.open(local).manifest
        print(f"cache: {m.sequences} sequences, {m.positions:,} positions, {len(m.shards)} shards, "
              f"{m.bytes / 2**20:.1f} MiB ({time.perf_counter() - t0:.0f} s to write)", flush=True)
        student = tmp / "student"
        student.mkdir()
        LlamaConfig(**STUDENT).to_json_file(str(student / "config.json"))
        with s3_server(tmp / "moto.log") as aws:
            os.environ.update(aws)
            fs = remote.filesystem("s3://benchbkt")
            fs.mkdir("benchbkt")
            for p in sorted(local.rglob("*")):  # the cache's own files, object by object, manifest last
                if p.is_file() and p.name != "manifest.json":
                    fs.put_file(str(p), f"benchbkt/cache/{p.relative_to(local)}")
            fs.put_file(str(local / "manifest.json"), "benchbkt/cache/manifest.json")
            url = "s3://benchbkt/cache"
            base = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
            rates: dict[str, list[float]] = {"local": [], "s3 cold": [], "s3 warm": []}
            for rep in range(args.repeats):
                disk = tmp / f"disk-cache-{rep}"
                env = {**base, "LOGITSTORE_CACHE_DIR": str(disk)}
                for name, where in (("local", str(local)), ("s3 cold", url), ("s3 warm", url)):
                    res = run_train(where, student / "config.json", tmp / f"run-{rep}-{name.replace(' ', '-')}",
                                    args.steps, args.workers, env)
                    rates[name].append(steps_per_s(res, args.skip))
                    print(f"repeat {rep}: {name:8s} {rates[name][-1]:.2f} steps/s", flush=True)
    print(f"\n{args.steps} steps of batch 8 x {args.length} tokens, {args.workers} loader worker(s), "
          f"{args.repeats} repeats (median, min-max):")
    ref = statistics.median(rates["local"])
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"  {name:8s} {med:.2f} steps/s ({min(r):.2f}-{max(r):.2f}), {med / ref:.3f}x local")
    return 0


if __name__ == "__main__":
    sys.exit(main())
