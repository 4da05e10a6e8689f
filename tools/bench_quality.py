"""Benchmark, the headline: is a student trained from the cache as good as one trained with the teacher online?

Teacher: the embedded SmolLM2-135M-Instruct. Data: English text that ships with Python
(``pydoc_data.topics``, then for the long regime the docstrings of ``DOC_MODULES``) cut into records of
<= 128 tokens; the last 48 records of ``pydoc_data.topics`` are held out.
Student: a 3-layer Llama (hidden 192, the teacher's tokenizer) from scratch. Two regimes:

  short   200 records, 200 steps of batch 4 (~100k training tokens)
  long    1000 records, 1000 steps of batch 4 (5x the records and the tokens)

Configurations (``--only``): ``ce`` (labels only: the floor, a), ``online`` (forward KL against the
teacher's full distribution at every step: the ceiling, d; the teacher's logprobs are computed once
into a float32 memmap and read back, which is the same target as a forward pass per step), and
caches trained with ``logitstore train`` (``CONFIGS``: top-k with each tail policy, sampled, exact head +
tail draws, tempered proposals; ``-L``: the same cache trained with ``--tail sampled_label``, the label's exact
target in place of its draws; ``-S``: systematic draws (``build --systematic``); ``-I``, ``-SI``, ``-LI``, ``-SLI``:
trained with ``--estimator inclusion``; every other configuration with ``--estimator counts``; ``-S-other``,
``-S-label``: a systematic cache trained with ``--tail other`` / ``label``, its drawn ids as an exact support and
the rest as a bucket; a ``-h`` suffix: the cache built with ``--scalars fp16``). The caches are built by
the builder's driver, extraction and writer (``builders.driver.build_with``) from the teacher's final hidden
states, computed once per record and replayed for every cache (the body is the same for every rule; only the
extraction differs). Every configuration runs with ``--seeds`` seeds (student init and data order); each seed's
recovered fraction is paired with the same seed's (a) and (d): ``(a - x) / (a - d)``.

Reported per configuration: held-out label CE and the exact full-vocabulary KL(teacher || student)
(both from the teacher's and the student's logits), the student's expected calibration error (top-1
next-token confidence, 15 equal-width bins), the cache's bytes per token (all fields; the shards,
without the id map's fixed ~0.4 MB), and, from ``--angles``, RS-KD's gradient diagnostic: for a
fixed student (the seed-0 CE student of the short regime) and a fixed batch (the first 32
training records), the angle between the gradient of the cached loss and that of the full forward
KL (each loss averaged over positions as in training), and the ratio of their norms, in three forms
(``angles``): w.r.t. the student's logits per position (one concatenated [N x V] vector), the same
averaged over the batch (RS-KD's Table 3), and w.r.t. the student's parameters.

    python tools/bench_quality.py --regime short            # all configurations, 3 seeds
    python tools/bench_quality.py --regime long --only ce,online,t4-d16-T2,k32-label
    python tools/bench_quality.py --angles                  # the gradient diagnostic (no training)
    python tools/bench_quality.py --report --plot docs/quality.png   # tables from every result so far
    python tools/bench_quality.py --quick                   # a smoke run: tiny regime, 1 seed

Results are one JSON file per (regime, configuration, seed) under ``WORKDIR/results``; a run skips
what is there, so runs combine and resume. Caches, teacher logprobs and students stay in WORKDIR.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STUDENT = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=3, num_attention_heads=3,
               num_key_value_heads=1, vocab_size=49152, max_position_embeddings=1024, tie_word_embeddings=True)
LENGTH, EVAL_RECORDS, LR, BATCH = 128, 48, 3e-3, 4
REGIMES = {"short": (200, 200), "long": (1000, 1000), "quick": (24, 12)}  # records, steps
#: name -> (build flags as a dict of BuildConfig pieces, train loss, tail policy); None: no cache. A last part with
#: ``S``: systematic draws (``--systematic``); with ``I``: trained with ``--estimator inclusion`` (``estimator_of``)
CONFIGS = {
    "ce": (None, "ce", "other"),
    "online": (None, "forward_kl", "full"),
    "k32-other": ({"top_k": 32}, "forward_kl", "other"),
    "k32-label": ({"top_k": 32}, "forward_kl", "label"),
    "k32-residual": ({"top_k": 32}, "forward_kl", "residual"),
    "k32-entropy": ({"top_k": 32}, "forward_kl", "entropy"),
    "k8-other": ({"top_k": 8}, "forward_kl", "other"),
    "s50": ({"sample": 50}, "forward_kl", "sampled"),
    "s50-T2": ({"sample": 50, "T": 2.0}, "forward_kl", "sampled"),
    "t8-d24": ({"top_k": 8, "tail_draws": 24}, "forward_kl", "sampled"),
    "t16-d16": ({"top_k": 16, "tail_draws": 16}, "forward_kl", "sampled"),
    "t8-d24-T2": ({"top_k": 8, "tail_draws": 24, "T": 2.0}, "forward_kl", "sampled"),
    "t4-d16-T2": ({"top_k": 4, "tail_draws": 16, "T": 2.0}, "forward_kl", "sampled"),
    "t4-d8-T2": ({"top_k": 4, "tail_draws": 8, "T": 2.0}, "forward_kl", "sampled"),
    "t4-d16-T2-L": ({"top_k": 4, "tail_draws": 16, "T": 2.0}, "forward_kl", "sampled_label"),
    "t4-d8-T2-L": ({"top_k": 4, "tail_draws": 8, "T": 2.0}, "forward_kl", "sampled_label"),
    "s50-T2-I": ({"sample": 50, "T": 2.0}, "forward_kl", "sampled"),
    "t4-d16-T2-I": ({"top_k": 4, "tail_draws": 16, "T": 2.0}, "forward_kl", "sampled"),
    "t4-d8-T2-I": ({"top_k": 4, "tail_draws": 8, "T": 2.0}, "forward_kl", "sampled"),
    "t4-d16-T2-LI": ({"top_k": 4, "tail_draws": 16, "T": 2.0}, "forward_kl", "sampled_label"),
    "t4-d16-T2-S": ({"top_k": 4, "tail_draws": 16, "T": 2.0, "sys": True}, "forward_kl", "sampled"),
    "t4-d8-T2-S": ({"top_k": 4, "tail_draws": 8, "T": 2.0, "sys": True}, "forward_kl", "sampled"),
    "t4-d16-T2-SI": ({"top_k": 4, "tail_draws": 16, "T": 2.0, "sys": True}, "forward_kl", "sampled"),
    "t4-d8-T2-SI": ({"top_k": 4, "tail_draws": 8, "T": 2.0, "sys": True}, "forward_kl", "sampled"),
    "s50-T2-S": ({"sample": 50, "T": 2.0, "sys": True}, "forward_kl", "sampled"),
    "s50-T2-SI": ({"sample": 50, "T": 2.0, "sys": True}, "forward_kl", "sampled"),
    "s32-SI": ({"sample": 32, "sys": True}, "forward_kl", "sampled"),
    "s24-SI": ({"sample": 24, "sys": True}, "forward_kl", "sampled"),
    "s16-SI": ({"sample": 16, "sys": True}, "forward_kl", "sampled"),
    "s24-SLI": ({"sample": 24, "sys": True}, "forward_kl", "sampled_label"),
    "s32-SLI": ({"sample": 32, "sys": True}, "forward_kl", "sampled_label"),
    "s32-SI-h": ({"sample": 32, "sys": True, "half": True}, "forward_kl", "sampled"),
    "s36-SI": ({"sample": 36, "sys": True}, "forward_kl", "sampled"),
    "s36-SI-h": ({"sample": 36, "sys": True, "half": True}, "forward_kl", "sampled"),
    "s40-SI-h": ({"sample": 40, "sys": True, "half": True}, "forward_kl", "sampled"),
    "s24-S-other": ({"sample": 24, "sys": True}, "forward_kl", "other"),
    "s24-S-label": ({"sample": 24, "sys": True}, "forward_kl", "label"),
    "s16-S-label": ({"sample": 16, "sys": True}, "forward_kl", "label"),
    "s32-S-label": ({"sample": 32, "sys": True}, "forward_kl", "label"),
    "s32-T1.5-SI": ({"sample": 32, "T": 1.5, "sys": True}, "forward_kl", "sampled"),
    "s24-T1.5-SI": ({"sample": 24, "T": 1.5, "sys": True}, "forward_kl", "sampled"),
    "s16-T2-SI": ({"sample": 16, "T": 2.0, "sys": True}, "forward_kl", "sampled"),
    "s32-S": ({"sample": 32, "sys": True}, "forward_kl", "sampled"),
    "s32": ({"sample": 32}, "forward_kl", "sampled"),
}


def estimator_of(name: str) -> str:
    """The trainer's ``--estimator`` of a configuration: ``inclusion`` for the ``-I`` names, else ``counts``."""
    return "inclusion" if name.removesuffix("-h").rsplit("-", 1)[-1] in ("I", "LI", "SI", "SLI") else "counts"


