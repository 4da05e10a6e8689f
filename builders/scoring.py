"""Scoring planned sequences into a cache: batches to the backend, its ``Scored`` values to the writer.

``open_writer`` makes the ``CacheWriter`` of a build (or of one part of a distributed build)
with the backend's identity, tokenizer and exactness; ``score_items`` sends a window's items
to the backend in token-budget batches and adds each scored sequence as one
``SequenceRecord``. The one-process driver and the Ray actors both run exactly this.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import logitstore
from builders.backends.base import Backend
from builders.config import RESUME_BUILD_KEYS, BuildConfig
from builders.plan import Item, batches, positions_of
from logitstore.records import SequenceRecord


def open_writer(backend: Backend, out: Path, config: BuildConfig, build_args: dict, resume: bool,
                **kwargs) -> logitstore.CacheWriter:
    """The cache writer of a build (not yet opened): ``out``, with the backend's identity and exactness."""
    return logitstore.CacheWriter(
        out, vocab_size=backend.vocab_size, rule=config.rule, codec=config.codec, teacher=backend.describe(),
        tokenizer=backend.tokenizer_record(), build=build_args, exactness=backend.exactness,
        shard_bytes=max(1, int(config.shard_mb * 2**20)), row_group_positions=config.row_group_positions,
        resume=resume, resume_build_keys=RESUME_BUILD_KEYS, **kwargs)


def score_items(backend: Backend, writer: logitstore.CacheWriter, todo: list[Item], config: BuildConfig, gen,
                on_batch: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Score ``todo`` in token-budget batches and add each sequence to ``writer``; (sequences, positions).
    ``gen`` is the torch generator of rule-sample draws; ``on_batch(sequences, positions)`` follows each batch."""
    n_seqs = n_pos = 0
    for batch in batches(todo, config.token_budget):
        pos_mask = [positions_of(it.ex, config.cache_prompt) for it in batch]
        scored = backend.score([it.ex.input_ids for it in batch], [p for p, _ in pos_mask], config.rule, gen)
        for it, (pos, mask), s in zip(batch, pos_mask, scored):
            writer.add(SequenceRecord(input_ids=it.ex.input_ids, positions=pos, loss_mask=mask, scored=s,
                                      record=it.ex.record, sample=it.sample, correct=it.correct))
        positions = sum(len(p) for p, _ in pos_mask)
        n_seqs, n_pos = n_seqs + len(batch), n_pos + positions
        if on_batch is not None:
            on_batch(len(batch), positions)
    return n_seqs, n_pos
