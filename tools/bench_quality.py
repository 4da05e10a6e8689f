"""Benchmark, the headline: does a student trained from the cache come close to one trained with the teacher online?

Teacher: the embedded SmolLM2-135M-Instruct. Data: English text that ships with
Python (``pydoc_data.topics``), cut into records of about ``--length`` tokens; the
last ``--eval-seqs`` records are held out. One small student config (the teacher's
tokenizer), one seed, the same batches in the same order, the same steps and
optimiser for every run:

  (a) ce        cross-entropy on the labels only
  (b) fkl-k8    forward KL from a top-8 cache, tail bucket     (``logitstore build --top-k 8``)
      fkl-k32   forward KL from a top-32 cache, tail bucket    (``logitstore build --top-k 32``)
  (c) sampled   the unbiased estimator from a 50-draw sampled cache (``logitstore build --sample 50``)
  (d) online    forward KL against the teacher's full distribution, computed by running the teacher
                at every step (the ideal that caching approximates)

(a)-(c) run through ``trainers.loop.train``; (d) is written here, plainly, with the
trainer's optimiser, schedule and loader so that only the target differs. Reported on
the held-out records: label cross-entropy and the exact full-vocabulary KL(teacher ||
student) (the teacher's logits computed here), and for (b) and (c) the fraction of
(d)'s improvement over (a) they recover, ``(a - x) / (a - d)`` (target >= 90%).

    python tools/bench_quality.py            # about 30 minutes on 2 CPU cores
    python tools/bench_quality.py --quick    # a few minutes, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STUDENT = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=3, num_attention_heads=3,
               num_key_value_heads=1, vocab_size=49152, max_position_embeddings=1024, tie_word_embeddings=True)


def records(tokenizer, n: int, length: int) -> list[str]:
    """``n`` texts of about ``length`` tokens each, from pydoc_data.topics, in a fixed order."""
    from pydoc_data.topics import topics

    words = " ".join(" ".join(topics[k].split()) for k in sorted(topics)).split()
    out, i, step = [], 0, max(8, int(length * 0.7))
    while len(out) < n and i < len(words):
        text = " ".join(words[i:i + step])
        ids = tokenizer(text)["input_ids"][:length]
        out.append(tokenizer.decode(ids))
        i += step
    return out


def teacher_logprobs(teacher, tokenizer, texts: list[str], length: int):
    """[(input_ids, full-vocabulary teacher log-softmax [T-1, V])] in float32 (the reference)."""
    import torch

    out = []
    with torch.inference_mode():
        for t in texts:
            ids = torch.tensor(tokenizer(t)["input_ids"][:length])[None]
            out.append((ids, torch.log_softmax(teacher(ids).logits[0, :-1].float(), -1)))
    return out


def evaluate(model, ref) -> dict[str, float]:
    """Held-out label CE and exact full-vocabulary KL(teacher || student), per target token."""
    import torch

    ce = kl = 0.0
    n = 0
    model.eval()
    with torch.inference_mode():
        for ids, lt in ref:
            ls = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            lt = lt.double()
            ce += float(-ls.gather(1, ids[0, 1:, None]).sum())
            kl += float((lt.exp() * (lt - ls)).sum())
            n += ids.shape[1] - 1
    model.train()
    return {"ce": ce / n, "kl": kl / n}


def online_kd(cache: Path, student_cfg: Path, teacher, out: Path, steps: int, batch: int, length: int, lr: float):
    """(d): the trainer's optimiser, schedule and batches; the target is the teacher's full distribution,
    recomputed by a teacher forward at every step."""
    import torch

    import logitstore
    from trainers.config import TrainConfig
    from trainers.data import StreamingLoader
    from trainers.loop import Body, lr_schedule, make_optimizer
    from trainers.student import load_student

    cfg = TrainConfig(cache=str(cache), student=str(student_cfg), output=str(out), max_steps=steps,
                      batch_size=batch, max_length=length, lr=lr)
    student = load_student(str(student_cfg), manifest=logitstore.open(cache).manifest, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    body = Body(student)
    opt = make_optimizer(student.model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg))
    it = iter(StreamingLoader(str(cache), batch_size=batch, max_length=length, seed=cfg.seed))
    student.model.train()
    for _ in range(steps):
        b = next(it)
        sel = b["target_mask"]
        with torch.inference_mode():
            lt = torch.log_softmax(teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[sel]
                                   .float(), -1)
        ls = torch.log_softmax(student.head(body(b)[sel]), -1)
        loss = (lt.exp() * (lt - ls)).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return student.model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-seqs", type=int, default=200)
    ap.add_argument("--eval-seqs", type=int, default=24)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--quick", action="store_true", help="40 train records, 8 held out, 30 steps")
    ap.add_argument("--workdir", help="keep the caches and students here (default: a temporary directory)")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args(argv)
    if a.quick:
        a.train_seqs, a.eval_seqs, a.steps = 40, 8, 30
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from builders.config import BuildConfig
    from builders.driver import build
    from builders.embedded import prepare_embedded_teacher
    from logitstore import Sampled, TopK
    from trainers.config import TrainConfig
    from trainers.loop import train

    t_all = time.perf_counter()
    tdir = prepare_embedded_teacher()
    tok = AutoTokenizer.from_pretrained(tdir)
    teacher = AutoModelForCausalLM.from_pretrained(tdir, dtype=torch.float32).eval()
    texts = records(tok, a.train_seqs + a.eval_seqs, a.length)
    train_texts, eval_texts = texts[:a.train_seqs], texts[a.train_seqs:]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in train_texts))
        scfg = work / "student" / "config.json"
        scfg.parent.mkdir(exist_ok=True)
        LlamaConfig(**STUDENT).to_json_file(str(scfg))
        caches, times = {}, {}
        for name, rule in (("k8", TopK(8)), ("k32", TopK(32)), ("sampled", Sampled(draws=50))):
            t = time.perf_counter()
            caches[name] = work / f"cache-{name}"
            if not (caches[name] / "manifest.json").exists():
                build(str(tdir), data, caches[name], BuildConfig(rule=rule, max_length=a.length), progress=False)
            times[f"build {name}"] = time.perf_counter() - t
            print(f"built {name}: {time.perf_counter() - t:.0f} s", flush=True)
        ref = teacher_logprobs(teacher, tok, eval_texts, a.length)
        results = {}
        runs = [("(a) ce", "k32", "ce"), ("(b) fkl-k8", "k8", "forward_kl"), ("(b) fkl-k32", "k32", "forward_kl"),
                ("(c) sampled", "sampled", "forward_kl")]
        for name, cache, loss in runs:
            t = time.perf_counter()
            out = work / name.split()[1]
            train(TrainConfig(cache=str(caches[cache]), student=str(scfg), output=str(out), loss=loss,
                              max_steps=a.steps, batch_size=a.batch, max_length=a.length, lr=a.lr, quiet=True,
                              log_every=a.steps, resume=(out / "checkpoints").exists()))
            results[name] = evaluate(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ref)
            times[name] = time.perf_counter() - t
            print(f"{name:14s} held-out CE {results[name]['ce']:.4f}  KL {results[name]['kl']:.4f}  "
                  f"({times[name]:.0f} s)", flush=True)
        t = time.perf_counter()
        model = online_kd(caches["k32"], scfg, teacher, work / "online", a.steps, a.batch, a.length, a.lr)
        results["(d) online"] = evaluate(model, ref)
        times["(d) online"] = time.perf_counter() - t
        print(f"{'(d) online':14s} held-out CE {results['(d) online']['ce']:.4f}  KL "
              f"{results['(d) online']['kl']:.4f}  ({times['(d) online']:.0f} s)", flush=True)
    a_, d_ = results["(a) ce"], results["(d) online"]
    print(f"\nteacher SmolLM2-135M-Instruct; student {STUDENT['num_hidden_layers']} layers x "
          f"{STUDENT['hidden_size']}; {a.train_seqs} records x <= {a.length} tokens, {a.steps} steps of batch "
          f"{a.batch}, lr {a.lr}; {a.eval_seqs} held-out records")
    print(f"{'run':14s} {'held-out CE':>12s} {'KL(teacher||student)':>21s} {'recovered (CE)':>15s} "
          f"{'recovered (KL)':>15s}")
    for name, r in results.items():
        rec = {m: (a_[m] - r[m]) / (a_[m] - d_[m]) if not math.isclose(a_[m], d_[m]) else float("nan")
               for m in ("ce", "kl")}
        r["recovered"] = rec
        print(f"{name:14s} {r['ce']:12.4f} {r['kl']:21.4f} {100 * rec['ce']:14.1f}% {100 * rec['kl']:14.1f}%")
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results, "seconds": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
