"""trainers.hf: the Hugging Face Trainer integration against our own loop and plain references.

References: batches laid out token by token (``tests.trainers.test_data.assert_batch``); the streaming
loader's plan for the order; ``trainers.loop.micro_loss`` run through our loop's ``Body`` on a copy of the
initial student (the loss, and gradients accumulated the way ``trainers.loop`` accumulates them); a
float64 full-vocabulary bucket KL computed here from the decoded cache; ``trainers.evaluation.evaluate``
for the KL to the teacher before and after training.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

import logitstore
from logitstore import Codec, InvalidInputError, TopK
from logitstore.head import Head
from tests.conftest import make_sequences, write_cache
from tests.trainers.test_data import assert_batch, decoded, selection_file
from trainers.config import LOSSES, TAILS, TrainConfig
from trainers.data import StreamingLoader
from trainers.hf import CacheDataset, DistillationLoss, DistillationTrainer
from trainers.loop import Body, micro_loss
from trainers.losses import Objective
from trainers.student import Student

ROOT = Path(__file__).resolve().parents[2]
V = 300  # the synthetic caches' vocabulary
ML = 24  # max_length of the synthetic tests


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """TopK(8), lossless, 16 sequences of 4..20 tokens, some positions masked, several row groups and shards."""
    refs = make_sequences(np.random.default_rng(11), 16, vocab=V, rule=TopK(8), max_tokens=20, min_tokens=4,
                          mask_prob=0.25)
    path = tmp_path_factory.mktemp("hf") / "cache"
    write_cache(path, refs, vocab=V, rule=TopK(8), codec=Codec(values="fp32", ids="raw"), shard_bytes=4000,
                row_group_positions=40)
    return path


def tiny_student(seed: int = 0, vocab: int = V) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        tie_word_embeddings=True))


def as_student(model) -> Student:
    return Student(model=model, head=Head.of(model), tokenizer=None, tokenizer_dir=None, source="ref", fresh=True)


def hf_args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
                max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


class GradAtStep(TrainerCallback):
    """The accumulated gradients just before the first optimiser step (after DDP's all-reduce)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def loop_grads(model, batches, cfg: TrainConfig, cache) -> dict[str, torch.Tensor]:
    """Gradients as ``trainers.loop`` accumulates them: each micro-batch's loss divided by their number."""
    c = logitstore.open(cache)
    student = as_student(model)
    body, obj = Body(student), Objective.from_config(cfg, c.rule.name)
    model.zero_grad(set_to_none=True)
    for b in batches:
        loss, _ = micro_loss(body, student.head, b, cfg, obj, c.manifest.vocab_size, c.rule)
        (loss / len(batches)).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got, want):
    assert sorted(got) == sorted(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-7, msg=n)


# ---------------------------------------------------------------- dataset, sampler, collator


def test_sampler_walks_the_loaders_plan_and_moves_with_the_epoch(small):
    ds = CacheDataset(small, max_length=ML, buffer_size=5)
    loader = StreamingLoader(small, batch_size=1, max_length=ML, buffer_size=5, seed=7)
    sampler = ds.sampler(seed=7)
    order = lambda: [ds[i]["sequence"].seq_id for i in sampler]  # noqa: E731
    first = order()
    assert first == [b[0] for b in loader.epoch_plan(0)] and len(sampler) == len(ds) == 16
    sampler.set_epoch(1)
    assert order() == [b[0] for b in loader.epoch_plan(1)] != first
    ds.set_epoch(0)  # what accelerate calls under DDP, where its BatchSamplerShard hides the sampler
    assert order() == first
    plain = ds.sampler(shuffle=False)
    assert [ds[i]["sequence"].seq_id for i in plain] == [s.seq_id for s in logitstore.open(small)]