#: standard-library modules whose docstrings extend the long regime's training text (pydoc_data.topics gives ~735)
DOC_MODULES = ("argparse collections contextlib csv dataclasses datetime decimal email.message fractions functools "
               "heapq http.client inspect io ipaddress itertools json logging pathlib pickle random re shutil "
               "sqlite3 statistics string subprocess tarfile tempfile textwrap threading typing unittest "
               "urllib.parse uuid zipfile").split()


def _chunks(tokenizer, words: list[str]) -> list[str]:
    out, step = [], int(LENGTH * 0.7)
    for i in range(0, len(words), step):
        out.append(tokenizer.decode(tokenizer(" ".join(words[i:i + step]))["input_ids"][:LENGTH]))
    return out


def topic_records(tokenizer) -> list[str]:
    """All of pydoc_data.topics as texts of about LENGTH tokens, in a fixed order."""
    from pydoc_data.topics import topics

    return _chunks(tokenizer, " ".join(" ".join(topics[k].split()) for k in sorted(topics)).split())


def records(tokenizer, n: int) -> tuple[list[str], list[str]]:
    """``n`` training texts and EVAL_RECORDS held-out texts of about LENGTH tokens, in a fixed order. Held out:
    the last records of pydoc_data.topics; training: the others, then (the long regime) stdlib docstrings."""
    import importlib
    import inspect

    top = topic_records(tokenizer)
    train, held = top[:-EVAL_RECORDS], top[-EVAL_RECORDS:]
    if len(train) < n:
        docs: dict[str, None] = {}
        for name in DOC_MODULES:
            mod = importlib.import_module(name)
            for k in sorted(dir(mod)):
                d = None if k.startswith("_") else inspect.getdoc(getattr(mod, k))
                if d:
                    docs.setdefault(" ".join(d.split()))
        train += _chunks(tokenizer, " ".join(docs).split())
    if len(train) < n:
        raise SystemExit(f"only {len(train)} training records of text are available; {n} asked")
    return train[:n], held


