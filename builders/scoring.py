"""Scoring planned sequences into a cache: batches to the backend, its ``Scored`` values to the writer.

``open_writer`` makes the ``CacheWriter`` of a build (or of one part of a distributed build)
with the backend's identity, tokenizer and exactness; ``score_items`` sends a window's items
to the backend in token-budget batches and adds each scored sequence as one
``SequenceRecord``; when the responses were sampled from a policy (``--responses-from``), the same
batches go through the policy too, for its own logprob and entropy of every cached position
(``builders.policy.policy_values``). The one-process driver and the Ray actors both run exactly this.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import logitstore
from builders.backends.base import Backend
from builders.config import RESUME_BUILD_KEYS, RESUME_DEFAULTS, BuildConfig
from builders.plan import Item, batches, positions_of
from builders.policy import policy_exactness, policy_values
from logitstore.records import SequenceRecord


def open_writer(backend: Backend, out: Path, config: BuildConfig, build_args: dict, resume: bool, *,
                policy: Backend | None = None, **kwargs) -> logitstore.CacheWriter:
    """The cache writer of a build (not yet opened): ``out``, with the backend's identity and exactness (and, with
    responses from a ``policy``, the policy's fields)."""
    exactness = dict(backend.exactness)
    if policy is not None:
        exactness.update(policy_exactness(policy))
    return logitstore.CacheWriter(
        out, vocab_size=backend.vocab_size, rule=config.rule, codec=config.codec, teacher=backend.describe(),
        tokenizer=backend.tokenizer_record(), build=build_args, exactness=exactness,
        shard_bytes=max(1, int(config.shard_mb * 2**20)), row_group_positions=config.row_group_positions,
        resume=resume, resume_build_keys=RESUME_BUILD_KEYS, resume_defaults=RESUME_DEFAULTS, policy=policy is not None,
        lock=config.lock, **kwargs)


def score_items(backend: Backend, writer: logitstore.CacheWriter, todo: list[Item], config: BuildConfig, gen,
                on_batch: Callable[[int, int], None] | None = None, *, policy: Backend | None = None,
                timings: dict[str, float] | None = None) -> tuple[int, int]:
    """Score ``todo`` in token-budget batches and add each sequence to ``writer``; (sequences, positions).
    ``gen`` is the torch generator of rule-sample draws; ``on_batch(sequences, positions)`` follows each batch;
    ``policy``: the model the responses came from, whose own values go with each sequence; ``timings``
    accumulates the seconds in the teacher's and the policy's passes (``teacher_score``, ``policy_score``)."""
    n_seqs = n_pos = 0
    timings = {} if timings is None else timings
    for batch in batches(todo, config.token_budget):
        pos_mask = [positions_of(it.ex, config.cache_prompt) for it in batch]
        ids, positions = [it.ex.input_ids for it in batch], [p for p, _ in pos_mask]
        t0 = time.perf_counter()
        scored = backend.score(ids, positions, config.rule, gen)
        t1 = time.perf_counter()
        mine = policy_values(policy, ids, positions) if policy is not None else [(None, None)] * len(batch)
        timings["teacher_score"] = timings.get("teacher_score", 0.0) + t1 - t0
        timings["policy_score"] = timings.get("policy_score", 0.0) + time.perf_counter() - t1
        for it, (pos, mask), s, (p_lp, p_ent) in zip(batch, pos_mask, scored, mine):
            writer.add(SequenceRecord(input_ids=it.ex.input_ids, positions=pos, loss_mask=mask, scored=s,
                                      record=it.ex.record, sample=it.sample, correct=it.correct,
                                      policy_logprob=p_lp, policy_entropy=p_ent))
        positions = sum(len(p) for p, _ in pos_mask)
        n_seqs, n_pos = n_seqs + len(batch), n_pos + positions
        if on_batch is not None:
            on_batch(len(batch), positions)
    return n_seqs, n_pos