@pytest.mark.parametrize("pack", [False, True])
def test_collator_lays_out_the_loaders_batch_keys(ranked_cache, pack, tmp_path):
    """Items of a weighted selection of a mass-adaptive cache (masks, position subsets), through a DataLoader
    with worker processes: the batches equal the token-by-token layout of the loader's documentation."""
    seqs = decoded(ranked_cache.path)
    chosen = sorted(seqs)[1::2]
    weights = {sid: 0.25 + i for i, sid in enumerate(chosen)}
    sel = selection_file(ranked_cache.path, tmp_path, chosen, [weights[s] for s in chosen])
    ds = CacheDataset(sel, max_length=12 if pack else None, blocks_kept=1)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, sampler=ds.sampler(seed=3), num_workers=2,
                                     collate_fn=ds.collator(pack=pack))
    seen = []
    for batch in dl:
        assert batch["epoch"] is None
        assert_batch(batch, batch["seq_ids"], seqs, ranked_cache.rule.k, weights=weights,
                     max_length=12 if pack else None, pack=pack)
        seen += batch["seq_ids"]
    assert sorted(seen) == chosen
    assert [ds[i]["sequence"].seq_id for i in ds.sampler(seed=3)] == seen


def test_collator_of_a_sampled_cache(sampled_cache):
    seqs = decoded(sampled_cache.path)
    ds = CacheDataset(sampled_cache.path)
    batch = ds.collator()([ds[i] for i in (3, 0, 7)])
    assert_batch(batch, batch["seq_ids"], seqs, sampled_cache.rule.k, sampled=True)


# ---------------------------------------------------------------- the loss


def test_every_loss_option_reaches_our_loop_s_loss(small):
    options = dict(loss="jsd", beta=0.3, tail="label", ce_weight=0.2, keep_fraction=0.5, keep_by="teacher_entropy",
                   chunk_size=7)
    kd = DistillationLoss(small, **options)
    ds = CacheDataset(small, max_length=ML)
    batch = ds.collator()([ds[i] for i in range(4)])
    model = tiny_student()
    got, got_m = kd(model, batch)
    cfg = TrainConfig(**options)
    c = logitstore.open(small)
    want, want_m = micro_loss(Body(as_student(model)), Head.of(model), batch, cfg, Objective.from_config(cfg, "topk"),
                              V, c.rule)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert got_m == pytest.approx(want_m, rel=1e-6)
    plain, _ = DistillationLoss(small)(model, batch)
    assert abs(float(plain.detach()) - float(got.detach())) > 1e-3  # the options change the loss


@pytest.fixture(scope="module")
def tail_cache(tmp_path_factory) -> Path:
    """Rule TopKTail(5, 12): an exact top-5 head and 12 tail draws per position."""
    from logitstore.rules import TopKTail
    from tests.logitstore.test_tail_rule import build as build_tail

    path = tmp_path_factory.mktemp("hf-tail") / "cache"
    build_tail(path, TopKTail(5, 12), Codec(values="fp32", ids="raw"))
    return path


def assert_loss_is_our_loop_s(cache_path, options: dict, source=None) -> float:
    """``DistillationLoss`` on a collated batch of ``source`` (default: the cache) equals ``micro_loss``."""
    c = logitstore.open(cache_path)
    kd = DistillationLoss(cache_path, **options)
    ds = CacheDataset(source or cache_path)
    batch = ds.collator()([ds[i] for i in range(min(4, len(ds)))])
    model = tiny_student(vocab=int(c.manifest.vocab_size))
    got, got_m = kd(model, batch)
    cfg = TrainConfig(**options)
    want, want_m = micro_loss(Body(as_student(model)), Head.of(model), batch, cfg,
                              Objective.from_config(cfg, c.rule.name), int(c.manifest.vocab_size), c.rule)
    assert torch.isfinite(got) and float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert got_m == pytest.approx(want_m, rel=1e-6)
    got.backward()  # a gradient reaches the student
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    return float(got.detach())


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_equals_our_loop_s(small, loss):
    assert_loss_is_our_loop_s(small, dict(loss=loss, temperature=1.0 if loss == "taid" else 2.0, ce_weight=0.1))