def token_ids(path: Path, tokenizer) -> list[list[int]]:
    """The token ids a build gives the records of ``path`` (the builder's own tokenisation and truncation)."""
    from builders.data import load_examples

    return [ex.input_ids.tolist() for ex in load_examples(path, tokenizer, max_length=LENGTH)]


def rule_of(spec: dict):
    from logitstore.rules import Sampled, TopK, TopKTail

    t, s = spec.get("T", 1.0), spec.get("sys", False)
    if "sample" in spec:
        return Sampled(spec["sample"], proposal_temperature=t, systematic=s)
    if "tail_draws" in spec:
        return TopKTail(spec["top_k"], spec["tail_draws"], t, s)
    return TopK(spec["top_k"])


class Bench:
    """The shared pieces of one regime: data, teacher logprobs (memmaps), caches, student config."""

    def __init__(self, work: Path, regime: str):
        import numpy as np
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

        from builders.embedded import prepare_embedded_teacher

        self.work, self.regime = work, regime
        self.n_train, self.steps = REGIMES[regime]
        self.tdir = prepare_embedded_teacher()
        tok = AutoTokenizer.from_pretrained(self.tdir)
        train, held = records(tok, REGIMES["long"][0])
        self.data = work / f"train-{regime}.jsonl"
        for path, part in ((self.data, train[:self.n_train]), (work / "eval.jsonl", held)):
            if not path.exists():
                path.write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
        # every regime's records are a prefix of the long regime's: the teacher's logprobs of record i are shared
        self.train_ids, self.eval_ids = token_ids(self.data, tok), token_ids(work / "eval.jsonl", tok)
        self.scfg = work / "student" / "config.json"
        self.scfg.parent.mkdir(parents=True, exist_ok=True)
        LlamaConfig(**STUDENT).to_json_file(str(self.scfg))
        self._teacher = self._backend = None
        self.tok = tok
        self.np, self.torch = np, torch
        self.AutoModel = AutoModelForCausalLM

    def teacher(self):
        if self._teacher is None:
            self._teacher = self.AutoModel.from_pretrained(self.tdir, dtype=self.torch.float32).eval()
        return self._teacher

    def backend(self):
        """The build's transformers backend around the teacher, replaying each sequence's final hidden states
        once computed (``replay_backend``): every cache goes through the builder's extraction and writer."""
        if self._backend is None:
            from logitstore.identity import model_identity

            self._backend = replay_backend(self.teacher(), self.tok, model_identity(str(self.tdir), self.teacher(),
                                                                                  "fp32"), str(self.tdir))
        return self._backend

    def teacher_logprobs(self, name: str, seqs: list[list[int]]):
        """``[rows, LENGTH - 1, V]`` float32 memmap of the teacher's full log-softmax of ``seqs`` (row i: seqs[i]),
        computed once per row: a sparse file of the long regime's size whose computed rows are listed beside it."""
        np, torch = self.np, self.torch
        rows = REGIMES["long"][0] if name == "train" else len(seqs)
        path, done_file = self.work / f"teacher-{name}.f32", self.work / f"teacher-{name}.done.json"
        shape = (rows, LENGTH - 1, STUDENT["vocab_size"])
        done = set(json.loads(done_file.read_text())) if done_file.exists() and path.exists() else set()
        mm = np.memmap(path, np.float32, "r+" if path.exists() else "w+", shape=shape)
        todo = [i for i in range(len(seqs)) if i not in done]
        if todo:
            t = time.perf_counter()
            with torch.inference_mode():
                backend = self.backend()
                for a in range(0, len(todo), 8):  # the head over the (replayed) final hidden states
                    rows = todo[a:a + 8]
                    h = backend.hidden([seqs[i] for i in rows])
                    for j, i in enumerate(rows):
                        n = len(seqs[i]) - 1
                        mm[i, :n] = torch.log_softmax(backend.head(h[j, :n]), -1).numpy()
            mm.flush()
            done_file.write_text(json.dumps(sorted(done | set(todo))))
            print(f"  teacher logprobs of {len(todo)} {name} records in {time.perf_counter() - t:.0f} s", flush=True)
        return mm

    def cache(self, spec: dict) -> Path:
        from builders.config import BuildConfig
        from builders.driver import build_with
        from logitstore.codec import Codec

        key = "-".join(f"{k}{v}" for k, v in sorted(spec.items()))
        path = self.work / f"cache-{self.regime}-{key}"
        if not (path / "manifest.json").exists():
            t = time.perf_counter()
            codec = Codec(scalars="fp16") if spec.get("half") else Codec()
            build_with(self.backend(), str(self.tdir), self.data, path,
                       BuildConfig(rule=rule_of(spec), codec=codec, max_length=LENGTH), progress=False)
            print(f"  built {path.name} in {time.perf_counter() - t:.0f} s", flush=True)
        return path


