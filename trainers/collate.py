"""Collation: decoded cached sequences -> one training batch of torch tensors (the layout every trainer here uses).

``collate`` is the one place a batch is laid out; the streaming loader (``trainers.data``) calls it
on the decoded windows of its plan, the Hugging Face integration (``trainers.hf``) on the
sequences a ``torch.utils.data.DataLoader`` hands its collator (``block_of`` turns those into
one ``Block``). ``pack_rows`` is the greedy packing rule both use.

Layout (predicted-token layout: index ``t`` of a row holds the teacher entry for ``pos = t + 1``,
the token the student's output at ``t`` predicts), all ``[B, T]`` or ``[B, T, K]`` with ``T`` the
longest row of the batch: ``input_ids``, ``attention_mask``, ``position_ids`` (restarting per
packed sequence), ``segment_ids`` (0 padding, 1.. per packed sequence), ``target_mask`` (cached
position with ``loss_mask``), ``labels``, ``topk_ids``, ``topk_valid``, ``topk_logprobs`` (absent
when the cache stores none), ``counts`` (rule sample), ``tail_ids``, ``tail_valid``,
``tail_logprobs``, ``tail_counts`` (``[B, T, U]``, rule topk_tail), ``proposal_log_norm`` (a
proposal temperature != 1), ``tail_mass``, ``teacher_entropy``, ``label_logprob``, ``weight``
(selection weight on the sequence's tokens), ``correct`` (1/0/-1), ``pos`` (-1 where none),
``score_<name>`` (NaN where missing), plus ``seq_ids`` and ``epoch``. Positions that are not
targets hold 0 (``labels``, ids), ``-inf`` (logprobs) or False.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np
import torch

from logitstore.blocks import TAIL_FIELDS, Block, Sequence
from logitstore.reader import Cache


def ranges(starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``arange(s, s + n)`` for each (s, n), and the index within each range."""
    lens = np.asarray(lens, np.int64)
    ends = np.cumsum(lens)
    within = np.arange(int(ends[-1]) if lens.size else 0) - np.repeat(ends - lens, lens)
    return np.repeat(np.asarray(starts, np.int64), lens) + within, within


def pack_rows(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing, in order: (row [n], offset [n]) of sequences of ``lengths`` in rows of at most ``max_length``
    tokens; a sequence that does not fit in the current row starts a new one."""
    n = len(lengths)
    row, off, r, fill = np.empty(n, np.int64), np.empty(n, np.int64), -1, 0
    for i, ln in enumerate(np.asarray(lengths).tolist()):  # greedy packing is sequential by nature
        if r < 0 or fill + ln > max_length:
            r, fill = r + 1, 0
        row[i], off[i], fill = r, fill, fill + ln
    return row, off


@dataclasses.dataclass(frozen=True)
class CacheKind:
    """What a cache's batches carry, from its rule and codec."""

    k: int  # entry columns of the cache (the rule's k)
    values: bool  # logprobs stored (codec values != "none")
    sampled: bool  # rule sample: entry counts
    tail: bool  # rule topk_tail: tail draws
    tempered: bool  # a proposal temperature != 1: per-position log-normaliser

    @classmethod
    def of(cls, cache: Cache) -> CacheKind:
        return cls(k=int(cache.k), values=cache.codec.values != "none", sampled=cache.rule.name == "sample",
                   tail=cache.rule.name == "topk_tail", tempered=bool(cache.rule.tempered))


_SCALARS = [f.name for f in dataclasses.fields(Sequence) if f.name not in {g.name for g in dataclasses.fields(Block)}]


def block_of(sequences: Seq[Sequence]) -> Block:
    """One ``Block`` holding ``sequences`` (decoded ``logitstore.Sequence`` objects, e.g. handed over by DataLoader
    workers) in order: the inverse of ``Block.sequence``. Entry columns are padded to the widest sequence."""
    def cat(name, width=None, fill=0):
        parts = [getattr(s, name) for s in sequences]
        if parts[0] is None:
            return None
        if width is not None:
            parts = [np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=fill) for p in parts]
        return np.concatenate(parts)

    k = max(s.ids.shape[1] for s in sequences)
    u = max((s.tail_ids.shape[1] for s in sequences if s.tail_ids is not None), default=0)
    offsets = lambda name: np.r_[0, np.cumsum([len(getattr(s, name)) for s in sequences])]  # noqa: E731
    tail = {name: cat(name, u if name in ("tail_ids", "tail_logprobs", "tail_counts") else None,
                      {"tail_ids": -1, "tail_logprobs": -np.inf}.get(name, 0)) for name in TAIL_FIELDS}
    return Block(scalars={name: np.array([getattr(s, name) for s in sequences], dtype=object) for name in _SCALARS},
                 token_offsets=offsets("input_ids"), input_ids=cat("input_ids"), pos_offsets=offsets("pos"),
                 pos=cat("pos"), labels=cat("labels"), loss_mask=cat("loss_mask"), label_logprob=cat("label_logprob"),
                 entropy=cat("entropy"), tail_mass=cat("tail_mass"), ids=cat("ids", k, -1),
                 logprobs=cat("logprobs", k, -np.inf), n_entries=cat("n_entries"), counts=cat("counts", k, 0), **tail)