# every tail policy, on a cache that serves it (sampled: the draws of rule sample and of rule topk_tail)
TAIL_CASES = [("other", "small"), ("renormalize", "small"), ("label", "small"), ("residual", "small"),
              ("sampled", "sampled"), ("sampled", "tail"), ("sampled_label", "sampled"), ("sampled_label", "tail"),
              ("other", "tail"), ("residual", "tail"), ("entropy", "small"), ("entropy", "tail")]


@pytest.mark.parametrize(("tail", "which"), TAIL_CASES, ids=[f"{t}-{w}" for t, w in TAIL_CASES])
def test_every_tail_policy_equals_our_loop_s(small, sampled_cache, tail_cache, tail, which):
    assert sorted({t for t, _ in TAIL_CASES}) == sorted(TAILS)
    path = {"small": small, "sampled": sampled_cache.path, "tail": tail_cache}[which]
    assert_loss_is_our_loop_s(path, dict(loss="forward_kl", tail=tail))


@pytest.mark.parametrize("tail", ["sampled", "sampled_label"])
def test_the_inclusion_estimator_equals_our_loop_s(tail_cache, tail):
    assert_loss_is_our_loop_s(tail_cache, dict(loss="forward_kl", tail=tail, estimator="inclusion"))


@pytest.mark.parametrize("weighting", ["keep-teacher", "keep-student-lowest", "route", "selection-weights"])
def test_every_weighting_equals_our_loop_s(ranked_cache, weighting, tmp_path):
    ids = [s.seq_id for s in logitstore.open(ranked_cache.path)]
    source = None
    options = {"keep-teacher": dict(keep_fraction=0.5, keep_by="teacher_entropy"),
               "keep-student-lowest": dict(keep_fraction=0.3, keep_by="student_entropy", keep_lowest=True),
               "route": dict(route="correctness", ce_weight=0.2),
               "selection-weights": {}}[weighting]
    if weighting == "selection-weights":  # per-sequence weights of a selection, on their tokens
        source = selection_file(ranked_cache.path, tmp_path, ids[:4], weights=[0.5, 2.0, 1.0, 3.0])
    elif weighting == "route":
        source = selection_file(ranked_cache.path, tmp_path, [f"seq-{i:04d}" for i in (5, 6, 7, 8)])  # 6, 7: marked
    assert_loss_is_our_loop_s(ranked_cache.path, options, source)


def test_refusals(small, sampled_cache, tmp_path):
    with pytest.raises(InvalidInputError, match=r"unknown option\(s\) \['lr'\]"):
        DistillationLoss(small, lr=1e-3)
    with pytest.raises(InvalidInputError, match="--loss 'kl'"):
        DistillationLoss(small, loss="kl")
    with pytest.raises(InvalidInputError, match="--tail sampled needs a cache with draws"):
        DistillationLoss(small, tail="sampled")
    with pytest.raises(InvalidInputError, match="--tail sampled_label needs a cache with draws"):
        DistillationLoss(small, tail="sampled_label")
    with pytest.raises(InvalidInputError, match="--estimator 'hh': choose from auto, counts, inclusion"):
        DistillationLoss(small, estimator="hh")
    with pytest.raises(InvalidInputError, match="--estimator inclusion weighs the draws of --tail sampled or "
                                                "sampled_label; this run's tail is 'other'"):
        DistillationLoss(sampled_cache.path, tail="other", estimator="inclusion")
    ds = CacheDataset(small)
    with pytest.raises(InvalidInputError, match="normalize='mean'"):
        DistillationTrainer(model=tiny_student(), args=hf_args(tmp_path), train_dataset=ds, normalize="mean")
    with pytest.raises(InvalidInputError, match="another cache than the loss's"):
        DistillationTrainer(model=tiny_student(), args=hf_args(tmp_path), train_dataset=ds,
                            distillation=DistillationLoss(sampled_cache.path))
    small_vocab = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(InvalidInputError, match="does not fit the student"):
        DistillationTrainer(model=small_vocab, args=hf_args(tmp_path), train_dataset=ds)
    with pytest.raises(InvalidInputError, match="pack=True needs"):
        ds.collator(pack=True)