def replay_backend(model, tokenizer, identity: dict, name: str):
    """A ``TransformersBackend`` whose body runs once per token sequence: ``hidden`` keeps each sequence's final
    hidden states and replays them (right-padded, as the body gives them), so the benchmark's many caches of one
    dataset differ only in what the builder's own extraction and writer make of the same teacher states."""
    import torch

    from builders.backends.hf import TransformersBackend

    class Replay(TransformersBackend):
        def hidden(self, input_ids):
            states: dict[tuple, torch.Tensor] = self.__dict__.setdefault("states", {})  # the set-up's check calls this
            new = [x for x in {tuple(int(t) for t in x) for x in input_ids} if x not in states]
            for a in range(0, len(new), 8):
                chunk = new[a:a + 8]
                h = super().hidden([list(x) for x in chunk])
                for j, x in enumerate(chunk):
                    states[x] = h[j, :len(x)].clone()
            rows = [states[tuple(int(t) for t in x)] for x in input_ids]
            out = rows[0].new_zeros((len(rows), max(r.shape[0] for r in rows), rows[0].shape[1]))
            for j, r in enumerate(rows):
                out[j, :r.shape[0]] = r
            return out

    return Replay.from_model(model, tokenizer, identity, name=name)


def bytes_per_token(cache: Path) -> float:
    """Shard bytes per cached position: every per-token field (ids, values, counts, label logprob, entropy, tail
    mass, positions, masks, input ids) and the per-sequence columns; not the id map, a fixed ~0.4 MB per cache."""
    import logitstore

    m = logitstore.open(cache).manifest
    return m.bytes / m.positions


