"""Benchmark: cross-tokenizer students (ALM, GOLD) against the same students trained with CE only, from one cache.

Teacher: the embedded SmolLM2-135M-Instruct. Data: English text that ships with Python
(``pydoc_data.topics``, as ``tools/bench_quality.py``) in records of <= 128 teacher tokens; one top-32
cache of ``--records`` training and 48 held-out records, split by selections (``record < N``).
Students, all the same body (a 2-layer Llama, hidden 128) from scratch, differing in the tokenizer:

  same   the teacher's tokenizer (vocab 49,152): ``--loss ce`` and ``--loss forward_kl`` (top-32 + tail bucket)
  byte   256 bytes + 3 specials (``tools.student_tokenizers.byte_tokenizer``): ``--cross-tokenizer alm``
         with ``--loss ce`` (CE only), with ALM (``--ce-weight`` from ``--alm-ce-weight``, ``--alm-mode``,
         ``--gradmag``), ``--cross-tokenizer gold`` (forward KL on matched one-token chunks, ULD elsewhere) and
         ``--cross-tokenizer nextbyte`` (forward KL over first-byte buckets at chunk starts, or with
         ``--nextbyte-at tokens`` at every student token), both with CE weighted by ``--mix-ce``
  bpe    byte-level BPE of 2,048 tokens trained on the training records: the same four runs

Every run: ``--steps`` steps of batch 8 (lr 3e-3, warm-up then cosine), ``--seeds`` seeds (student
init and data order). Reported: held-out bits per byte on the same bytes for every student
(``eval_bpb``: the target text after each record's first teacher token), and, per tokenizer, the gain
of each method over CE against the gain of same-tokenizer KD over CE, over the same seeds:
``ratio = mean(bpb_CE - bpb_ALM) / mean(bpb_CE_same - bpb_KD_same)`` (target >= 0.5).

    python tools/bench_cross.py                      # all runs, 3 seeds
    python tools/bench_cross.py --quick              # a smoke run: 40 records, 20 steps, 1 seed
    python tools/bench_cross.py --report             # the tables from the results so far
    python tools/bench_cross.py --report-all         # every configuration run so far, named by its flags
    python tools/bench_cross.py --target-check       # nextbyte's targets from the cache against exact ones
    python tools/bench_cross.py --only byte:alm,bpe:alm --alm-ce-weight 0.5 --gradmag \
        --alm-mode merge_by_space_prob+append_space  # the ALM authors' recommended configuration

Results are one JSON file per (student, method, seed) under ``WORKDIR/results``, named by the flags the run
depends on (``--alm-ce-weight``, ``--alm-mode``, ``--gradmag`` for ALM, ``--mix-ce`` for gold and nextbyte,
``--nextbyte-at`` for nextbyte;
a run skips what is there); the cache, tokenizers and students stay in WORKDIR.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BODY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=1024, tie_word_embeddings=True)
EVAL_RECORDS, BATCH, LR, BPE_VOCAB = 48, 8, 3e-3, 2048
METHODS = ("alm", "gold", "nextbyte")  # the cross-tokenizer methods, each against CE
RUNS = [("same", "ce"), ("same", "kd")] + [(s, m) for s in ("byte", "bpe") for m in ("ce", *METHODS)]


def prepare(work: Path, n_train: int) -> dict:
    """The cache (built once), its train / held-out selections, and the three student configs."""
    from transformers import AutoTokenizer, LlamaConfig

    from builders.config import BuildConfig
    from builders.driver import build
    from builders.embedded import prepare_embedded_teacher
    from logitstore import TopK
    from logitstore.selection import save_selection
    from logitstore.subset import make_selection
    from tools.bench_quality import topic_records
    from tools.student_tokenizers import bpe_tokenizer, byte_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    tdir = prepare_embedded_teacher()
    tok = AutoTokenizer.from_pretrained(tdir)
    texts = topic_records(tok)[:n_train + EVAL_RECORDS]  # the first n_train train, the next EVAL_RECORDS held out
    if len(texts) < n_train + EVAL_RECORDS:
        raise SystemExit(f"pydoc_data.topics gives {len(texts)} records; --records {n_train} needs "
                         f"{n_train + EVAL_RECORDS}")
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


def run(p: dict, student: str, method: str, seed: int, steps: int, ce_weight: float, out: Path,
        alm_mode: str = "plain", gradmag: bool = False, nextbyte_at: str = "chunks") -> dict:
    from trainers.config import TrainConfig
    from trainers.loop import train

    kw = dict(cache=str(p["train"]), eval=str(p["eval"]), student=str(p["students"][student]), output=str(out),
              max_steps=steps, batch_size=BATCH, max_length=128, lr=LR, seed=seed, quiet=True, log_every=50)
    if student == "same":
        kw["loss"] = "ce" if method == "ce" else "forward_kl"
    else:
        kw.update(cross_tokenizer="alm" if method == "ce" else method, loss="ce" if method == "ce" else "forward_kl",
                  ce_weight=0.0 if method == "ce" else ce_weight)
        if method in ("alm", "gold"):  # nextbyte weighs KD and CE per token (--gradmag is refused there)
            kw.update(gradmag=gradmag)
        if method == "alm":
            kw.update(alm_mode=alm_mode)
        if method == "nextbyte":
            kw.update(nextbyte_at=nextbyte_at)
    t = time.perf_counter()
    summary = train(TrainConfig(**kw))
    from transformers import AutoModelForCausalLM

    n_params = sum(x.numel() for x in AutoModelForCausalLM.from_pretrained(out).parameters())
    return {"student": student, "method": method, "seed": seed, "steps": steps, "seconds": time.perf_counter() - t,
            "params": n_params, **{k: v for k, v in summary.items() if k.startswith("eval_")}}


def target_check(p: dict, records: int = 8) -> str:
    """How far ``nextbyte``'s teacher targets, built from the top-32 cache, are from the same targets built from
    the teacher's full distributions (the embedded teacher run again on the first ``records`` held-out records):
    mean / median / 90th percentile over chunk starts of KL(exact || from the cache), nats, for the next-byte
    distribution at the boundary (P_i) with the tail spread evenly over the tokens outside the entries (what
    ``nextbyte`` does) and with the entries renormalised instead, and for the whole one-token-back target, at
    chunk starts and (``--nextbyte-at tokens``) at the byte student's sites inside teacher tokens."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    import logitstore
    from trainers.config import TrainConfig
    from trainers.cross import CrossTokenizer, one_token_back
    from trainers.data import StreamingLoader
    from trainers.student import load_student

    cfg = TrainConfig(cache=str(p["eval"]), student=str(p["students"]["byte"]), output="unused",
                      cross_tokenizer="nextbyte", nextbyte_at="tokens", max_length=128).validate()
    manifest = logitstore.open(p["cache"]).manifest
    cross = CrossTokenizer(cfg, manifest, load_student(cfg.student, manifest=manifest, seed=0, cache_tokenizer=False))
    batch = next(iter(StreamingLoader(str(p["eval"]), batch_size=records, max_length=128, shuffle=False)))
    sb = cross.prepare(batch)
    teacher = AutoModelForCausalLM.from_pretrained(p["teacher"], dtype=torch.float32).eval()
    with torch.no_grad():
        full = torch.log_softmax(teacher(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).logits.double(), -1)
    fb = torch.from_numpy(cross.byte_t)
    n, T = 257, batch["input_ids"].shape[1]
    t_ids, t_valid, t_lp = batch["topk_ids"], batch["topk_valid"], batch["topk_logprobs"].double()

    def kl(a, b):  # (KL(a || b), infinite where b rules out a byte a gives mass; a's mass on such bytes)
        keep, lost = a > 0, (a > 0) & (b <= 0)
        inf = bool(lost.any())
        return (math.inf if inf else float((a[keep] * (a[keep].log() - b[keep].log())).sum()), float(a[lost].sum()))

    out = {"P_i, tail spread over the other tokens": [], "P_i, entries renormalised": [], "whole target": [],
           "whole target, inside teacher tokens": []}
    for c, (f, n_w) in enumerate(zip(sb["nb_tpos"].tolist(), sb["nb_wlen"].tolist())):
        if not bool(sb["nb_ok"][c]):
            continue
        b, i = divmod(f, T)
        V = min(full.shape[-1], fb.numel())
        p_i = torch.zeros(n, dtype=torch.float64).index_add(0, fb[:V], full[b, i, :V].exp())
        v = int(batch["input_ids"][b, i])
        w = cross.teacher.table[v][:n_w]
        e_ids, e_next = cross.teacher.extending(w)
        ext = torch.zeros(n, dtype=torch.float64).index_add(0, torch.from_numpy(e_next),
                                                            full[b, i - 1, torch.from_numpy(e_ids)].exp())
        w_id = cross.teacher.id_of(w)
        exact = one_token_back(p_i, ext, full[b, i - 1, w_id] if w_id is not None else torch.tensor(-math.inf))
        if n_w < len(cross.teacher.table[v]):  # a site inside teacher token v
            out["whole target, inside teacher tokens"].append(kl(exact, sb["nb_target"][c]))
            continue
        ok = t_valid[b, i]
        head = torch.zeros(n, dtype=torch.float64).index_add(0, fb[t_ids[b, i][ok]], t_lp[b, i][ok].exp())
        rest = torch.bincount(fb, minlength=n).double() - torch.bincount(fb[t_ids[b, i][ok]], minlength=n).double()
        spread = head + float(batch["tail_mass"][b, i]) * rest / rest.sum()
        out["P_i, tail spread over the other tokens"].append(kl(p_i, spread / spread.sum()))
        out["P_i, entries renormalised"].append(kl(p_i, head / head.sum()))
        out["whole target"].append(kl(exact, sb["nb_target"][c]))
    lines = [f"KL(exact || from the cache), nats, over {len(out['whole target'])} chunk starts and "
             f"{len(out['whole target, inside teacher tokens'])} sites inside teacher tokens of {records} held-out "
             "records (byte student, --nextbyte-at tokens); infinite where the cache's target gives 0 to a byte the "
             "exact one does not",
             "", "| target | mean | median | p90 | share infinite | exact mass given 0 (mean) |",
             "|---|---|---|---|---|---|"]
    for k, v in out.items():
        d = np.array([x for x, _ in v])
        fin = d[np.isfinite(d)]
        stats = [f"{x:.3f}" if np.isfinite(x) else "inf" for x in
                 (fin.mean() if fin.size else math.inf, np.sort(d)[d.size // 2], np.sort(d)[int(0.9 * (d.size - 1))])]
        lines.append(f"| {k} | {' | '.join(stats)} | {np.mean(~np.isfinite(d)):.1%} | "
                     f"{np.mean([z for _, z in v]):.4f} |")
    return "\n".join(lines)


def report(results: list[dict]) -> str:
    by = {(r["student"], r["method"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    lines = ["| student | method | held-out bits/byte, mean ± sd (per seed) | teacher bits/byte | params | s/run |",
             "|---|---|---|---|---|---|"]
    order = {"same": 0, "byte": 1, "bpe": 2}
    pairs = sorted({(r["student"], r["method"]) for r in results}, key=lambda p: (order[p[0]], p[1] != "ce", p[1]))
    for s, m in pairs:
        rs = [by[(s, m, x)] for x in seeds if (s, m, x) in by]
        b = [r["eval_bpb"] for r in rs]
        sd = statistics.stdev(b) if len(b) > 1 else 0.0
        lines.append(f"| {s} | {m} | {statistics.mean(b):.4f} ± {sd:.4f} ({', '.join(f'{x:.4f}' for x in b)}) | "
                     f"{rs[0]['eval_teacher_bpb']:.4f} | {rs[0]['params']:,} | "
                     f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    lines += ["", "| student | gain over CE (bits/byte) | same-tokenizer KD gain over CE | ratio per seed | "
                  "ratio of the mean gains | target 0.5 |", "|---|---|---|---|---|---|"]
    for s, method in ((s, m) for s, m in pairs if s != "same" and m != "ce"):
        gains, kd_gains, ratios = [], [], []
        for x in seeds:
            need = [(s, "ce", x), (s, method, x), ("same", "ce", x), ("same", "kd", x)]
            if all(k in by for k in need):
                g = by[(s, "ce", x)]["eval_bpb"] - by[(s, method, x)]["eval_bpb"]
                kg = by[("same", "ce", x)]["eval_bpb"] - by[("same", "kd", x)]["eval_bpb"]
                gains.append(g)
                kd_gains.append(kg)
                ratios.append(g / kg if kg else float("nan"))
        if ratios:  # the ratio of the mean gains: a seed whose KD gain is near 0 makes its own ratio meaningless
            ratio = statistics.mean(gains) / statistics.mean(kd_gains)
            verdict = "met" if ratio >= 0.5 else f"missed by {0.5 - ratio:.2f}"
            lines.append(f"| {s} {method} | {statistics.mean(gains):.4f} | {statistics.mean(kd_gains):.4f} | "
                         f"{', '.join(f'{r:.2f}' for r in ratios)} | {ratio:.2f} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "logitstore" / "bench-cross"))
    ap.add_argument("--records", type=int, default=300, help="training records (default 300)")
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps per run (default 300)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--alm-ce-weight", type=float, default=0.0, help="--ce-weight of the ALM runs (0: pure ALM)")
    ap.add_argument("--alm-mode", default="plain", help="--alm-mode of the ALM runs (default plain; the ALM "
                    "authors recommend merge_by_space_prob+append_space)")
    ap.add_argument("--gradmag", action="store_true", help="the ALM, gold and nextbyte runs balance KD and CE by "
                    "GradMag (with --alm-ce-weight / --mix-ce in (0, 1))")
    ap.add_argument("--mix-ce", type=float, default=0.5, help="--ce-weight of the gold and nextbyte runs "
                    "(default 0.5: they teach at chunk starts only)")
    ap.add_argument("--nextbyte-at", default="chunks", choices=("chunks", "tokens"), help="--nextbyte-at of the "
                    "nextbyte runs (default chunks: where both tokenizations start a token; tokens: at every "
                    "student token)")
    ap.add_argument("--only", default="", help="comma-separated student:method runs, e.g. byte:alm,same:kd")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 40 records, 20 steps, 1 seed")
    ap.add_argument("--report", action="store_true", help="print the tables of the results so far and exit")
    ap.add_argument("--target-check", action="store_true", help="print how far nextbyte's teacher targets from "
                    "the cache are from the same targets from the teacher's full distributions, and exit")
    ap.add_argument("--report-all", action="store_true", help="print every configuration in the results (each "
                    "method named with its flags) and exit")
    args = ap.parse_args(argv)
    if args.quick:
        args.records, args.steps, args.seeds = 40, 20, 1
        args.workdir += "-quick"
    work = Path(args.workdir)
    res_dir = work / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    base, gm = f"r{args.records}-s{args.steps}", "-gradmag" if args.gradmag else ""
    mode = "" if args.alm_mode == "plain" else "-" + args.alm_mode.replace("merge_by_space_prob", "merge").replace(
        "append_space", "append").replace("+", "")
    tags = {"alm": f"{base}-w{args.alm_ce_weight:g}{mode}{gm}", "gold": f"{base}-w{args.mix_ce:g}{gm}",
            "nextbyte": f"{base}-w{args.mix_ce:g}{gm}{'-tokens' if args.nextbyte_at == 'tokens' else ''}"}
    # a run's file names the flags it depends on
    if args.target_check:
        print(target_check(prepare(work, args.records)))
        return 0
    if args.report_all:
        rows = []
        for f in sorted(res_dir.glob(f"{base}-w*-*.json")):
            r = json.loads(f.read_text())
            flags = f.name[len(base) + 1:-len(f"-{r['student']}-{r['method']}-{r['seed']}.json")]
            if r["method"] in tags:
                r["method"] = f"{r['method']} {flags}"
            rows.append(r)
        print(report(rows))
        return 0
    if not args.report:
        p = prepare(work, args.records)
        only = {tuple(x.split(":")) for x in args.only.split(",") if x}
        for seed in range(args.seeds):
            for student, method in RUNS:
                if only and (student, method) not in only:
                    continue
                f = res_dir / f"{tags.get(method, base + '-w0')}-{student}-{method}-{seed}.json"
                done = [f] if method in tags else res_dir.glob(  # a CE or KD run does not depend on the flags
                    f"{base}-w*-{student}-{method}-{seed}.json")
                if any(x.exists() for x in done):
                    continue
                out = work / "runs" / f.stem
                if out.exists():
                    import shutil

                    shutil.rmtree(out)
                weight = args.alm_ce_weight if method == "alm" else args.mix_ce
                r = run(p, student, method, seed, args.steps, weight, out, args.alm_mode, args.gradmag,
                        args.nextbyte_at)
                f.write_text(json.dumps(r, indent=1))
                print(f"{student:5s} {method:8s} seed {seed}: bpb {r['eval_bpb']:.4f} ({r['seconds']:.0f} s)",
                      flush=True)
    # each method's runs with these flags, and the CE and same-tokenizer runs (they depend on none)
    results = {}
    for f in sorted(res_dir.glob(f"{base}-w*-*.json")):
        r = json.loads(f.read_text())
        m = r["method"]
        if m not in tags or f.name[:-len(f"-{r['student']}-{m}-{r['seed']}.json")] == tags[m]:
            results[(r["student"], m, r["seed"])] = r
    results = list(results.values())
    print(f"\n{tags['alm']} (ALM), {tags['gold']} (gold, nextbyte): {len(results)} runs\n")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