def test_unfinished_builds_and_unknown_ids_are_refused_as_by_train(small, tmp_path):
    import shutil

    from logitstore.selection import SelectionMismatchError
    from tests.conftest import read_manifest, write_manifest

    c = tmp_path / "c"
    shutil.copytree(small, c)
    m = read_manifest(c)
    m["complete"] = False  # a build still running, or killed
    write_manifest(c, m)
    with pytest.raises(InvalidInputError, match="unfinished build"):
        CacheDataset(c)
    assert len(CacheDataset(c, allow_incomplete=True)) == 16
    ids = [s.seq_id for s in logitstore.open(small)]
    sel = selection_file(small, tmp_path, ids[:3] + ["seq-not-there"])
    with pytest.raises(SelectionMismatchError, match="1 of its 4 seq ids are not in the cache"):
        CacheDataset(sel)
    assert len(CacheDataset(sel, allow_missing=True)) == 3


def test_evaluate_reports_the_loss_of_the_held_out_batches(small, tmp_path):
    """Trainer.evaluate on a CacheDataset: storage order, the collator, the loss only (no logits gathered)."""
    model = tiny_student()
    trainer = DistillationTrainer(model=model, args=hf_args(tmp_path, per_device_eval_batch_size=4),
                                  train_dataset=CacheDataset(small, max_length=ML),
                                  eval_dataset=CacheDataset(small, max_length=ML))
    got = trainer.evaluate()["eval_loss"]
    ds, kd = CacheDataset(small, max_length=ML), DistillationLoss(small)
    with torch.no_grad():
        want = [float(kd(model, ds.collator()([ds[i] for i in range(a, a + 4)]))[0]) for a in range(0, 16, 4)]
    assert got == pytest.approx(float(np.mean(want)), rel=1e-5)


@pytest.mark.parametrize("normalize", ["micro_batch", "step"])
def test_gradient_accumulation(small, normalize, tmp_path):
    """Two accumulated micro-batches of 2 sequences: with 'micro_batch' the gradient of our loop's accumulation
    (mean of the micro-batch means), with 'step' the gradient of one batch of all 4 (the token mean)."""
    init = tiny_student()
    grab = GradAtStep()
    trainer = DistillationTrainer(model=copy.deepcopy(init), args=hf_args(tmp_path, gradient_accumulation_steps=2),
                                  train_dataset=CacheDataset(small, max_length=ML), normalize=normalize,
                                  callbacks=[grab])
    trainer.train()
    cfg = TrainConfig()
    it = iter(StreamingLoader(small, batch_size=2, max_length=ML, seed=0))
    two = [next(it), next(it)]
    one = [next(iter(StreamingLoader(small, batch_size=4, max_length=ML, seed=0)))]
    assert sum(int(b["target_mask"].sum()) for b in two) == int(one[0]["target_mask"].sum())
    assert [b["target_mask"].sum() for b in two][0] != [b["target_mask"].sum() for b in two][1]  # the modes differ
    by_mode = {"micro_batch": loop_grads(copy.deepcopy(init), two, cfg, small),
               "step": loop_grads(copy.deepcopy(init), one, cfg, small)}
    assert_grads_close(grab.grads, by_mode[normalize])
    other = by_mode["step" if normalize == "micro_batch" else "micro_batch"]
    assert max(float((grab.grads[n] - other[n]).abs().max()) for n in other) > 1e-4