def evaluate(model, bench: Bench) -> dict[str, float]:
    """Held-out label CE, exact full-vocabulary KL(teacher || student) and top-1 ECE (15 bins), per token."""
    np, torch = bench.np, bench.torch
    lt_all = bench.teacher_logprobs("eval", bench.eval_ids)
    ce = kl = 0.0
    conf, hit = [], []
    model.eval()
    with torch.inference_mode():
        for i, s in enumerate(bench.eval_ids):
            ids = torch.tensor(s)[None]
            ls = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            lt = torch.from_numpy(np.asarray(lt_all[i, :len(s) - 1])).double()
            ce += float(-ls.gather(1, ids[0, 1:, None]).sum())
            kl += float((lt.exp() * (lt - ls)).sum())
            top = ls.max(-1)
            conf.append(top.values.exp().numpy())
            hit.append((top.indices == ids[0, 1:]).numpy())
    n = sum(len(s) - 1 for s in bench.eval_ids)
    return {"ce": ce / n, "kl": kl / n, "ece": ece(np.concatenate(conf), np.concatenate(hit))}


def ece(confidence, correct, bins: int = 15) -> float:
    """Expected calibration error of top-1 predictions: sum_b n_b / N |accuracy_b - confidence_b|."""
    import numpy as np

    b = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for k in range(bins):
        m = b == k
        if m.any():
            total += m.mean() * abs(correct[m].mean() - confidence[m].mean())
    return float(total)


def train_online(bench: Bench, out: Path, seed: int):
    """(d): the trainer's optimiser, schedule and batches; the target is the teacher's full distribution."""
    import logitstore
    from logitstore.writer import sequence_id
    from trainers.config import TrainConfig
    from trainers.data import StreamingLoader
    from trainers.loop import Body, lr_schedule, make_optimizer
    from trainers.student import load_student

    np, torch = bench.np, bench.torch
    lt_all = bench.teacher_logprobs("train", bench.train_ids)
    row_of = {sequence_id(np.asarray(s, np.int32)): i for i, s in enumerate(bench.train_ids)}
    cache = bench.cache({"top_k": 8})  # any cache of the data: the batches (order, padding) come from it
    cfg = TrainConfig(cache=str(cache), student=str(bench.scfg), output=str(out), max_steps=bench.steps,
                      batch_size=BATCH, max_length=LENGTH, lr=LR, seed=seed)
    student = load_student(str(bench.scfg), manifest=logitstore.open(cache).manifest, seed=seed)
    torch.manual_seed(seed)
    body = Body(student)
    opt = make_optimizer(student.model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg))
    it = iter(StreamingLoader(str(cache), batch_size=BATCH, max_length=LENGTH, seed=seed))
    student.model.train()
    for _ in range(bench.steps):
        b = next(it)
        sel = b["target_mask"]
        rows = torch.tensor([row_of[s] for s in b["seq_ids"]])[:, None].expand_as(sel)[sel]
        lt = torch.from_numpy(np.stack([lt_all[r, p - 1] for r, p in zip(rows.tolist(), b["pos"][sel].tolist())]))
        ls = torch.log_softmax(student.head(body(b)[sel]), -1)
        loss = (lt.exp() * (lt - ls)).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return student.model


