"""The sparse-entry rules: which (token id, logprob) entries a cache keeps per position.

- ``TopK(k)``: the k most likely tokens.
- ``MassTopK(p, k)``: the smallest prefix of the sorted distribution whose mass is
  >= p, capped at k entries.
- ``Sampled(draws, k, proposal_temperature=T)``: ``draws`` ids drawn with replacement from
  the proposal ``q ∝ p^(1/T)`` over the full vocabulary (T = 1: the teacher itself); the
  unique ones are kept (at most k, most likely first) with their counts.
- ``TopKTail(k, tail_draws, proposal_temperature=T)``: the exact top k (as ``TopK``) plus
  ``tail_draws`` ids drawn with replacement from the proposal restricted to the *tail*
  (the tokens outside the top k, renormalised), kept as unique tail ids with counts.

The estimators (Anshumann et al., "Sparse Logit Sampling", ACL 2025; FORMAT.md, "Sparse
entries"): with the stored exact logprobs ``lp`` and the per-position log-normaliser of the
proposal, ``log Z = logsumexp(lp / T)`` over the proposal's support, a draw ``x`` has
``q_x = exp(lp_x / T - log Z)`` and importance weight ``p_x / q_x = exp(lp_x (1 - 1/T) + log Z)``.
Then ``(c_x / D) * p_x / q_x`` is an unbiased estimate of ``p_x`` on the support (for T = 1 and
the full vocabulary, ``c_x / D``; for the tail at T = 1, ``m c_x / D`` with m the tail mass), and
the head's exact ``p_j`` plus the tail's estimates is an unbiased estimate of the whole
distribution with less variance than sampling everything.

``sparsify`` is the reference implementation over full-vocabulary logprobs in numpy
(inverse-CDF draws); backends compute the same thing faster (in torch, in chunks) and the
tests hold them to it (exactly for the deterministic rules, in distribution for the sampled ones).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from logitstore.errors import InvalidInputError


@dataclasses.dataclass(frozen=True)
class TopK:
    k: int
    name = "topk"
    draws = 0
    tempered = False
    proposal_temperature = 1.0
    systematic = False

    def __post_init__(self):
        _check_k(self.k)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": "topk", "k": self.k}


@dataclasses.dataclass(frozen=True)
class MassTopK:
    p: float
    k: int
    name = "mass"
    draws = 0
    tempered = False
    proposal_temperature = 1.0
    systematic = False

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
    proposal_temperature: float = 1.0
    """draw from q ∝ p^(1/T); T > 1 gives more distinct tokens per draw (importance weights correct for it)"""
    systematic: bool = False
    """the D draws are systematic (one uniform offset, D evenly spaced points of the CDF) instead of independent"""
    name = "sample"

    def __post_init__(self):
        _check_draws("draws", self.draws)
        if self.k == 0:
            object.__setattr__(self, "k", self.draws)
        _check_k(self.k)
        _check_temperature(self.proposal_temperature)
        _check_systematic(self.systematic)

    @property
    def tempered(self) -> bool:
        return self.proposal_temperature != 1.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rule": "sample", "draws": self.draws, "k": self.k}
        if self.tempered:
            d["proposal_temperature"] = self.proposal_temperature
        if self.systematic:
            d["design"] = "systematic"
        return d


@dataclasses.dataclass(frozen=True)
class TopKTail:
    k: int
    """the exact head: the k most likely tokens"""
    tail_draws: int
    """draws with replacement from the tail (the tokens outside the head), per position"""
    proposal_temperature: float = 1.0
    """draw from the tail of q ∝ p^(1/T)"""
    systematic: bool = False
    """the D draws are systematic (one uniform offset, D evenly spaced points of the CDF) instead of independent"""
    name = "topk_tail"

    def __post_init__(self):
        _check_k(self.k)
        _check_draws("tail_draws", self.tail_draws)
        _check_temperature(self.proposal_temperature)
        _check_systematic(self.systematic)

    @property
    def draws(self) -> int:
        return self.tail_draws

    @property
    def tempered(self) -> bool:
        return self.proposal_temperature != 1.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rule": "topk_tail", "k": self.k, "tail_draws": self.tail_draws}
        if self.tempered:
            d["proposal_temperature"] = self.proposal_temperature
        if self.systematic:
            d["design"] = "systematic"
        return d


Rule = TopK | MassTopK | Sampled | TopKTail


def _check_k(k: int) -> None:
    if not (1 <= int(k) <= 65535):
        raise InvalidInputError(f"k={k} must be in [1, 65535]")


def _check_draws(name: str, draws: int) -> None:
    if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or not (1 <= draws <= 65535):
        raise InvalidInputError(f"{name}={draws!r} must be an integer in [1, 65535] (counts are uint16)")


def _check_temperature(t: float) -> None:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
        raise InvalidInputError(f"proposal_temperature={t!r} must be a finite number > 0 (q ∝ p^(1/T))")


def _check_systematic(s: bool) -> None:
    if not isinstance(s, bool):
        raise InvalidInputError(f"systematic={s!r} must be True or False")


#: the manifest's ``design`` of a rule that draws: absent for independent draws, else this
DESIGNS = ("independent", "systematic")


def rule_from_dict(d: dict[str, Any]) -> Rule:
    kind = d.get("rule")
    t = float(d.get("proposal_temperature", 1.0))
    design = d.get("design", "independent")
    if design not in DESIGNS or (design != "independent" and kind not in ("sample", "topk_tail")):
        raise InvalidInputError(f"rule {kind!r} with design {design!r}: a design is one of {', '.join(DESIGNS)}, "
                                "and only rules sample and topk_tail draw")
    s = design == "systematic"
    if kind == "topk":
        return TopK(int(d["k"]))
    if kind == "mass":
        return MassTopK(float(d["p"]), int(d["k"]))
    if kind == "sample":
        return Sampled(int(d["draws"]), int(d["k"]), t, s)
    if kind == "topk_tail":
        return TopKTail(int(d["k"]), int(d["tail_draws"]), t, s)
    raise InvalidInputError(f"unknown sparse-entry rule {kind!r}; allowed: topk, mass, sample, topk_tail")


@dataclasses.dataclass
class Entries:
    """Sparse entries of N positions, padded to ``[N, K]`` (``n_entries`` valid per row), and, under
    ``TopKTail``, the tail draws padded to ``[N, U]`` (``n_tail`` valid per row)."""

    ids: np.ndarray  # [N, K] int32
    logprobs: np.ndarray  # [N, K] float32, descending in the valid prefix
    n_entries: np.ndarray  # [N] int32
    tail_mass: np.ndarray  # [N] float64: 1 - sum(p) over the valid entries (the head under TopKTail)
    counts: np.ndarray | None = None  # [N, K] uint16 for Sampled
    tail_ids: np.ndarray | None = None  # [N, U] int32, unique, outside the head, by logprob descending
    tail_logprobs: np.ndarray | None = None  # [N, U] float32
    tail_counts: np.ndarray | None = None  # [N, U] uint16, summing to tail_draws (0 where the tail is empty)
    n_tail: np.ndarray | None = None  # [N] int32
    proposal_log_norm: np.ndarray | None = None  # [N] float64: logsumexp(lp / T) over the proposal's support


def sparsify(logprobs: np.ndarray, rule: Rule, rng: np.random.Generator | None = None) -> Entries:
    """Reference: full-vocabulary ``[N, V]`` logprobs -> the entries ``rule`` keeps."""
    lp = np.asarray(logprobs, dtype=np.float64)
    n, v = lp.shape
    rng = rng or np.random.default_rng(0)
    if isinstance(rule, Sampled):
        support = np.ones((n, v), bool)
        draws, log_norm = draw(lp, support, rule.draws, rule.proposal_temperature, rng, rule.systematic)
        e = entries_from_draws(lp, draws, rule.k)
        e.proposal_log_norm = log_norm if rule.tempered else None
        return e
    order = np.argsort(-lp, axis=1, kind="stable")
    k = min(rule.k, v)
    e = cut(order[:, :k], np.take_along_axis(lp, order[:, :k], axis=1), rule)
    if isinstance(rule, TopKTail):
        support = np.ones((n, v), bool)
        np.put_along_axis(support, order[:, :k], False, axis=1)
        draws, log_norm = draw(lp, support, rule.tail_draws, rule.proposal_temperature, rng, rule.systematic)
        t = entries_from_draws(lp, np.where(support.any(1, keepdims=True), draws, -1), rule.tail_draws)
        e.tail_ids, e.tail_logprobs, e.tail_counts, e.n_tail = t.ids, t.logprobs, t.counts, t.n_entries
        e.proposal_log_norm = log_norm if rule.tempered else None
    return e


def draw(lp: np.ndarray, support: np.ndarray, d: int, temperature: float, rng: np.random.Generator,
         systematic: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``d`` inverse-CDF draws per row from ``q ∝ exp(lp / T)`` restricted to ``support [N, V]``, and each row's
    ``log Z = logsumexp(lp / T)`` over the support (-inf, and draws -1, where the support has no mass).
    Independent draws, or ``systematic``: the points ``(u + i) / d``, i < d, of one uniform u per row."""
    n, _ = lp.shape
    w = np.where(support, np.exp(lp / temperature), 0.0)
    cdf = np.cumsum(w, axis=1)
    total = cdf[:, -1]
    u = (rng.random((n, 1)) + np.arange(d)[None, :]) / d if systematic else rng.random((n, d))
    u = u * total[:, None]
    out = np.array([np.searchsorted(cdf[i], u[i], side="right") for i in range(n)], np.int64).reshape(n, d)
    out = np.where(total[:, None] > 0, np.minimum(out, lp.shape[1] - 1), -1)
    with np.errstate(divide="ignore"):
        return out, np.log(total)