def collate(pieces: list[tuple[Block, np.ndarray, np.ndarray]], *, kind: CacheKind, seq_ids: list[str],
            length: np.ndarray, row: np.ndarray, offset: np.ndarray, weight: np.ndarray, epoch: int | None = None,
            scores: dict | None = None, score_names: Seq[str] = ()) -> dict[str, Any]:
    """The batch of n sequences (slots), laid out as the module docstring says.

    ``pieces``: (block, slots, block_rows): slot ``slots[j]`` is row ``block_rows[j]`` of ``block``; every slot
    appears in exactly one piece. Per slot: ``seq_ids``, ``length`` (tokens kept: cached positions ``>= length``
    are dropped), ``row`` and ``offset`` (its first token column in the row), ``weight``. ``scores``:
    ``seq_id -> (pos [m], values [m, C])`` of the ``score_names`` columns (``logitstore.scores.load_scores``).
    """
    n = len(seq_ids)
    L, row, off = np.asarray(length, np.int64), np.asarray(row, np.int64), np.asarray(offset, np.int64)
    T, B = max(1, int((off + L).max())), int(row.max()) + 1
    K = max([kind.k] + [blk.ids.shape[1] for blk, _, _ in pieces])
    new_row = np.r_[True, row[1:] != row[:-1]]
    seg = np.arange(n) - np.flatnonzero(new_row)[np.cumsum(new_row) - 1] + 1  # 1.. within each row
    z = lambda d, fill=0, *k: np.full((B * T, *k), fill, d)  # noqa: E731
    o = dict(input_ids=z(np.int64), attention_mask=z(np.int64), position_ids=z(np.int64),
             segment_ids=z(np.int64), target_mask=z(bool), labels=z(np.int64), topk_ids=z(np.int64, 0, K),
             topk_valid=z(bool, False, K), tail_mass=z(np.float32), teacher_entropy=z(np.float32),
             label_logprob=z(np.float32), weight=z(np.float32), correct=z(np.int8, -1), pos=z(np.int32, -1))
    if kind.values:
        o["topk_logprobs"] = z(np.float32, -np.inf, K)
    if kind.sampled:
        o["counts"] = z(np.float32, 0, K)
    if kind.tail:
        U = max(blk.tail_ids.shape[1] for blk, _, _ in pieces)
        o.update(tail_ids=z(np.int64, 0, U), tail_valid=z(bool, False, U), tail_logprobs=z(np.float32, -np.inf, U),
                 tail_counts=z(np.float32, 0, U))
    if kind.tempered:
        o["proposal_log_norm"] = z(np.float32)
    weight = np.asarray(weight, np.float32)
    for blk, slots, br in pieces:
        src, within = ranges(blk.token_offsets[br], L[slots])
        dst = np.repeat(row[slots] * T + off[slots], L[slots]) + within
        o["input_ids"][dst] = blk.input_ids[src]
        o["attention_mask"][dst] = 1
        o["position_ids"][dst] = within
        o["segment_ids"][dst] = np.repeat(seg[slots], L[slots])
        o["weight"][dst] = np.repeat(weight[slots], L[slots])
        cor = np.array([-1 if c is None else int(c) for c in blk.scalars["correct"][br]], np.int8)
        o["correct"][dst] = np.repeat(cor, L[slots])
        src, _ = ranges(blk.pos_offsets[br], np.diff(blk.pos_offsets)[br])
        owner = np.repeat(slots, np.diff(blk.pos_offsets)[br])
        keep = blk.pos[src] < L[owner]
        src, owner = src[keep], owner[keep]
        ps = blk.pos[src]
        dst = row[owner] * T + off[owner] + ps - 1
        kb = blk.ids.shape[1]
        valid = np.arange(kb)[None, :] < blk.n_entries[src][:, None]
        o["pos"][dst], o["target_mask"][dst], o["labels"][dst] = ps, blk.loss_mask[src], blk.labels[src]
        o["tail_mass"][dst], o["teacher_entropy"][dst] = blk.tail_mass[src], blk.entropy[src]
        o["label_logprob"][dst] = blk.label_logprob[src]
        o["topk_ids"][dst, :kb] = np.where(valid, blk.ids[src], 0)
        o["topk_valid"][dst, :kb] = valid
        if kind.values:
            o["topk_logprobs"][dst, :kb] = np.where(valid, blk.logprobs[src], -np.inf)
        if kind.sampled:
            o["counts"][dst, :kb] = blk.counts[src]
        if kind.tail:
            ub = blk.tail_ids.shape[1]
            tv = np.arange(ub)[None, :] < blk.n_tail[src][:, None]
            o["tail_ids"][dst, :ub] = np.where(tv, blk.tail_ids[src], 0)
            o["tail_valid"][dst, :ub] = tv
            o["tail_logprobs"][dst, :ub] = np.where(tv, blk.tail_logprobs[src], -np.inf)
            o["tail_counts"][dst, :ub] = blk.tail_counts[src]
        if kind.tempered:
            o["proposal_log_norm"][dst] = blk.proposal_log_norm[src]
    if score_names:
        vals = np.full((B * T, len(score_names)), np.nan, np.float32)
        got = [(i, *scores[sid]) for i, sid in enumerate(seq_ids) if sid in scores]
        if got:
            who = np.concatenate([np.full(q.size, i) for i, q, _ in got])
            ps = np.concatenate([q for _, q, _ in got])
            v = np.concatenate([v for _, _, v in got])
            keep = (ps >= 1) & (ps < L[who])
            vals[(row[who] * T + off[who] + ps - 1)[keep]] = v[keep]
        for i, name in enumerate(score_names):
            o[f"score_{name}"] = vals[:, i]
    out: dict[str, Any] = {k: torch.from_numpy(v.reshape(B, T, *v.shape[1:])) for k, v in o.items()}
    out["seq_ids"], out["epoch"] = list(seq_ids), epoch
    return out