def run_one(bench: Bench, name: str, seed: int) -> dict:
    from trainers.config import TrainConfig
    from trainers.loop import train

    spec, loss, tail = CONFIGS[name]
    out = bench.work / "students" / bench.regime / f"{name}-seed{seed}"
    t = time.perf_counter()
    res: dict = {"regime": bench.regime, "config": name, "seed": seed, "loss": loss, "tail": tail,
                 "estimator": estimator_of(name)}
    if name == "online":
        model = train_online(bench, out, seed)
    else:
        cache = bench.cache(spec or {"top_k": 8})
        if spec is not None:
            res.update(bytes_per_token=bytes_per_token(cache), rule=rule_of(spec).to_dict())
        train(TrainConfig(cache=str(cache), student=str(bench.scfg), output=str(out), loss=loss, tail=tail,
                          estimator=estimator_of(name),
                          max_steps=bench.steps, batch_size=BATCH, max_length=LENGTH, lr=LR, seed=seed, quiet=True,
                          log_every=bench.steps, resume=(out / "checkpoints").exists()))
        model = bench.AutoModel.from_pretrained(out, dtype=bench.torch.float32)
    res.update(evaluate(model, bench), seconds=time.perf_counter() - t)
    return res


def _angle(g, ref) -> tuple[float, float]:
    """Angle in degrees between two gradients (flattened) and the ratio of their norms."""
    g, ref = g.reshape(-1).double(), ref.reshape(-1).double()
    cos = float((g @ ref) / (g.norm() * ref.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos)))), float(g.norm() / ref.norm())


