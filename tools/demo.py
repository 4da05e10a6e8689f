"""``logitstore demo``: the whole promise on the embedded teacher, offline, in a few minutes on a laptop CPU.

1. Prepare the embedded teacher (SmolLM2-135M-Instruct; the first run dequantises its GGUF).
2. Build two caches from the dataset that ships in ``tools/demo_data``: the teacher
   answers arithmetic and word problems (generation mode, several samples per prompt,
   each checked against the reference answer), and scores plain English text (top-32).
3. Inspect them with SQL: pass rate, the most confidently wrong answers, entropy by
   correctness, the hardest text; write an HTML report of each.
4. Select a held-out set and a filtered training set with SQL, train two students of
   different sizes and losses from the one text cache, and a CE-only baseline, and print
   their held-out cross-entropy and KL to the teacher side by side.
5. Print where everything is and the commands to go further.

This module is a command-line front end (it prints), on top of the store, the builders and
the trainers; everything it does goes through the public APIs that the other subcommands use,
and it prints each equivalent command. ``tools.cli.demo`` registers ``logitstore demo``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from tools.cli.text import format_table

DATA_DIR = Path(__file__).parent / "demo_data"
STUDENTS = {  # Llama configs sharing the teacher's tokenizer (vocab 49152)
    "small": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=3, num_attention_heads=3,
                  num_key_value_heads=1),
    "tiny": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=3,
                 num_key_value_heads=1),
}
EVAL_WHERE = "substr(seq_id, 1, 1) IN ('0', '1')"  # seq ids are content hashes: about 1/8 of the text, stable
TRAIN_WHERE = f"NOT ({EVAL_WHERE}) AND teacher_nll < 6"  # drop text the teacher finds near-random


class Settings:
    def __init__(self, quick: bool):
        self.quick = quick
        self.problems = 8 if quick else 80
        self.samples = 2 if quick else 4
        self.max_new_tokens = 24 if quick else 40
        self.text = 120 if quick else 300
        self.steps = 20 if quick else 150
        self.batch = 8


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _step(n: int, title: str) -> None:
    _say(f"\n[{n}/5] {title}")


def _subset(src: Path, dst: Path, n: int) -> Path:
    """``n`` records spread evenly over ``src`` (so every kind of record is represented)."""
    lines = src.read_text(encoding="utf-8").splitlines()
    lines = [lines[i * len(lines) // n] for i in range(min(n, len(lines)))]
    dst.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return dst


def _build(teacher: Path, data: Path, out: Path, **cfg) -> None:
    from builders.config import BuildConfig
    from builders.driver import build
    from logitstore.manifest import load_manifest

    if (out / "manifest.json").exists():
        if load_manifest(out).complete:
            _say(f"  reusing {out} (delete it to rebuild)")
            return
        _say(f"  resuming the unfinished build in {out}")
        build(str(teacher), data, out, BuildConfig(**cfg), resume=True)
        return
    build(str(teacher), data, out, BuildConfig(**cfg))


def _table(rel, limit: int = 8) -> str:
    return format_table(rel.columns, rel.fetchall()[:limit], digits=3, indent="  ")


def _inspect(problems: Path, text: Path, tokenizer, out: Path) -> None:
    import logitstore
    from logitstore.report import write_report

    p = logitstore.open(problems)
    _say(f"  problems cache: {len(p)} sampled answers, {p.num_positions} cached positions")
    _say("  $ logitstore sql CACHE \"SELECT correct, count(*) AS n, avg(mean_entropy) ... GROUP BY correct\"")
    _say(_table(p.sql("SELECT correct, count(*) AS answers, round(avg(mean_entropy), 3) AS mean_entropy, "
                      "round(avg(teacher_nll), 3) AS teacher_nll FROM sequences GROUP BY correct ORDER BY correct")))
    rate = p.sql("SELECT avg(correct::INT) FROM sequences").fetchall()[0][0]
    _say(f"  pass rate: {100 * (rate or 0):.1f}% of the teacher's sampled answers are correct")
    _say("  the most confidently wrong answers (lowest teacher NLL among incorrect ones):")
    wrong = p.sql("SELECT input_ids, teacher_nll FROM sequences WHERE correct = false ORDER BY teacher_nll "
                  "LIMIT 3").fetchall()
    for ids, nll in wrong:
        chat = tokenizer.decode(ids, skip_special_tokens=True)
        user, _, answer = chat.partition("assistant\n")
        question = user.split("user\n")[-1].strip()
        _say(f"    nll {nll:.3f}  Q: {question[:70]!s}  A: {' '.join(answer.split())[:60]}")
    t = logitstore.open(text)
    _say(f"  text cache: {len(t)} sequences, {t.num_positions} positions, "
         f"{t.manifest.bytes / max(t.num_positions, 1):.1f} bytes/position on disk")
    _say("  the text the teacher finds hardest:")
    _say(_table(t.sql("SELECT seq_id, n_tokens, round(mean_entropy, 3) AS mean_entropy, round(teacher_nll, 3) "
                      "AS teacher_nll, round(token_accuracy, 3) AS top1_accuracy FROM sequences "
                      "ORDER BY teacher_nll DESC LIMIT 3")))
    for cache, name in ((problems, "problems"), (text, "text")):
        path = write_report(cache, out / f"report-{name}.html")
        _say(f"  wrote {path}")


def _train(text: Path, out: Path, s: Settings) -> list[dict]:
    from transformers import LlamaConfig

    import logitstore
    from logitstore.selection import save_selection
    from logitstore.subset import make_selection
    from trainers.config import TrainConfig
    from trainers.loop import train

    sel = {}
    for name, where in (("eval", EVAL_WHERE), ("train", TRAIN_WHERE)):
        sel[name] = out / f"{name}.selection.json"
        chosen = make_selection(text, where=where)
        save_selection(sel[name], chosen)
        _say(f"  $ logitstore select {text.name} --where \"{where}\" -o {sel[name].name}   "
             f"-> {len(chosen.seq_ids)} sequences")
    vocab = logitstore.open(text).manifest.vocab_size
    runs = [("baseline-small-ce", "small", "ce"), ("student-small-fkl", "small", "forward_kl"),
            ("student-tiny-jsd", "tiny", "jsd")]
    rows = []
    for name, size, loss in runs:
        cfg_path = out / "students" / f"{size}.json"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        LlamaConfig(vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=True,
                    **STUDENTS[size]).to_json_file(str(cfg_path))
        run_dir = out / "students" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        _say(f"  $ logitstore train {sel['train'].name} --student students/{size}.json --loss {loss} "
             f"--eval {sel['eval'].name} --max-steps {s.steps} -o students/{name}")
        summary = train(TrainConfig(cache=str(sel["train"]), student=str(cfg_path), output=str(run_dir), loss=loss,
                                    eval=str(sel["eval"]), max_steps=s.steps, batch_size=s.batch, lr=3e-3,
                                    max_length=256, log_every=10))
        rows.append({"run": name, "student": size, "loss": loss, **summary})
    return rows


def run(args: argparse.Namespace) -> int:
    s = Settings(args.quick)
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _say(f"logitstore demo{' --quick' if s.quick else ''}: precompute teacher logits once, inspect and filter "
         f"them with SQL, train several students from one cache. Output: {out}")

    _step(1, "the embedded teacher (SmolLM2-135M-Instruct, offline)")
    from builders.embedded import prepare_embedded_teacher

    teacher = prepare_embedded_teacher()
    _say(f"  {teacher}")

    _step(2, "build the caches")
    from builders.generate import GenerationConfig
    from logitstore import TopK

    data = out / "data"
    data.mkdir(exist_ok=True)
    problems_data = _subset(DATA_DIR / "problems.jsonl", data / "problems.jsonl", s.problems)
    text_data = _subset(DATA_DIR / "text.jsonl", data / "text.jsonl", s.text)
    problems, text = out / "cache-problems", out / "cache-text"
    _say(f"  $ logitstore build TEACHER {problems_data.name} --generate {s.samples} --verifier last-number "
         f"--top-k 32 -o {problems.name}")
    _build(teacher, problems_data, problems, rule=TopK(32), generation=GenerationConfig(
        n=s.samples, max_new_tokens=s.max_new_tokens, temperature=0.7, top_p=0.95, verifier="last-number"))
    _say(f"  $ logitstore build TEACHER {text_data.name} --top-k 32 -o {text.name}")
    _build(teacher, text_data, text, rule=TopK(32))

    _step(3, "inspect with SQL")
    from transformers import AutoTokenizer

    _inspect(problems, text, AutoTokenizer.from_pretrained(teacher), out)

    _step(4, "select with SQL and train students from the one text cache")
    rows = _train(text, out, s)
    _say("\n  held-out text (eval selection); KL = KL(teacher || student) over the teacher's top-32 plus one bucket "
         "for the rest (a lower bound of the full KL):")
    _say(f"  {'run':20s} {'student':8s} {'loss':11s} {'held-out CE':>12s} {'KL to teacher':>14s}")
    for r in rows:
        _say(f"  {r['run']:20s} {r['student']:8s} {r['loss']:11s} {r['eval_ce']:12.4f} {r.get('eval_kl', 0):14.4f}")
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))

    _step(5, "where everything is")
    _say(f"  caches      {problems}  {text}")
    _say(f"  reports     {out / 'report-problems.html'}  {out / 'report-text.html'}")
    _say(f"  selections  {out / 'train.selection.json'}  {out / 'eval.selection.json'}")
    _say(f"  students    {out / 'students'}/<run> (AutoModelForCausalLM.from_pretrained), metrics.jsonl each")
    _say(f"  results     {out / 'results.json'} (the table above, with each run's summary)")
    _say("  go further:")
    _say(f"    logitstore info {text}")
    _say(f"    logitstore sql {problems} \"SELECT correct, avg(teacher_nll) FROM sequences GROUP BY correct\"")
    _say(f"    logitstore select {problems} --where \"correct\" -o correct.selection.json   # verified SFT data")
    _say(f"    logitstore train {out / 'train.selection.json'} --student {out / 'students' / 'small.json'} "
         "--loss reverse_kl --max-steps 300 -o my-student")
    _say(f"    logitstore score {text} {out / 'students' / 'student-small-fkl'} -o scores   "
         "# per-token student entropy, KL: TIP-style token selection")
    _say(f"\ndone in {time.perf_counter() - t0:.0f} s")
    return 0