def test_taid_adapts_each_step_and_resumes_from_a_checkpoint(small, tmp_path):
    """TAID's t follows its rule (replayed here from the logged KD terms), is saved with each checkpoint, and a
    resumed run continues it (momentum and previous loss included) as the uninterrupted run did."""
    def trainer():
        return DistillationTrainer(model=tiny_student(), args=hf_args(tmp_path / "run", max_steps=4,
                                                                      save_strategy="steps", save_steps=2),
                                   train_dataset=CacheDataset(small, max_length=ML),
                                   distillation=DistillationLoss(small, loss="taid", taid_start=0.2, taid_end=0.9))
    t = trainer()
    t.train()
    logs = [r for r in t.state.log_history if "kd" in r]
    replay, states = Objective("taid", taid_start=0.2, taid_end=0.9, total_steps=4), []
    for i, r in enumerate(logs):
        replay.step_end(r["kd"], i)
        states.append(replay.state_dict())
        assert r["taid_t"] == pytest.approx(replay.taid_t, rel=1e-12)
    assert len(logs) == 4 and states[-1]["t"] > 0.2 and states[-1]["momentum"] != 0
    assert t.distillation.objective.state_dict() == pytest.approx(states[-1], rel=1e-12)
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "logitstore_objective.json").read_text())
    assert saved == pytest.approx(states[1], rel=1e-12)
    again = trainer()
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert again.distillation.objective.state_dict() == pytest.approx(states[-1], rel=1e-5)


# ---------------------------------------------------------------- end to end on the tiny teacher's cache


def bucket_kl(model, cache_path, seq_ids) -> float:
    """float64 reference: mean over target positions of KL(p || q) over (stored entries + one "other" bucket), p
    the decoded teacher entries with the cached tail mass, q the student's full-vocabulary softmax."""
    cache = logitstore.open(cache_path)
    total, n = 0.0, 0
    with torch.no_grad():
        for seq in cache.iter_sequences(seq_ids):
            z = model(input_ids=torch.tensor(seq.input_ids[:48], dtype=torch.long)[None]).logits[0].double()
            ls = torch.log_softmax(z, -1).numpy()
            for j in np.flatnonzero(seq.loss_mask & (seq.pos < 48)):
                valid = seq.ids[j] >= 0
                p = np.append(np.exp(seq.logprobs[j][valid].astype(np.float64)), seq.tail_mass[j])
                q = np.exp(ls[seq.pos[j] - 1][seq.ids[j][valid]])
                p, q = p / p.sum(), np.append(q, 1 - q.sum())
                nz = p > 0
                total += float((p[nz] * (np.log(p[nz]) - np.log(q[nz]))).sum())
                n += 1
    return total / n


def test_trainer_first_step_equals_our_loop_and_training_lowers_the_kl(text_cache, student_config, tmp_path):
    from trainers.evaluation import evaluate
    from trainers.sources import train_and_eval_sources
    from trainers.student import load_student

    cache = logitstore.open(text_cache)
    train_src, held = train_and_eval_sources(TrainConfig(cache=str(text_cache), holdout=0.25), cache)
    student = load_student(str(student_config), manifest=cache.manifest, seed=0)
    init = copy.deepcopy(student.model)
    cfg = TrainConfig(batch_size=8, max_length=48)
    kl0 = evaluate(as_student(copy.deepcopy(init)), held, cfg, torch.device("cpu"))["eval_kl"]
    trainer = DistillationTrainer(
        model=student.model, processing_class=student.tokenizer, train_dataset=CacheDataset(train_src, max_length=48),
        args=hf_args(tmp_path, max_steps=25, per_device_train_batch_size=4, learning_rate=1e-2, warmup_steps=2,
                     lr_scheduler_type="cosine"))
    trainer.train()
    first = next(iter(StreamingLoader(train_src, batch_size=4, max_length=48, seed=0)))
    ref = as_student(copy.deepcopy(init))
    want = micro_loss(Body(ref), ref.head, first, cfg, Objective.from_config(cfg, "topk"), cache.manifest.vocab_size,
                      cache.rule)[0].detach()
    got = trainer.state.log_history[0]
    assert got["step"] == 1 and got["loss"] == pytest.approx(float(want), rel=1e-5)
    assert got["kd"] == pytest.approx(got["loss"], rel=1e-6)
    assert float(want) == pytest.approx(bucket_kl(init, text_cache, first["seq_ids"]), rel=1e-4)
    kl1 = evaluate(as_student(student.model), held, cfg, torch.device("cpu"))["eval_kl"]
    assert kl1 < 0.8 * kl0, (kl0, kl1)
    assert [r["step"] for r in trainer.state.log_history if "loss" in r] == list(range(1, 26))


# ---------------------------------------------------------------- DDP under torchrun (accelerate)