def angles(bench: Bench, names: list[str]) -> list[dict]:
    """RS-KD's diagnostic: angle and norm ratio of each cached loss's gradient against the full forward KL's, for
    the seed-0 CE student of the short regime on the first 32 training records of each cache (the same records in
    every cache: builds order them deterministically). Three forms of one gradient:
      ``position``  w.r.t. the student's logits, one concatenated [N x V] vector (each position's own error,
                    so a drawing rule's angle includes its per-position sampling noise);
      ``batch``     w.r.t. the student's logits, averaged over the batch's positions into one V-vector
                    (RS-KD, Table 3: "batch averaged gradient vector");
      ``params``    w.r.t. the student's parameters (what the optimiser receives: the logit gradients pulled
                    back through the network, so noise that is independent across positions averages out)."""
    import logitstore
    from logitstore.writer import sequence_id
    from trainers.data import StreamingLoader
    from trainers.evaluation import batch_targets
    from trainers.losses import Objective
    from trainers.view import student_view_from_logits

    np, torch = bench.np, bench.torch
    student = bench.AutoModel.from_pretrained(bench.work / "students" / "short" / "ce-seed0", dtype=torch.float32)
    params = [q for q in student.parameters() if q.requires_grad]
    lt_all = bench.teacher_logprobs("train", bench.train_ids)
    row_of = {sequence_id(np.asarray(s, np.int32)): i for i, s in enumerate(bench.train_ids)}
    out = []
    for name in names:
        spec, loss, tail = CONFIGS[name]
        if spec is None:
            continue
        cache = bench.cache(spec)
        b = next(iter(StreamingLoader(str(cache), batch_size=32, max_length=LENGTH, shuffle=False, epochs=1)))
        sel = b["target_mask"]
        logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[sel]
        z0 = logits.detach().double()
        rows = torch.tensor([row_of[s] for s in b["seq_ids"]])[:, None].expand_as(sel)[sel]
        lt = torch.from_numpy(np.stack([lt_all[r, p - 1] for r, p in zip(rows.tolist(), b["pos"][sel].tolist())]))
        g_full = (torch.softmax(z0, -1) - lt.double().exp()) / z0.shape[0]
        c = logitstore.open(cache)
        t = batch_targets(b, sel, c.manifest.vocab_size, c.rule, c.codec)
        z = z0.clone().requires_grad_(True)
        objective = Objective(loss, tail=tail, estimator=estimator_of(name))
        view = student_view_from_logits(z, t.support()[0], t.labels, **objective.view_options(t))
        objective.kd(view, t).mean().backward()
        g = z.grad
        p_full = torch.autograd.grad(logits, params, g_full.float(), retain_graph=True)
        p_g = torch.autograd.grad(logits, params, g.float())
        res = {"config": name, "positions": int(z0.shape[0])}
        for form, (x, ref) in {"position": (g, g_full), "batch": (g.mean(0), g_full.mean(0)),
                               "params": (torch.cat([q.reshape(-1) for q in p_g]),
                                          torch.cat([q.reshape(-1) for q in p_full]))}.items():
            res[f"angle_{form}_deg"], res[f"norm_ratio_{form}"] = _angle(x, ref)
        res["angle_deg"], res["norm_ratio"] = res["angle_position_deg"], res["norm_ratio_position"]
        out.append(res)
        print(f"  {name:14s} angle (position / batch / params) {res['angle_position_deg']:6.1f} "
              f"{res['angle_batch_deg']:6.1f} {res['angle_params_deg']:6.1f} deg  norm ratio "
              f"{res['norm_ratio_position']:.3f} {res['norm_ratio_batch']:.3f} {res['norm_ratio_params']:.3f}",
              flush=True)
    return out


def _sd(a) -> float:
    """The sample standard deviation (0 for one seed)."""
    return float(a.std(ddof=1)) if a.size > 1 else 0.0


def _f(a, d: int = 4) -> str:
    return f"{a.mean():.{d}f}±{_sd(a):.{d}f}" if a.size else "-"


def _pct(a) -> str:
    return f"{100 * a.mean():5.1f}±{100 * _sd(a):4.1f}%" if a.size else "-"


def report(work: Path, plot: str | None, plot_regime: str = "short") -> None:
    import numpy as np

    rows = [json.loads(p.read_text()) for p in sorted((work / "results").rglob("*.json"))]
    ang = {a["config"]: a for a in json.loads((work / "angles.json").read_text())} \
        if (work / "angles.json").exists() else {}
    for regime in REGIMES:
        got = [r for r in rows if r["regime"] == regime]
        if not got:
            continue
        by = {}
        for r in got:
            by.setdefault(r["config"], {})[r["seed"]] = r
        base, top = by.get("ce", {}), by.get("online", {})
        print(f"\nregime {regime}: {REGIMES[regime][0]} records x <= {LENGTH} tokens, {REGIMES[regime][1]} steps of "
              f"batch {BATCH}; held out {EVAL_RECORDS} records; mean ± sample std over seeds")
        print(f"{'config':14s} {'seeds':>5s} {'B/token':>8s} {'held-out CE':>15s} {'KL':>15s} {'ECE':>13s} "
              f"{'recov. CE':>14s} {'recov. KL':>14s}  angle: pos. batch param")
        for name in CONFIGS:
            if name not in by:
                continue
            seeds = sorted(by[name])
            vals = {m: np.array([by[name][s][m] for s in seeds]) for m in ("ce", "kl", "ece")}
            rec = {}
            for m in ("ce", "kl"):
                paired = [(base[s][m] - by[name][s][m]) / (base[s][m] - top[s][m]) for s in seeds
                          if s in base and s in top and not math.isclose(base[s][m], top[s][m])]
                rec[m] = np.array(paired)
                for s, v in zip(seeds, paired):
                    by[name][s][f"recovered_{m}"] = v
            bpt = by[name][seeds[0]].get("bytes_per_token")
            an = ang.get(name, {})
            print(f"{name:14s} {len(seeds):5d} {bpt or 0:8.1f} {_f(vals['ce']):>15s} {_f(vals['kl']):>15s} "
                  f"{_f(vals['ece'], 3):>13s} {_pct(rec['ce']):>14s} {_pct(rec['kl']):>14s} "
                  + "".join(f"{an.get(f'angle_{k}_deg', float('nan')):6.1f}" for k in ("position", "batch", "params")))
            if name not in ("ce", "online"):
                print(f"{'':14s} per seed (CE, KL recovered): " + ", ".join(
                    f"s{s} {100 * by[name][s].get('recovered_ce', float('nan')):.1f}% "
                    f"{100 * by[name][s].get('recovered_kl', float('nan')):.1f}%" for s in seeds))
        if plot and regime == plot_regime:
            _plot(by, plot, regime)


