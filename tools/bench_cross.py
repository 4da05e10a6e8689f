"""Benchmark: cross-tokenizer students (ALM) against the same students trained with CE only, from one cache.

Teacher: the embedded SmolLM2-135M-Instruct. Data: English text that ships with Python
(``pydoc_data.topics``, as ``tools/bench_quality.py``) in records of <= 128 teacher tokens; one top-32
cache of ``--records`` training and 48 held-out records, split by selections (``record < N``).
Students, all the same body (a 2-layer Llama, hidden 128) from scratch, differing in the tokenizer:

  same   the teacher's tokenizer (vocab 49,152): ``--loss ce`` and ``--loss forward_kl`` (top-32 + tail bucket)
  byte   256 bytes + 3 specials (``tools.student_tokenizers.byte_tokenizer``): ``--cross-tokenizer alm``
         with ``--loss ce`` (CE only) and with ALM (``--ce-weight`` from ``--alm-ce-weight``)
  bpe    byte-level BPE of 2,048 tokens trained on the training records: the same two runs

Every run: ``--steps`` steps of batch 8 (lr 3e-3, warm-up then cosine), ``--seeds`` seeds (student
init and data order). Reported: held-out bits per byte on the same bytes for every student
(``eval_bpb``: the target text after each record's first teacher token), and, per tokenizer, the gain
of ALM over CE against the gain of same-tokenizer KD over CE, paired by seed:
``ratio = (bpb_CE - bpb_ALM) / (bpb_CE_same - bpb_KD_same)`` (target >= 0.5).

    python tools/bench_cross.py                      # all runs, 3 seeds
    python tools/bench_cross.py --quick              # a smoke run: 40 records, 20 steps, 1 seed
    python tools/bench_cross.py --report             # the tables from the results so far

Results are one JSON file per (student, method, seed) under ``WORKDIR/results`` (a run skips what is
there); the cache, tokenizers and students stay in WORKDIR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BODY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=1024, tie_word_embeddings=True)
EVAL_RECORDS, BATCH, LR, BPE_VOCAB = 48, 8, 3e-3, 2048
RUNS = [("same", "ce"), ("same", "kd"), ("byte", "ce"), ("byte", "alm"), ("bpe", "ce"), ("bpe", "alm")]


def prepare(work: Path, n_train: int) -> dict:
    """The cache (built once), its train / held-out selections, and the three student configs."""
    from transformers import AutoTokenizer, LlamaConfig

    from builders.config import BuildConfig
    from builders.driver import build
    from builders.embedded import prepare_embedded_teacher
    from logitstore import TopK
    from logitstore.selection import save_selection
    from logitstore.subset import make_selection
    from tools.bench_quality import records
    from tools.student_tokenizers import bpe_tokenizer, byte_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    tdir = prepare_embedded_teacher()
    tok = AutoTokenizer.from_pretrained(tdir)
    texts = records(tok, n_train + EVAL_RECORDS)
    data, cache = work / "data.jsonl", work / "cache"
    if not (cache / "manifest.json").exists():
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        t = time.perf_counter()
        build(str(tdir), data, cache, BuildConfig(rule=TopK(32), max_length=128), progress=False)
        print(f"built the teacher cache in {time.perf_counter() - t:.0f} s", flush=True)
    sel = {}
    for name, where in (("train", f"record < {n_train}"), ("eval", f"record >= {n_train}")):
        sel[name] = work / f"{name}.json"
        if not sel[name].exists():
            save_selection(sel[name], make_selection(cache, where=where))
    students = {}
    for name in ("same", "byte", "bpe"):
        d = work / f"student-{name}"
        if not (d / "config.json").exists():
            if name == "byte":
                byte_tokenizer(d)
            elif name == "bpe":
                bpe_tokenizer(d, texts[:n_train], vocab_size=BPE_VOCAB)
            d.mkdir(parents=True, exist_ok=True)  # "same" has no tokenizer beside it: it takes the cache's
            vocab = len(tok) if name == "same" else len(AutoTokenizer.from_pretrained(d))
            LlamaConfig(vocab_size=vocab, **BODY).to_json_file(str(d / "config.json"))
        students[name] = d / "config.json"
    return {"cache": cache, "train": sel["train"], "eval": sel["eval"], "students": students, "teacher": tdir}


def run(p: dict, student: str, method: str, seed: int, steps: int, alm_ce_weight: float, out: Path) -> dict:
    from trainers.config import TrainConfig
    from trainers.loop import train

    kw = dict(cache=str(p["train"]), eval=str(p["eval"]), student=str(p["students"][student]), output=str(out),
              max_steps=steps, batch_size=BATCH, max_length=128, lr=LR, seed=seed, quiet=True, log_every=50)
    if student == "same":
        kw["loss"] = "ce" if method == "ce" else "forward_kl"
    else:
        kw.update(cross_tokenizer="alm", loss="ce" if method == "ce" else "forward_kl",
                  ce_weight=0.0 if method == "ce" else alm_ce_weight)
    t = time.perf_counter()
    summary = train(TrainConfig(**kw))
    from transformers import AutoModelForCausalLM

    n_params = sum(x.numel() for x in AutoModelForCausalLM.from_pretrained(out).parameters())
    return {"student": student, "method": method, "seed": seed, "steps": steps, "seconds": time.perf_counter() - t,
            "params": n_params, **{k: v for k, v in summary.items() if k.startswith("eval_")}}


def report(results: list[dict]) -> str:
    by = {(r["student"], r["method"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    lines = ["| student | method | held-out bits/byte (mean ± sd over seeds) | teacher bits/byte | params | s/run |",
             "|---|---|---|---|---|---|"]
    for s, m in RUNS:
        rs = [by[(s, m, x)] for x in seeds if (s, m, x) in by]
        if not rs:
            continue
        b = [r["eval_bpb"] for r in rs]
        sd = statistics.stdev(b) if len(b) > 1 else 0.0
        lines.append(f"| {s} | {m} | {statistics.mean(b):.4f} ± {sd:.4f} | {rs[0]['eval_teacher_bpb']:.4f} | "
                     f"{rs[0]['params']:,} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    lines += ["", "| student | ALM gain over CE (bits/byte) | same-tokenizer KD gain over CE | ratio per seed | "
                  "ratio of the mean gains | target 0.5 |", "|---|---|---|---|---|---|"]
    for s in ("byte", "bpe"):
        gains, kd_gains, ratios = [], [], []
        for x in seeds:
            need = [(s, "ce", x), (s, "alm", x), ("same", "ce", x), ("same", "kd", x)]
            if all(k in by for k in need):
                g = by[(s, "ce", x)]["eval_bpb"] - by[(s, "alm", x)]["eval_bpb"]
                kg = by[("same", "ce", x)]["eval_bpb"] - by[("same", "kd", x)]["eval_bpb"]
                gains.append(g)
                kd_gains.append(kg)
                ratios.append(g / kg if kg else float("nan"))
        if ratios:  # the ratio of the mean gains: a seed whose KD gain is near 0 makes its own ratio meaningless
            ratio = statistics.mean(gains) / statistics.mean(kd_gains)
            verdict = "met" if ratio >= 0.5 else f"missed by {0.5 - ratio:.2f}"
            lines.append(f"| {s} | {statistics.mean(gains):.4f} | {statistics.mean(kd_gains):.4f} | "
                         f"{', '.join(f'{r:.2f}' for r in ratios)} | {ratio:.2f} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "logitstore" / "bench-cross"))
    ap.add_argument("--records", type=int, default=300, help="training records (default 300)")
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps per run (default 300)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--alm-ce-weight", type=float, default=0.0, help="--ce-weight of the ALM runs (0: pure ALM)")
    ap.add_argument("--only", default="", help="comma-separated student:method runs, e.g. byte:alm,same:kd")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 40 records, 20 steps, 1 seed")
    ap.add_argument("--report", action="store_true", help="print the tables of the results so far and exit")
    args = ap.parse_args(argv)
    if args.quick:
        args.records, args.steps, args.seeds = 40, 20, 1
        args.workdir += "-quick"
    work = Path(args.workdir)
    res_dir = work / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    tag = f"r{args.records}-s{args.steps}-w{args.alm_ce_weight:g}"
    if not args.report:
        p = prepare(work, args.records)
        only = {tuple(x.split(":")) for x in args.only.split(",") if x}
        for seed in range(args.seeds):
            for student, method in RUNS:
                if only and (student, method) not in only:
                    continue
                f = res_dir / f"{tag}-{student}-{method}-{seed}.json"
                if f.exists():
                    continue
                out = work / "runs" / f.stem
                if out.exists():
                    import shutil

                    shutil.rmtree(out)
                r = run(p, student, method, seed, args.steps, args.alm_ce_weight, out)
                f.write_text(json.dumps(r, indent=1))
                print(f"{student:5s} {method:4s} seed {seed}: bpb {r['eval_bpb']:.4f} ({r['seconds']:.0f} s)",
                      flush=True)
    # this ALM weight's ALM runs, and the CE and same-tokenizer runs of any weight (they do not depend on it)
    results = {}
    for f in sorted(res_dir.glob(f"r{args.records}-s{args.steps}-w*-*.json")):
        r = json.loads(f.read_text())
        if r["method"] != "alm" or f.name.startswith(f"{tag}-"):
            results[(r["student"], r["method"], r["seed"])] = r
    results = list(results.values())
    print(f"\n{tag}: {len(results)} runs\n")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
