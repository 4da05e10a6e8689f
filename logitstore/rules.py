"""The sparse-entry rules: which (token id, logprob) entries a cache keeps per position.

- ``TopK(k)``: the k most likely tokens.
- ``MassTopK(p, k)``: the smallest prefix of the sorted distribution whose mass is
  >= p, capped at k entries.
- ``Sampled(draws, k)``: ``draws`` ids drawn with replacement from the full
  distribution; the unique ones are kept (at most k, most likely first) with their
  counts, so ``counts / draws`` is an unbiased estimate of the teacher
  distribution (Anshumann et al., "Sparse Logit Sampling", ACL 2025).

``sparsify`` is the reference implementation over full-vocabulary logprobs in
numpy; backends may compute the same thing faster (in torch, in chunks), and the
tests hold them to it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from logitstore.errors import InvalidInputError


@dataclasses.dataclass(frozen=True)
class TopK:
    k: int
    name = "topk"

    def __post_init__(self):
        _check_k(self.k)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": "topk", "k": self.k}


@dataclasses.dataclass(frozen=True)
class MassTopK:
    p: float
    k: int
    name = "mass"

    def __post_init__(self):
        _check_k(self.k)
        if not (0.0 < self.p <= 1.0):
            raise InvalidInputError(f"mass p={self.p} must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return {"rule": "mass", "p": self.p, "k": self.k}


@dataclasses.dataclass(frozen=True)
class Sampled:
    draws: int
    k: int = 0
    """cap on unique entries kept; 0 means ``draws`` (no cap can bind)"""
    name = "sample"

    def __post_init__(self):
        if not (1 <= self.draws <= 65535):
            raise InvalidInputError(f"draws={self.draws} must be in [1, 65535] (counts are uint16)")
        if self.k == 0:
            object.__setattr__(self, "k", self.draws)
        _check_k(self.k)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": "sample", "draws": self.draws, "k": self.k}


Rule = TopK | MassTopK | Sampled


def _check_k(k: int) -> None:
    if not (1 <= int(k) <= 65535):
        raise InvalidInputError(f"k={k} must be in [1, 65535]")


def rule_from_dict(d: dict[str, Any]) -> Rule:
    kind = d.get("rule")
    if kind == "topk":
        return TopK(int(d["k"]))
    if kind == "mass":
        return MassTopK(float(d["p"]), int(d["k"]))
    if kind == "sample":
        return Sampled(int(d["draws"]), int(d["k"]))
    raise InvalidInputError(f"unknown sparse-entry rule {kind!r}; allowed: topk, mass, sample")


@dataclasses.dataclass
class Entries:
    """Sparse entries of N positions, padded to ``[N, K]`` (``n_entries`` valid per row)."""

    ids: np.ndarray  # [N, K] int32
    logprobs: np.ndarray  # [N, K] float32, descending in the valid prefix
    n_entries: np.ndarray  # [N] int32
    tail_mass: np.ndarray  # [N] float64: 1 - sum(p) over the valid entries
    counts: np.ndarray | None = None  # [N, K] uint16 for Sampled


def sparsify(logprobs: np.ndarray, rule: Rule, rng: np.random.Generator | None = None) -> Entries:
    """Reference: full-vocabulary ``[N, V]`` logprobs -> the entries ``rule`` keeps."""
    lp = np.asarray(logprobs, dtype=np.float64)
    n, v = lp.shape
    order = np.argsort(-lp, axis=1, kind="stable")
    if isinstance(rule, Sampled):
        rng = rng or np.random.default_rng(0)
        p = np.exp(lp)
        cdf = np.cumsum(p, axis=1)
        u = rng.random((n, rule.draws)) * cdf[:, -1:]
        draws = np.array([np.searchsorted(cdf[i], u[i], side="right") for i in range(n)],
                         dtype=np.int64).reshape(n, rule.draws).clip(0, v - 1)
        return entries_from_draws(lp, draws, rule.k)
    k = min(rule.k, v)
    return cut(order[:, :k], np.take_along_axis(lp, order[:, :k], axis=1), rule)


def cut(ids: np.ndarray, logprobs: np.ndarray, rule: Rule) -> Entries:
    """The entries ``rule`` (top-k or mass) keeps of candidates ``[N, C]`` already sorted by logprob, most
    likely first (-inf pads missing ones): the first k, or the smallest prefix with mass >= p capped at k.
    ``sparsify`` passes the whole vocabulary's top k; a backend that only sees the top C passes those."""
    if isinstance(rule, Sampled):
        raise InvalidInputError("rule sample draws from the full distribution; it cannot be cut from top-k candidates")
    n, c = ids.shape
    k = min(rule.k, c)
    ids, vals = ids[:, :k], np.asarray(logprobs, np.float64)[:, :k]
    if isinstance(rule, MassTopK):
        csum = np.cumsum(np.exp(vals), axis=1)
        n_ent = np.minimum((csum < rule.p).sum(axis=1) + 1, k)
    else:
        n_ent = np.full(n, k)
    n_ent = np.minimum(n_ent, np.isfinite(vals).sum(axis=1))  # fewer candidates than k (a vocabulary under k)
    valid = np.arange(k)[None, :] < n_ent[:, None]
    tail = 1.0 - np.where(valid, np.exp(vals), 0.0).sum(axis=1)
    return Entries(
        ids=np.where(valid, ids, 0).astype(np.int32),
        logprobs=np.where(valid, vals, -np.inf).astype(np.float32),
        n_entries=n_ent.astype(np.int32),
        tail_mass=np.clip(tail, 0.0, 1.0),
    )


def entries_from_draws(logprobs: np.ndarray, draws: np.ndarray, cap: int) -> Entries:
    """Full ``[N, V]`` logprobs and ``[N, D]`` drawn ids -> unique ids with counts, most likely first."""
    lp = np.asarray(logprobs, dtype=np.float64)
    n = lp.shape[0]
    uniq = [np.unique(d, return_counts=True) for d in np.asarray(draws)]
    kk = min(cap, max((len(u) for u, _ in uniq), default=1))
    ids = np.zeros((n, kk), np.int32)
    vals = np.full((n, kk), -np.inf, np.float32)
    counts = np.zeros((n, kk), np.uint16)
    n_ent = np.zeros(n, np.int32)
    tail = np.ones(n)
    for i, (u, c) in enumerate(uniq):
        o = np.lexsort((u, -lp[i, u]))[:kk]  # by logprob desc, ties by id
        m = len(o)
        ids[i, :m], vals[i, :m], counts[i, :m], n_ent[i] = u[o], lp[i, u[o]], c[o], m
        tail[i] = 1.0 - np.exp(lp[i, u[o]]).sum()
    return Entries(ids, vals, n_ent, np.clip(tail, 0.0, 1.0), counts)