DDP_SCRIPT = """
import os, sys, torch
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments
from trainers.hf import CacheDataset, DistillationTrainer
cache, init, out, max_length = sys.argv[1:5]
rank = int(os.environ["RANK"])
class Grab(TrainerCallback):
    grads = None
    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
class Recording(DistillationTrainer):
    def compute_loss(self, model, inputs, *a, **kw):
        self.seen.append(list(inputs["seq_ids"]))
        return super().compute_loss(model, inputs, *a, **kw)
result = {}
for normalize in ("micro_batch", "step"):
    grab = Grab()
    args = TrainingArguments(output_dir=out, max_steps=5, per_device_train_batch_size=2, learning_rate=1e-3,
                             max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             seed=0)
    t = Recording(model=AutoModelForCausalLM.from_pretrained(init), args=args,
                  train_dataset=CacheDataset(cache, max_length=int(max_length)), normalize=normalize, callbacks=[grab])
    t.seen = []
    t.train()
    result[normalize] = {"grads": grab.grads, "seen": t.seen, "world": t.args.world_size}
torch.save(result, os.path.join(out, f"rank{rank}.pt"))
"""


def test_ddp_two_processes_under_torchrun(small, tmp_path):
    """Two CPU processes (gloo) under torchrun, 5 steps (an epoch is 4): the ranks take alternate batches of the
    sampler's order, the next epoch in the next epoch's order; the all-reduced first gradient is our loop's
    mean of the two ranks' micro-batch means ('micro_batch') or the gradient of one batch of all 4 sequences
    ('step': tokens counted across the processes)."""
    init = tiny_student()
    init.save_pretrained(tmp_path / "init")
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29700 + os.getpid() % 1000), str(script), str(small), str(tmp_path / "init"),
                        str(tmp_path), str(ML)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in (0, 1)]
    one_by_one = StreamingLoader(small, batch_size=2, max_length=ML, seed=0)
    batches = one_by_one.epoch_plan(0) + one_by_one.epoch_plan(1)  # 8 + 8 batches of 2
    it = iter(StreamingLoader(small, batch_size=2, max_length=ML, seed=0))
    two = [next(it), next(it)]
    want = {"micro_batch": loop_grads(copy.deepcopy(init), two, TrainConfig(), small),
            "step": loop_grads(copy.deepcopy(init), [next(iter(StreamingLoader(small, batch_size=4, max_length=ML,
                                                                               seed=0)))], TrainConfig(), small)}
    for mode in ("micro_batch", "step"):
        assert ranks[0][mode]["world"] == 2
        assert ranks[0][mode]["seen"] == [batches[i] for i in (0, 2, 4, 6, 8)]
        assert ranks[1][mode]["seen"] == [batches[i] for i in (1, 3, 5, 7, 9)]
        for rank in ranks:
            assert_grads_close(rank[mode]["grads"], want[mode])


def test_the_docs_script_runs(text_cache, student_config, embedded_tokenizer, tmp_path, monkeypatch):
    """docs/training.md's complete script, as printed (3 steps instead of 1000), on a student directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    text = (ROOT / "docs" / "training.md").read_text()
    section = text[text.index("## Use a logitstore cache from your own trainer"):]
    start = section.index("```python\n") + len("```python\n")
    script = section[start:section.index("```", start)]
    assert "MAX_STEPS = 1000\n" in script
    student = tmp_path / "student"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student_config)).save_pretrained(student)
    embedded_tokenizer.save_pretrained(student)
    (tmp_path / "cache").symlink_to(text_cache)
    monkeypatch.chdir(tmp_path)
    exec(compile(script.replace("MAX_STEPS = 1000\n", "MAX_STEPS = 3\n"), "docs/training.md", "exec"),
         {"__name__": "__main__"})
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "student-kd")
    before = AutoModelForCausalLM.from_pretrained(student)
    assert not torch.equal(out.lm_head.weight, before.lm_head.weight)  # it trained
    assert (tmp_path / "student-kd" / "tokenizer.json").is_file()
