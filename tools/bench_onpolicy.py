"""Benchmark (issue 16): R on-policy rounds against more off-policy data, at the same number of teacher-scored tokens.

Teacher: the embedded SmolLM2-135M-Instruct. Problems: arithmetic with worked reference solutions,
generated offline by ``tools/make_problems.py`` (``--problems`` of them, seed 0): the last ``--heldout`` are
held out, the first ``--base`` are the start student's data, the next ``--pool`` the off-policy arm's.
Student: a small Llama with the teacher's tokenizer (``STUDENT``), or with ``--student-layers N`` the teacher cut to N
of its layers (evenly spaced, first and last kept, as DistilBERT initialises its student): a student that
already writes text, the regime GKD reports on-policy gains in (pair it with a lower ``--lr``). Steps:

1. *Start*: the teacher scores the reference solutions of the base problems (a top-32 cache) and a
   fresh student trains ``--base-steps`` steps on them: one student distilled off-policy, shared by both
   arms.
2. *Pool*: the teacher scores the reference solutions of the pool problems: the off-policy arm's data
   (data-generated responses).
3. Per seed (``--seeds`` of them from ``--first-seed``): the **on-policy** arm runs ``logitstore distill``
   from the start student on the first ``--prompts`` pool problems (``--rounds`` rounds of ``--samples``
   samples per prompt at temperature 1, ``--steps`` steps per round); the **off-policy** arm trains the start
   student ``rounds x steps`` steps on a seeded random part of the pool with at least as many target
   positions as the on-policy rounds had the teacher score (the same teacher tokens, steps, loss and optimiser).
   Optional arms: ``--mix-ratio L`` runs the same rounds with a fraction L of each round's batches from the
   round's cache and the rest from the base cache (no extra teacher tokens); ``--split S`` spends the
   fraction S of the on-policy arm's teacher tokens on rounds over S x ``--prompts`` prompts and the rest on
   a seeded part of the pool's reference solutions, mixed per batch at ratio S (GKD's lambda at equal cost);
   ``--off-teacher 1`` adds an off-policy arm on teacher-generated responses (the teacher answers every pool
   problem once at temperature 1 and scores its answers; a seeded part with as many target positions, as for
   the reference solutions): the issue's other kind of off-policy data.
4. Each final student (and the start student) is evaluated on the held-out problems: the exact
   full-vocabulary reverse KL(student || teacher) per token on the student's own fresh samples
   (temperature 1, ``--eval-samples`` per prompt: the on-policy metric), the label cross-entropy of the
   reference solutions, and the verifier's pass rate of greedy answers (last number).
5. Throughput: the teacher-scoring time per position of round 1 (seed 0) against a plain ``build`` of the
   same prompts and responses as prompt + response records.

Every metric is computed here from the models' full-vocabulary logits (plain torch), not from the caches.

    OMP_NUM_THREADS=1 python tools/bench_onpolicy.py    # the BENCHMARKS.md run
    python tools/bench_onpolicy.py --quick              # a smoke run

Intermediate results stay in WORKDIR (default ~/.cache/logitstore/bench-onpolicy); a rerun reuses what is
finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
STUDENT = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=True)


@dataclasses.dataclass
class Settings:
    problems: int = 1000
    heldout: int = 24
    base: int = 200
    pool: int = 300
    prompts: int = 60
    base_steps: int = 150
    rounds: int = 3
    samples: int = 1
    steps: int = 40
    eval_samples: int = 2
    max_new_tokens: int = 40
    batch: int = 8
    lr: float = 3e-3
    base_loss: str = "forward_kl"
    loss: str = "reverse_kl"
    top_k: int = 32
    seeds: int = 3
    first_seed: int = 0
    mix_ratio: float = 0.0
    split: float = 0.0
    off_teacher: int = 0
    student_layers: int = 0


QUICK = Settings(problems=200, heldout=4, base=16, pool=24, prompts=6, base_steps=8, rounds=2, steps=4,
                 eval_samples=1, max_new_tokens=16, seeds=1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def split_problems(work: Path, s: Settings) -> dict[str, Path]:
    """The problem files: base (start student), pool (off-policy arm), prompts (on-policy arm), held-out."""
    from tools.make_problems import make

    rows = make(s.problems, seed=0)
    parts = {"base": rows[:s.base], "pool": rows[s.base:s.base + s.pool], "heldout": rows[-s.heldout:]}
    parts["prompts"] = parts["pool"][:s.prompts]
    assert s.base + s.pool + s.heldout <= s.problems
    paths = {}
    for name, data in parts.items():
        paths[name] = work / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in data))
    return paths


def pruned_teacher(teacher: Path, n: int, out: Path) -> Path:
    """The teacher cut to ``n`` of its layers, evenly spaced with the first and the last kept, saved with its
    tokenizer into ``out`` (once; a workdir cut to another layer count is refused)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        had = AutoConfig.from_pretrained(out).num_hidden_layers
        if had != n:
            raise SystemExit(f"--student-layers {n}: {out} holds a student of {had} layers; use another --workdir")
        return out
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    total = model.config.num_hidden_layers
    if not 2 <= n <= total:
        raise SystemExit(f"--student-layers {n}: the teacher has {total} layers; give 2 to {total}")
    keep = [round(i * (total - 1) / (n - 1)) for i in range(n)]
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    log(f"student: the teacher's layers {keep} of {total}")
    return out


