"""Benchmark: what a KD step from the cache costs next to a plain cross-entropy step, and whether the loader keeps up.

1. Step overhead. One student and one batch (B sequences of T tokens with k=32
   teacher entries per position, from a cache of real SmolLM2-135M distributions, the
   dump of ``tools/teacher_dump.py``). A plain CE step is transformers' own
   ``model(input_ids, labels=...)`` with backward and AdamW; a KD step is the
   trainer's (body, chunked head, sparse forward KL with the tail bucket, backward,
   AdamW). The two alternate; the median of ``--repeats`` each is reported, with the
   ratio (target <= 1.10).
2. The loader. ``logitstore train`` runs ``--train-steps`` steps on the same cache and
   its metrics give the fraction of wall time spent waiting for data (target < 5%).
3. Memory at a large vocabulary (``--memory``): the peak resident memory of one
   forward+backward of the student's head and sparse loss over N positions at
   V = 152,064 (Qwen2.5's padded vocabulary), chunked against one ``[N, V]`` pass,
   each in a fresh process.

    python tools/bench_train.py [--batch 8 --length 256 --repeats 10] [--memory] [--tail entropy]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STUDENT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024, tie_word_embeddings=True)


def write_cache(path: Path, k: int, sequences: int) -> None:
    import numpy as np

    import logitstore as ls
    from tools.bench_store import entries_for
    from tools.bench_store import sequences as split
    from tools.teacher_dump import load_or_compute

    d = load_or_compute(51000)
    seqs = split(d, 51000)[:sequences]
    with ls.CacheWriter(path, vocab_size=49152, rule=ls.TopK(k)) as w:
        for s in seqs:
            e = entries_for(s, ls.TopK(k))
            n = len(s["input_ids"]) - 1
            w.add(ls.SequenceRecord(input_ids=s["input_ids"], positions=np.arange(1, n + 1),
                                    scored=ls.Scored.of(e, entropy=s["entropy"], label_logprob=s["label_lp"])))


def step_overhead(cache: Path, student_dir: Path, batch: int, length: int, repeats: int, tail: str = "other"
                  ) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import logitstore as ls
    from trainers.config import TrainConfig
    from trainers.data import StreamingLoader
    from trainers.loop import Body, micro_loss
    from trainers.losses import Objective
    from trainers.student import load_student

    opened = ls.open(cache)
    manifest = opened.manifest
    student = load_student(str(student_dir / "config.json"), manifest=manifest, seed=0)
    plain = AutoModelForCausalLM.from_pretrained(student_dir / "init", dtype=torch.float32)
    student.model.load_state_dict(plain.state_dict())
    cfg = TrainConfig(cache=str(cache), student="-", output="-", batch_size=batch, max_length=length)
    b = next(iter(StreamingLoader(str(cache), batch_size=batch, max_length=length, shuffle=False)))
    body, obj = Body(student), Objective("forward_kl", tail=tail)
    opt_kd = torch.optim.AdamW(student.model.parameters(), lr=1e-5)
    opt_ce = torch.optim.AdamW(plain.parameters(), lr=1e-5)
    labels = torch.where(b["attention_mask"].bool(), b["input_ids"], -100)

    def kd_step():
        loss, _ = micro_loss(body, student.head, b, cfg, obj, manifest.vocab_size, ls.TopK(manifest.rule["k"]),
                             codec=opened.codec)
        loss.backward()
        opt_kd.step()
        opt_kd.zero_grad(set_to_none=True)

    def ce_step():
        out = plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels)
        out.loss.backward()
        opt_ce.step()
        opt_ce.zero_grad(set_to_none=True)

    times = {"kd": [], "ce": []}
    for i in range(repeats + 2):
        for name, fn in (("ce", ce_step), ("kd", kd_step)) if i % 2 else (("kd", kd_step), ("ce", ce_step)):
            t = time.perf_counter()
            fn()
            if i >= 2:  # the first two rounds warm up allocators and kernels
                times[name].append(time.perf_counter() - t)
    kd, ce = statistics.median(times["kd"]), statistics.median(times["ce"])
    return {"batch": batch, "length": length, "tokens": int(b["attention_mask"].sum()), "ce_step_s": ce,
            "kd_step_s": kd, "ratio": kd / ce, "kd_all": times["kd"], "ce_all": times["ce"]}


def loader_wait(cache: Path, student_dir: Path, batch: int, length: int, steps: int, workers: int) -> dict:
    from trainers.config import TrainConfig
    from trainers.loop import train

    with tempfile.TemporaryDirectory() as out:
        s = train(TrainConfig(cache=str(cache), student=str(student_dir / "config.json"), output=out, max_steps=steps,
                              batch_size=batch, max_length=length, log_every=steps, num_workers=workers, quiet=True))
    return {"steps": steps, "num_workers": workers, "data_wait_fraction": s["last"]["data_wait_fraction"],
            "seconds": s["seconds"]}


def memory_probe(mode: str, n: int, vocab: int, hidden: int, chunk: int) -> None:
    """Runs in a child process: prints the peak RSS growth (MB) of one head + loss forward/backward."""
    import torch

    from trainers.losses import Objective
    from trainers.targets import SparseTargets
    from trainers.view import student_view, student_view_from_logits

    torch.manual_seed(0)
    k = 32
    h = torch.randn(n, hidden, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(vocab, hidden) * 0.02)
    ids = torch.randint(0, vocab, (n, k))
    lp = torch.log_softmax(torch.randn(n, k), -1) - 0.1
    t = SparseTargets(ids=ids, valid=torch.ones(n, k, dtype=torch.bool), logprobs=lp,
                      tail_mass=1 - lp.exp().sum(-1), labels=ids[:, 0], vocab_size=vocab)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    head = lambda x: x @ w.t()  # noqa: E731
    view = (student_view(h, head, ids, t.labels, chunk_size=chunk) if mode == "chunked"
            else student_view_from_logits(head(h), ids, t.labels))
    loss, _ = Objective("forward_kl")(view, t, torch.ones(n))
    loss.backward()
    print(json.dumps({"mode": mode, "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--tail", default="other", help="the KD step's tail policy (forward_kl): other or entropy")
    ap.add_argument("--workers", type=int, default=1, help="loader workers in the wait-fraction run")
    ap.add_argument("--memory", action="store_true", help="also the V=152,064 memory probe")
    ap.add_argument("--probe", nargs=5, metavar=("MODE", "N", "V", "H", "CHUNK"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.probe:
        memory_probe(a.probe[0], *map(int, a.probe[1:]))
        return 0
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"torch threads: {torch.get_num_threads()}; student: {STUDENT}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        write_cache(cache, 32, sequences=160)
        sd = tmp / "student"
        LlamaConfig(**STUDENT).to_json_file(str(sd.mkdir() or sd / "config.json"))
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**STUDENT)).save_pretrained(sd / "init")
        r = step_overhead(cache, sd, a.batch, a.length, a.repeats, a.tail)
        print(f"step overhead  B={r['batch']} T={r['length']} ({r['tokens']} tokens), k=32, --tail {a.tail}:  CE step "
              f"{r['ce_step_s'] * 1000:.0f} ms, KD step {r['kd_step_s'] * 1000:.0f} ms, ratio {r['ratio']:.3f} "
              f"(target <= 1.10)")
        w = loader_wait(cache, sd, a.batch, a.length, a.train_steps, a.workers)
        print(f"loader         {w['steps']} training steps, {w['num_workers']} worker(s): waiting for data "
              f"{100 * w['data_wait_fraction']:.2f}% of wall time (target < 5%), {w['seconds']:.1f} s")
    if a.memory:
        for mode in ("chunked", "full"):
            cmd = [sys.executable, __file__, "--probe", mode, "4096", "152064", "896", "512"]
            res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())
            print(f"memory         V=152064, H=896, N=4096 positions, {mode:7s}: peak +{res['peak_mb']:.0f} MB "
                  f"(one [N, V] float32 = {4096 * 152064 * 4 / 2**20:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