def cut(ids: np.ndarray, logprobs: np.ndarray, rule: Rule) -> Entries:
    """The entries ``rule`` (top-k, mass, or the head of topk_tail) keeps of candidates ``[N, C]`` already sorted
    by logprob, most likely first (-inf pads missing ones): the first k, or the smallest prefix with mass >= p
    capped at k. ``sparsify`` passes the whole vocabulary's top k; a backend that only sees the top C passes
    those."""
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


def has_certain_head(rule: Rule) -> bool:
    """Whether a rule's entries include a deterministic head besides its draws: systematic draws, none left out by a
    cap (``certain_head``)."""
    return rule.name == "sample" and rule.systematic and rule.k >= rule.draws


def certain_head(rule: Rule, ids: np.ndarray, logprobs: np.ndarray, n_entries: np.ndarray, tail_mass: np.ndarray,
                 proposal_log_norm: np.ndarray | None = None, *, at_least: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The entries of a systematic ``Sampled`` cache that its draws hit whatever their offset: ``D q_x >= 1`` with
    ``q_x = exp(lp_x / T - log Z)`` (``p_x >= 1/D`` at T = 1), i.e. every id above a probability threshold, the exact
    top-m of the position for a varying m; decided on the stored (decoded) logprobs, so up to the codec's rounding at
    the threshold. ``at_least``: keep that many entries per position even where fewer are certain (the most likely
    drawn ones). Returns ``(ids, logprobs, n_entries, tail_mass)`` of the same widths, most likely first, padded with
    -1 / -inf; the left-out draws' mass joins the tail mass."""
    if not has_certain_head(rule):
        raise InvalidInputError(f"rule {rule.to_dict()}: only systematic draws with no cap have a certain head")
    lp = np.asarray(logprobs, np.float64)
    valid = np.arange(lp.shape[1])[None, :] < np.asarray(n_entries)[:, None]
    lp_q = lp if rule.proposal_temperature == 1.0 else \
        lp / rule.proposal_temperature - np.asarray(proposal_log_norm, np.float64)[:, None]
    order = np.argsort(np.where(valid, -lp, np.inf), axis=1, kind="stable")  # most likely first
    lp_sorted = np.take_along_axis(np.where(valid, lp, -np.inf), order, 1)
    certain = np.take_along_axis(valid & (lp_q + math.log(rule.draws) >= 0), order, 1).sum(1)
    n = np.minimum(np.maximum(certain, at_least), np.asarray(n_entries)).astype(np.int32)
    keep = np.arange(lp.shape[1])[None, :] < n[:, None]
    dropped = np.where(np.isfinite(lp_sorted) & ~keep, np.exp(lp_sorted), 0.0).sum(1)
    return (np.where(keep, np.take_along_axis(np.asarray(ids), order, 1), -1).astype(np.asarray(ids).dtype),
            np.where(keep, lp_sorted, -np.inf).astype(np.asarray(logprobs).dtype), n,
            (np.asarray(tail_mass, np.float64) + dropped).astype(np.asarray(tail_mass).dtype))


def entries_from_draws(logprobs: np.ndarray, draws: np.ndarray, cap: int) -> Entries:
    """Full ``[N, V]`` logprobs and ``[N, D]`` drawn ids (-1: no draw) -> unique ids with counts, most likely first;
    ``tail_mass`` is the mass outside the unique ids."""
    lp = np.asarray(logprobs, dtype=np.float64)
    n = lp.shape[0]
    uniq = [np.unique(d[d >= 0], return_counts=True) for d in np.asarray(draws)]
    kk = max(1, min(cap, max((len(u) for u, _ in uniq), default=1)))
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