def build_once(teacher, data, out: Path, s: Settings, generation=None) -> None:
    """The teacher's scores of the reference solutions of ``data`` (a plain build), or with ``generation`` of its own
    answers to them (``--off-teacher``: sampled with seed 0)."""
    import logitstore
    from builders.config import BuildConfig
    from builders.driver import build

    if (out / "manifest.json").exists() and logitstore.open(out).manifest.complete:
        return
    build(str(teacher), data, out, BuildConfig(rule=logitstore.TopK(s.top_k), generation=generation, seed=0),
          resume=True, progress=False)


def train_once(cache, student, out: Path, s: Settings, steps: int, seed: int, loss: str) -> dict:
    from trainers.config import TrainConfig
    from trainers.loop import train

    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    return train(TrainConfig(cache=str(cache), student=str(student), output=str(out), loss=loss, max_steps=steps,
                             batch_size=s.batch, lr=s.lr, seed=seed, max_length=256, quiet=True))


class Evaluator:
    """The held-out metrics of a student, from the student's and the teacher's full-vocabulary logits."""

    def __init__(self, teacher: Path, held: Path, s: Settings):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from builders.data import load_examples
        from builders.generate import load_prompts

        self.torch, self.s = torch, s
        self.tok = AutoTokenizer.from_pretrained(teacher)
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
        self.prompts = list(load_prompts(held, self.tok))  # (record, prompt ids, answer)
        self.refs = list(load_examples(held, self.tok))  # the reference solutions as targets

    def logprobs(self, model, seqs: list[list[int]]) -> list[np.ndarray]:
        """Full-vocabulary float64 log-softmax ``[T, V]`` of each sequence (right-padded batches of 8)."""
        torch, out = self.torch, []
        for a in range(0, len(seqs), 8):
            part = seqs[a:a + 8]
            T = max(len(x) for x in part)
            ids = torch.zeros((len(part), T), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, x in enumerate(part):
                ids[i, :len(x)], mask[i, :len(x)] = torch.as_tensor(x), 1
            with torch.no_grad():
                z = model(input_ids=ids, attention_mask=mask).logits
            out += [torch.log_softmax(z[i, :len(x)].double(), -1).numpy() for i, x in enumerate(part)]
        return out

    def __call__(self, student_dir: Path, seed: int) -> dict:
        from transformers import AutoModelForCausalLM

        from builders.verifiers import get_verifier

        torch, s = self.torch, self.s
        student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
        eos = student.generation_config.eos_token_id
        samples, right = [], []
        verify = get_verifier("last-number")
        for record, prompt, answer in self.prompts:
            ids = torch.as_tensor(np.array(prompt, np.int64))[None]
            torch.manual_seed(int.from_bytes(hashlib.blake2b(f"eval/{seed}/{record}".encode(),
                                                             digest_size=4).digest(), "little"))
            with torch.no_grad():
                out = student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                       temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=s.max_new_tokens,
                                       num_return_sequences=s.eval_samples, pad_token_id=eos)
                greedy = student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=s.max_new_tokens, pad_token_id=eos)
            for row in out.tolist():
                resp = row[len(prompt):]
                samples.append((len(prompt), list(prompt) + resp[:next((i + 1 for i, t in enumerate(resp)
                                                                        if t == eos), len(resp))]))
            right.append(bool(verify(self.tok.decode(greedy[0, len(prompt):], skip_special_tokens=True), answer)))
        seqs = [x for _, x in samples]
        rkl_sum = n_tok = 0.0
        for (start, x), ls, lt in zip(samples, self.logprobs(student, seqs), self.logprobs(self.teacher, seqs)):
            rows = np.arange(start - 1, len(x) - 1)  # the positions that predict the response
            rkl_sum += float((np.exp(ls[rows]) * (ls[rows] - lt[rows])).sum())
            n_tok += rows.size
        ce_sum = ce_n = 0.0
        for ex, lp in zip(self.refs, self.logprobs(student, [list(map(int, e.input_ids)) for e in self.refs])):
            t = np.flatnonzero(ex.loss_mask[1:]) + 1
            ce_sum += float(-lp[t - 1, ex.input_ids[t]].sum())
            ce_n += t.size
        return {"reverse_kl": rkl_sum / n_tok, "heldout_ce": ce_sum / ce_n, "pass_rate": float(np.mean(right)),
                "sample_tokens": int(n_tok), "mean_response_tokens": n_tok / len(samples)}


