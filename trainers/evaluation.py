"""Evaluation of a student on held-out cached sequences, and the batch-to-targets seam the loop shares.

``evaluate`` streams a source once, in storage order, and reports the token-weighted label
cross-entropy (``eval_ce``, nats) and the KL from the teacher over its stored entries plus one
bucket for the rest (``eval_kl``: exact for that coarse-graining, a lower bound of the
full-vocabulary KL), at temperature 1, and, where the student's tokenizer is known, bits per byte of the
target text (``eval_bpb``; ``eval_teacher_bpb`` the teacher's on the same bytes): the number a student with
another tokenizer (``trainers.cross``) is compared on.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from logitstore.codec import Codec
from logitstore.rules import Rule, rule_from_dict
from trainers.align import TARGET, TokenBytes, UnsupportedTokenizerError, roles
from trainers.config import TrainConfig
from trainers.data import StreamingLoader
from trainers.losses import buckets, forward_kl
from trainers.student import Student
from trainers.targets import SparseTargets
from trainers.view import student_view

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def batch_targets(batch: dict, sel: torch.Tensor, vocab: int, rule: Rule, codec: Codec | None = None
                  ) -> SparseTargets:
    """The teacher side of the positions ``sel [B, T]`` selects in a collated batch (``trainers.data``) of a cache
    with sparse-entry ``rule`` and values stored with ``codec`` (None: as exact)."""
    get = lambda k: batch[k][sel] if k in batch else None  # noqa: E731
    return SparseTargets(ids=batch["topk_ids"][sel], valid=batch["topk_valid"][sel], logprobs=get("topk_logprobs"),
                         tail_mass=batch["tail_mass"][sel], labels=batch["labels"][sel], vocab_size=vocab,
                         counts=get("counts"), draws=rule.draws or None, label_logprob=batch["label_logprob"][sel],
                         tail_ids=get("tail_ids"), tail_valid=get("tail_valid"), tail_logprobs=get("tail_logprobs"),
                         tail_counts=get("tail_counts"),
                         proposal_temperature=getattr(rule, "proposal_temperature", 1.0),
                         proposal_log_norm=get("proposal_log_norm"), systematic=rule.systematic,
                         entropy=get("teacher_entropy"), codec=codec,
                         capped=rule.name == "sample" and rule.k < rule.draws)


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch with its tensors on ``device``."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(student: Student, source, cfg: TrainConfig, device: torch.device, cross=None) -> dict[str, float]:
    """Held-out label cross-entropy and bucket KL(teacher || student) at temperature 1, token-weighted, and bits
    per byte where the student's tokenizer is known; a cross-tokenizer student (``cross``, a
    ``trainers.cross.CrossTokenizer``) is evaluated by it, in bits per byte."""
    loader = StreamingLoader(source, batch_size=cfg.batch_size, max_length=cfg.max_length, shuffle=False,
                             epochs=1, rank=0, world_size=1)
    if cross is not None:
        was_training = student.model.training
        student.model.eval()
        try:
            return cross.evaluate(student, loader, device, cfg)
        finally:
            student.model.train(was_training)
    m = loader.manifest
    tb = None
    if student.tokenizer is not None:
        try:
            tb = TokenBytes.of(student.tokenizer)
        except UnsupportedTokenizerError as exc:  # no bits per byte for it; the other figures stand
            logger.info("no eval_bpb: %s", exc)
    bits = t_bits = 0.0
    n_bytes = 0
    rule = rule_from_dict(m.rule)
    ce_sum = kl_sum = 0.0
    tokens = seqs = 0
    was_training = student.model.training
    student.model.eval()
    for batch in loader:
        batch = to_device(batch, device)
        sel = batch["target_mask"]
        h = student.hidden(batch)[sel]
        t = batch_targets(batch, sel, m.vocab_size, rule)
        view = student_view(h, student.head, t.support()[0], t.labels, chunk_size=cfg.chunk_size)
        ce_sum += float(-view.logp_label.double().sum())
        if tb is not None:  # bits per byte over the target text (the same bytes a cross-tokenizer run counts)
            nb = text_bytes(tb, batch)[sel.cpu()].to(device)
            use = nb > 0
            bits -= float(view.logp_label[use].double().sum()) / math.log(2)
            t_bits -= float(t.label_logprob[use].double().sum()) / math.log(2)
            n_bytes += int(nb.sum())
        if t.logprobs is not None:
            lt, ls, mask = buckets(view, t, tail="other")
            kl_sum += float(forward_kl(lt, ls, mask).double().sum())
        tokens += int(sel.sum())
        seqs += len(batch["seq_ids"])
        if cfg.eval_sequences and seqs >= cfg.eval_sequences:
            break
    student.model.train(was_training)
    out = {"eval_ce": ce_sum / max(tokens, 1), "eval_tokens": tokens, "eval_sequences": seqs}
    if m.codec.get("values") != "none":
        out["eval_kl"] = kl_sum / max(tokens, 1)
    if tb is not None:
        out.update(eval_bpb=bits / max(n_bytes, 1), eval_teacher_bpb=t_bits / max(n_bytes, 1), eval_bytes=n_bytes)
    return out


def text_bytes(tb: TokenBytes, batch: dict) -> torch.Tensor:
    """``[B, T]`` (predicted-token layout): the bytes of each label that is target text (``trainers.align.roles``),
    0 elsewhere (special tokens, context, characters split at a target edge)."""
    ids, am, tgt = batch["input_ids"].cpu().numpy(), batch["attention_mask"].cpu().numpy(), \
        batch["target_mask"].cpu().numpy()
    out = np.zeros(ids.shape, np.int64)
    for b in range(ids.shape[0]):
        L = int(am[b].sum())
        target = np.zeros(L, bool)
        target[1:] = tgt[b, :L - 1]
        r = roles(tb, ids[b, :L], target)
        out[b, :L - 1] = np.where(r[1:] == TARGET, tb.length[ids[b, 1:L]], 0)
    return torch.from_numpy(out)


def eval_and_log(student, source, cfg, device, out, step, main, world, cross=None) -> dict[str, float]:
    """Evaluate on rank 0 and append the result to ``OUT/metrics.jsonl``; every rank waits for it."""
    res = {}
    if main:
        res = evaluate(student, source, cfg, device, cross)
        log_metrics(out, {"step": step, **res})
        logger.info("eval at step %d: %s", step, res)
    if world > 1:
        dist.barrier()
    return res


def log_metrics(out: Path, row: dict[str, Any]) -> None:
    """Append one JSON row to ``OUT/metrics.jsonl``."""
    with open(out / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def last_logged(out: Path) -> dict[str, Any]:
    """The last training row of ``OUT/metrics.jsonl`` (one with a ``loss`` and an ``lr``), or ``{}``: what a run
    resumed at its final step reports as its last metrics, since it trains no step itself."""
    last: dict[str, Any] = {}
    try:
        lines = (out / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return last
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(row, dict) and "loss" in row and "lr" in row:
            last = row
    return last