def _plot(by: dict, path: str, regime: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, seeds in by.items():
        pts = [s.get("recovered_kl") for s in seeds.values() if s.get("recovered_kl") is not None]
        bpt = next(iter(seeds.values())).get("bytes_per_token")
        if len(pts) < 2 or bpt is None:  # a mean and its spread need seeds: one-seed rows stay in the tables
            continue
        ax.errorbar(bpt, 100 * np.mean(pts), yerr=100 * _sd(np.asarray(pts)), fmt="o", capsize=3)
        ax.annotate(name, (bpt, 100 * np.mean(pts)), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(100, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("bytes per cached token (all fields)")
    ax.set_ylabel("recovered KL gain of online KD (%)")
    ax.set_title(f"student quality against cache size\n({regime} regime; mean ± sample std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regime", choices=["short", "long", "both"], default="short")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    ap.add_argument("--first-seed", type=int, default=0, help="run seeds FIRST_SEED .. FIRST_SEED + SEEDS - 1 (default "
                                                               "0): one seed range per process, to run seeds side by "
                                                               "side")
    ap.add_argument("--only", help="comma-separated configurations (default all): " + ", ".join(CONFIGS))
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "logitstore" / "bench-quality"))
    ap.add_argument("--angles", action="store_true", help="only the gradient diagnostic of the --only configurations "
                                                          "(needs the short ce run)")
    ap.add_argument("--report", action="store_true", help="only print the tables of the results so far")
    ap.add_argument("--plot", help="with --report: write the bytes/token vs recovered-KL plot of --regime (short "
                                   "unless long) here (PNG)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 24 records, 12 steps, 1 seed")
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if a.report:
        report(work, a.plot, "long" if a.regime == "long" else "short")
        return 0
    names = a.only.split(",") if a.only else list(CONFIGS)
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        ap.error(f"--only {','.join(bad)}: unknown; choose from {', '.join(CONFIGS)}")
    if a.angles:  # merged into what earlier --angles runs wrote, by configuration
        path, new = work / "angles.json", angles(Bench(work, "short"), names)
        old = {r["config"]: r for r in json.loads(path.read_text())} if path.exists() else {}
        old.update({r["config"]: r for r in new})
        path.write_text(json.dumps(list(old.values()), indent=1))
        return 0
    regimes = ["quick"] if a.quick else ["short", "long"] if a.regime == "both" else [a.regime]
    seeds = 1 if a.quick else a.seeds
    for regime in regimes:
        bench = Bench(work, regime)
        for seed in range(a.first_seed, a.first_seed + seeds):
            for name in names:
                res_path = work / "results" / regime / f"{name}-seed{seed}.json"
                if res_path.exists():
                    continue
                print(f"{regime} {name} seed {seed} ...", flush=True)
                res = run_one(bench, name, seed)
                res_path.parent.mkdir(parents=True, exist_ok=True)
                res_path.write_text(json.dumps(res, indent=1))
                print(f"  CE {res['ce']:.4f}  KL {res['kl']:.4f}  ECE {res['ece']:.4f}  ({res['seconds']:.0f} s)",
                      flush=True)
    report(work, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