def off_policy_selection(pool: Path, targets: int, seed: int, out: Path) -> tuple[Path, int]:
    """A seeded random part of the pool with at least ``targets`` target positions (the on-policy arm's)."""
    import logitstore
    from logitstore.selection import Selection, cache_fingerprint, save_selection

    cache = logitstore.open(pool)
    rows = cache.sql("SELECT seq_id, n_targets FROM sequences").fetchall()
    rows.sort(key=lambda r: hashlib.blake2b(f"{seed}/{r[0]}".encode(), digest_size=8).digest())
    ids, total = [], 0
    for sid, n in rows:
        if total >= targets:
            break
        ids.append(sid)
        total += n
    if total < targets:
        raise SystemExit(f"the pool holds {total} target positions, fewer than the on-policy arm's {targets}: raise "
                         "--pool-samples")
    save_selection(out, Selection(cache=str(pool), cache_fingerprint=cache_fingerprint(cache.manifest),
                                  seq_ids=ids, query=f"random part of the pool, seed {seed}, >= {targets} targets"))
    return out, total


def throughput(teacher: Path, start: Path, work: Path, s: Settings, repeats: int = 2) -> dict:
    """Teacher-scoring positions/s of a distill round (round 1 of seed 0, rebuilt: the same policy and seed give the
    same samples) against a plain build of the same prompts and responses, alternately ``repeats`` times."""
    from transformers import AutoTokenizer

    import logitstore
    from builders.config import BuildConfig, PolicyConfig
    from builders.driver import build
    from builders.generate import GenerationConfig
    from tools.distill import round_seed

    tok = AutoTokenizer.from_pretrained(teacher)
    gen = GenerationConfig(n=s.samples, max_new_tokens=s.max_new_tokens, temperature=1.0, verifier="last-number")
    round_cfg = BuildConfig(rule=logitstore.TopK(s.top_k), generation=gen, seed=round_seed(0, 1),
                            policy=PolicyConfig(path=str(start), backend_options={"dtype": "fp32", "device": "cpu"},
                                                round=1))
    got = {"round": [], "plain": []}
    for rep in range(repeats):
        out = work / f"throughput-round-{rep}"
        if not (out / "manifest.json").exists():
            build(str(teacher), work / "prompts.jsonl", out, round_cfg, progress=False)
        c = logitstore.open(out)
        got["round"].append(c.manifest)
        data = work / "throughput.jsonl"
        data.write_text("".join(json.dumps({"prompt": tok.decode(q.input_ids[:q.pos[0]]),
                                            "response": tok.decode(q.input_ids[q.pos[0]:])}) + "\n" for q in c))
        plain = work / f"throughput-plain-{rep}"
        if not (plain / "manifest.json").exists():
            build(str(teacher), data, plain, BuildConfig(rule=logitstore.TopK(s.top_k)), progress=False)
        got["plain"].append(logitstore.open(plain).manifest)
    rate = {k: sum(m.positions for m in ms) / sum(m.build["timings_s"]["teacher_score"] for m in ms)
            for k, ms in got.items()}
    r = got["round"][0].build
    return {"round_positions": got["round"][0].positions, "plain_positions": got["plain"][0].positions,
            "round_teacher_pos_per_s": rate["round"], "plain_teacher_pos_per_s": rate["plain"],
            "ratio": rate["round"] / rate["plain"], "repeats": repeats,
            "per_run_teacher_pos_per_s": {k: [m.positions / m.build["timings_s"]["teacher_score"] for m in ms]
                                          for k, ms in got.items()},
            "round_timings_s": r["timings_s"], "round_elapsed_s": r["elapsed_s"],
            "plain_elapsed_s": got["plain"][0].build["elapsed_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "logitstore" / "bench-onpolicy"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report", nargs="+", metavar="RESULTS", help="print the table of these results.json files "
                    "(copies kept from earlier runs of one workdir), combined per seed, and run nothing")
    for f in dataclasses.fields(Settings):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    a = ap.parse_args(argv)
    if a.report:
        report(combine(a.report))
        return 0
    s = QUICK if a.quick else Settings()
    s = dataclasses.replace(s, **{f.name: getattr(a, f.name) for f in dataclasses.fields(Settings)
                                  if getattr(a, f.name) is not None})
    work = Path(a.workdir) / ("quick" if a.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    from transformers import LlamaConfig

    from builders.embedded import prepare_embedded_teacher
    from tools.distill import DistillConfig, run

    teacher = prepare_embedded_teacher()
    files = split_problems(work, s)
    cfg = work / "student-config" / "config.json"
    cfg.parent.mkdir(exist_ok=True)
    LlamaConfig(**STUDENT).to_json_file(str(cfg))
    init = pruned_teacher(teacher, s.student_layers, work / "student-init") if s.student_layers else cfg
    log("start: the teacher scores the base problems' solutions; a student is distilled on them")
    build_once(teacher, files["base"], work / "base", s)
    start = work / "start-student"
    train_once(work / "base", init, start, s, s.base_steps, seed=0, loss=s.base_loss)
    log("pool: the teacher scores the pool problems' solutions (the off-policy arm's data)")
    build_once(teacher, files["pool"], work / "pool", s)
    if s.off_teacher:
        log("pool: the teacher answers the pool problems and scores its answers (the teacher-generated arm's data)")
        from builders.generate import GenerationConfig

        build_once(teacher, files["pool"], work / "pool-teacher", s,
                   GenerationConfig(n=1, max_new_tokens=s.max_new_tokens, temperature=1.0, verifier="last-number"))
    ev = Evaluator(teacher, files["heldout"], s)
    results = {"settings": dataclasses.asdict(s), "start": ev(start, 0), "arms": []}
    log(f"start student: {results['start']}")
    from builders.config import BuildConfig
    from builders.generate import GenerationConfig
    from logitstore import TopK
    from trainers.config import TrainConfig

    for seed in range(s.first_seed, s.first_seed + s.seeds):
        log(f"seed {seed}: on-policy, {s.rounds} rounds")
        gen = GenerationConfig(n=s.samples, max_new_tokens=s.max_new_tokens, temperature=1.0, verifier="last-number")
        dc = DistillConfig(teacher=str(teacher), prompts=str(files["prompts"]), student=str(start),
                           output=str(work / f"on-{seed}"), rounds=s.rounds, seed=seed,
                           build=BuildConfig(rule=TopK(s.top_k), generation=gen),
                           train=TrainConfig(loss=s.loss, max_steps=s.steps, batch_size=s.batch, lr=s.lr, seed=seed,
                                             max_length=256, quiet=True))
        records = run(dc, resume=True, progress=False)
        targets = sum(r["targets"] for r in records)
        on = ev(work / f"on-{seed}" / f"round-{s.rounds:03d}" / "student", seed)
        mixed = None
        if s.mix_ratio > 0:
            log(f"seed {seed}: on-policy mixed with the base cache at ratio {s.mix_ratio}, {s.rounds} rounds")
            mix_dir = work / f"mix{s.mix_ratio:g}-{seed}"
            run(dataclasses.replace(dc, output=str(mix_dir),
                                    train=dc.train.replace(mix_cache=str(work / "base"), mix_ratio=s.mix_ratio)),
                resume=True, progress=False)
            mixed = ev(mix_dir / f"round-{s.rounds:03d}" / "student", seed)
        split = None
        if s.split > 0:
            split = split_arm(dc, files, work, s, seed, targets, ev)
        log(f"seed {seed}: off-policy, {targets} teacher-scored target positions of the pool")
        sels = {}
        for pool in dict.fromkeys(p for _, _, p in off_arms(s)):
            tag = "" if pool == "pool" else f"-{pool}"
            sels[pool] = off_policy_selection(work / pool, targets, seed, work / f"off{tag}-{seed}.selection.json")
        got = sels["pool"][1]
        arm = {"seed": seed, "on_policy": on, "on_targets": targets, "off_targets": got, "rounds": records}
        if s.off_teacher:
            arm["off_teacher_targets"] = sels["pool-teacher"][1]
        if mixed is not None:
            arm["on_policy_mixed"] = mixed
        if split is not None:
            arm["on_policy_split"], arm["split_targets"] = split
        for name, loss, pool in off_arms(s):  # the same loss, forward KL if that differs, teacher answers
            train_once(sels[pool][0], start, work / f"{name}-{seed}", s, s.rounds * s.steps, seed, loss)
            arm[name] = ev(work / f"{name}-{seed}", seed)
        results["arms"].append(arm)
        log(f"seed {seed}: " + "; ".join(f"{k} {arm[k]}" for k in on_arms(s) + [n for n, _, _ in off_arms(s)]))
    log("throughput: a round's teacher scoring against a plain build of the same tokens")
    results["throughput"] = throughput(teacher, start, work, s)
    results["seconds"] = time.time() - t0
    (work / "results.json").write_text(json.dumps(results, indent=1))
    report(results)
    return 0


def split_arm(dc, files: dict, work: Path, s: Settings, seed: int, targets: int, ev) -> tuple[dict, dict]:
    """``--split S``: the on-policy arm's teacher tokens split, S to rounds over the first S x prompts pool prompts
    and the rest to a seeded part of the pool's reference solutions (scored once, like the off-policy arm's
    data), the two mixed per batch at ratio S (GKD's lambda at equal teacher tokens). Returns its metrics and
    its teacher-scored target positions (on-policy, off-policy)."""
    n = max(1, round(s.split * s.prompts))
    prompts = work / f"prompts-split{s.split:g}.jsonl"
    prompts.write_text("".join(files["prompts"].read_text().splitlines(keepends=True)[:n]))
    off_budget = round((1 - s.split) * targets)
    sel, got = off_policy_selection(work / "pool", off_budget, seed + 1000, work / f"split{s.split:g}-{seed}.json")
    out = work / f"split{s.split:g}-{seed}"
    log(f"seed {seed}: split arm: rounds over {n} prompts, mixed at ratio {s.split} with {got} pool targets")
    from tools.distill import run

    records = run(dataclasses.replace(dc, prompts=str(prompts), output=str(out),
                                      train=dc.train.replace(mix_cache=str(sel), mix_ratio=s.split)),
                  resume=True, progress=False)
    on = sum(r["targets"] for r in records)
    return ev(out / f"round-{s.rounds:03d}" / "student", seed), {"on_policy": on, "off_policy": got}


def on_arms(s: Settings) -> list[str]:
    """The on-policy arms: the rounds alone, mixed with the base cache (``--mix-ratio``), and the split arm
    (``--split``)."""
    return ["on_policy"] + (["on_policy_mixed"] if s.mix_ratio > 0 else []) + \
        (["on_policy_split"] if s.split > 0 else [])


def off_arms(s: Settings) -> list[tuple[str, str, str]]:
    """(name, loss, data: the pool cache's directory name) of the off-policy arms."""
    return [("off_policy", s.loss, "pool")] + \
        ([("off_policy_fkl", "forward_kl", "pool")] if s.loss != "forward_kl" else []) + \
        ([("off_teacher", s.loss, "pool-teacher")] if s.off_teacher else [])


def report(res: dict) -> None:
    """The table of every arm (mean ± population sd over the seeds that ran it, [min, max]) and each on-policy arm
    against each off-policy arm, the ratio of their means over the seeds both ran."""
    from tools.cli.text import format_table

    names = [a for a in ("on_policy", "on_policy_mixed", "on_policy_split", "off_policy", "off_policy_fkl",
                         "off_teacher") if any(a in x for x in res["arms"])]
    ons, offs = [a for a in names if a.startswith("on_")], [a for a in names if a.startswith("off_")]
    pairs = [(a, b) for a in ons for b in offs]
    stat = lambda v: f"{v.mean():.4f} ± {v.std():.4f} [{v.min():.4f}, {v.max():.4f}]"  # noqa: E731
    runs = lambda *arms: [x for x in res["arms"] if all(a in x for a in arms)]  # noqa: E731
    rows = []
    for key in ("reverse_kl", "heldout_ce", "pass_rate"):
        vals = {a: np.array([x[a][key] for x in runs(a)]) for a in names}
        rel = []
        for a, b in pairs:
            both = runs(a, b)
            on, off = (float(np.mean([x[c][key] for x in both])) for c in (a, b))
            rel.append(f"{100 * (on / off - 1):+.1f}%" if off else "n/a")
        rows.append([key, f"{res['start'][key]:.4f}", *[stat(vals[a]) for a in names], *rel])
    print(format_table(["metric", "start", *[f"{a} ({len(runs(a))} seeds: mean ± sd [min, max])" for a in names],
                        *[f"{a} vs {b}" for a, b in pairs]], rows))
    t = res["throughput"]
    print(f"\nteacher scoring: round {t['round_teacher_pos_per_s']:.1f} pos/s, plain build "
          f"{t['plain_teacher_pos_per_s']:.1f} pos/s: {t['ratio']:.3f}x; total {res['seconds'] / 60:.1f} min")


def combine(paths: list[str]) -> dict:
    """The runs of several results files of one workdir (``--first-seed`` runs, or reruns with more arms) as one:
    per seed, the arms of every file (the last file's where two hold the same arm)."""
    got = [json.loads(Path(p).read_text()) for p in paths]
    start = {json.dumps(g["start"], sort_keys=True) for g in got}
    if len(start) != 1:
        raise SystemExit("these results files start from different students: combine runs of one workdir only")
    seeds: dict[int, dict] = {}
    for g in got:
        for arm in g["arms"]:
            seeds.setdefault(arm["seed"], {}).update(arm)
    return {**got[-1], "arms": [seeds[k] for k in sorted(seeds)], "seconds": sum(g["seconds"] for g in got)}


if __name__ == "__main__":
    sys.exit(main())
