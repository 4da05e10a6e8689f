"""The data contract a record must meet before it is written: shapes, ranges, order (FORMAT.md, "Invariants").

``Contract(rule, codec, vocab_size)`` is what ``CacheWriter.add`` runs on each
``SequenceRecord``: ``arrays`` converts it to numpy (torch tensors without importing torch)
and checks its shapes, ``check`` enforces the per-position invariants vectorised (ids in
range and distinct, logprobs finite, ``<= 0`` and descending, tail mass in ``[0, 1]``,
counts under rule sample, tail draws under rule topk_tail (distinct, outside the head, counts
summing to the draws), the policy's values of a cache with responses from another model (its
logprobs finite and ``<= 0``, its entropies finite and ``>= 0``), what the codec can represent), and
``row`` makes the buffered
row with the per-sequence aggregates computed from the full-precision inputs. ``verify``
checks the same invariants on decoded shards (``has_repeats`` is shared).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from logitstore import codec as C
from logitstore.errors import InvalidInputError
from logitstore.records import SequenceRecord
from logitstore.rules import Rule, Sampled, TopKTail

LP_TOL = 1e-4  # logprobs/entropies this far past their bound are rounding noise and get clamped


def as_numpy(x, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float8_e4m3fn", "torch.float8_e5m2"):  # numpy has no such dtype
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


@dataclasses.dataclass
class RecordArrays:
    """One record's per-position values as numpy arrays (``Contract.arrays``)."""

    pos: np.ndarray  # [N] int32
    ids: np.ndarray  # [N, K]
    lp: np.ndarray  # [N, K] float32
    n_ent: np.ndarray  # [N] int32
    counts: np.ndarray | None  # [N, K]
    label_lp: np.ndarray  # [N] float32
    entropy: np.ndarray  # [N] float32
    tail: np.ndarray  # [N] float32
    mask: np.ndarray  # [N] bool
    argmax: np.ndarray | None  # [N]
    fixed: bool = True  # every position has K entries
    valid: np.ndarray | None = None  # [N, K] bool
    ids_v: np.ndarray | None = None  # the valid entries' ids, flat
    lp_v: np.ndarray | None = None  # the valid entries' logprobs, flat
    drawn: TailArrays | None = None  # rule topk_tail: the tail draws
    log_norm: np.ndarray | None = None  # [N] float32, a tempered proposal's log Z
    policy_lp: np.ndarray | None = None  # [N] float32, the policy's logprob of each label (responses from a policy)
    policy_ent: np.ndarray | None = None  # [N] float32, the policy's entropy


@dataclasses.dataclass
class TailArrays:
    """The tail draws of one record under rule topk_tail: padded ``[N, U]`` and their valid entries, flat."""

    ids: np.ndarray  # [N, U]
    lp: np.ndarray  # [N, U] float32
    counts: np.ndarray  # [N, U]
    n: np.ndarray  # [N] int32, valid entries per position (0 where the tail has no mass)
    valid: np.ndarray  # [N, U] bool


class Contract:
    """The checks of one cache's rule, codec and vocabulary (see the module docstring)."""

    def __init__(self, rule: Rule, codec: C.Codec, vocab_size: int, *, policy: bool = False):
        self.rule, self.codec, self.vocab_size, self.policy = rule, codec, vocab_size, policy

    def arrays(self, sid: str, tok: np.ndarray, rec: SequenceRecord) -> RecordArrays:
        """The record's per-position values as numpy arrays of the writer's dtypes, shapes checked."""
        sc = rec.scored
        T = tok.size
        pos = (np.arange(1, T, dtype=np.int32) if rec.positions is None
               else as_numpy(rec.positions).astype(np.int32).ravel())
        N = pos.size
        ids = as_numpy(sc.ids)
        logprobs = sc.logprobs
        if logprobs is None:
            if self.codec.values != "none":
                raise InvalidInputError(f"seq {sid}: logprobs are required unless the codec stores none")
            logprobs = np.zeros(ids.shape, np.float32)  # placeholders: checked trivially, never stored
        lp = as_numpy(logprobs, np.float32)
        if ids.ndim != 2 or lp.shape != ids.shape or ids.shape[0] != N:
            raise InvalidInputError(
                f"seq {sid}: ids {ids.shape} and logprobs {lp.shape} must both be [N, K] with N={N} positions")
        K = ids.shape[1]
        if K > self.rule.k or K < 1:
            raise InvalidInputError(f"seq {sid}: {K} entries per position; the rule allows 1..{self.rule.k}")
        n_ent = np.full(N, K, np.int32) if sc.n_entries is None else as_numpy(sc.n_entries).astype(np.int32).ravel()
        cnt = None if sc.counts is None else as_numpy(sc.counts)
        if isinstance(self.rule, Sampled) != (cnt is not None):
            raise InvalidInputError(f"seq {sid}: counts are required under rule sample and only there")
        a = RecordArrays(pos=pos, ids=ids, lp=lp, n_ent=n_ent, counts=cnt,
                    label_lp=as_numpy(sc.label_logprob, np.float32).ravel(),
                    entropy=as_numpy(sc.entropy, np.float32).ravel(), tail=as_numpy(sc.tail_mass, np.float32).ravel(),
                    mask=np.ones(N, bool) if rec.loss_mask is None else as_numpy(rec.loss_mask).astype(bool).ravel(),
                    argmax=None if sc.argmax is None else as_numpy(sc.argmax).ravel())
        for name, v in (("n_entries", a.n_ent), ("label_logprob", a.label_lp), ("entropy", a.entropy),
                        ("tail_mass", a.tail), ("loss_mask", a.mask)):
            if v.size != N:
                raise InvalidInputError(f"seq {sid}: {name} has {v.size} values for {N} positions")
        if T and (tok.min() < 0 or tok.max() >= self.vocab_size):
            raise InvalidInputError(f"seq {sid}: input_ids outside [0, {self.vocab_size})")
        if N and (pos[0] < 1 or pos[-1] >= T or (N > 1 and np.diff(pos).min() <= 0)):
            raise InvalidInputError(f"seq {sid}: positions must be strictly increasing within [1, {T - 1}]")
        if N and (n_ent.min() < 1 or n_ent.max() > K):
            raise InvalidInputError(f"seq {sid}: n_entries must be within [1, {K}]")
        a.fixed = not N or int(n_ent.min()) == K  # every position has K entries: no masks, no copies
        a.valid = np.ones((N, K), bool) if a.fixed else np.arange(K)[None, :] < n_ent[:, None]
        a.ids_v, a.lp_v = (ids.reshape(-1), lp.reshape(-1)) if a.fixed else (ids[a.valid], lp[a.valid])
        a.drawn = self._tail_arrays(sid, sc, N)
        tempered = getattr(self.rule, "tempered", False)
        if tempered != (sc.proposal_log_norm is not None):
            raise InvalidInputError(f"seq {sid}: proposal_log_norm is required with a proposal temperature != 1 "
                                    "and only there")
        if tempered:
            a.log_norm = as_numpy(sc.proposal_log_norm, np.float32).ravel()
            if a.log_norm.size != N:
                raise InvalidInputError(f"seq {sid}: proposal_log_norm has {a.log_norm.size} values for {N} positions")
        self._policy_arrays(sid, rec, a, N)
        return a

    def _policy_arrays(self, sid: str, rec: SequenceRecord, a: RecordArrays, N: int) -> None:
        given = [n for n in ("policy_logprob", "policy_entropy") if getattr(rec, n) is not None]
        if not self.policy:
            if given:
                raise InvalidInputError(f"seq {sid}: {', '.join(given)} belong to a cache whose responses come from "
                                        "a policy (CacheWriter(policy=True)); this one has none")
            return
        if len(given) != 2:
            raise InvalidInputError(f"seq {sid}: this cache's responses come from a policy: policy_logprob and "
                                    "policy_entropy are required")
        a.policy_lp = as_numpy(rec.policy_logprob, np.float32).ravel()
        a.policy_ent = as_numpy(rec.policy_entropy, np.float32).ravel()
        for name, v in (("policy_logprob", a.policy_lp), ("policy_entropy", a.policy_ent)):
            if v.size != N:
                raise InvalidInputError(f"seq {sid}: {name} has {v.size} values for {N} positions")

    def _tail_arrays(self, sid: str, sc, N: int) -> TailArrays | None:
        given = [name for name in ("tail_ids", "tail_logprobs", "tail_counts") if getattr(sc, name) is not None]
        if not isinstance(self.rule, TopKTail):
            if given or sc.n_tail is not None:
                raise InvalidInputError(f"seq {sid}: tail draws ({', '.join(given) or 'n_tail'}) belong to rule "
                                        f"topk_tail only; this cache's rule is {self.rule.name}")
            return None
        if len(given) != 3:
            raise InvalidInputError(f"seq {sid}: rule topk_tail needs tail_ids, tail_logprobs and tail_counts")
        ids, lp, cnt = as_numpy(sc.tail_ids), as_numpy(sc.tail_logprobs, np.float32), as_numpy(sc.tail_counts)
        if ids.ndim != 2 or ids.shape[0] != N or lp.shape != ids.shape or cnt.shape != ids.shape or ids.shape[1] < 1:
            raise InvalidInputError(f"seq {sid}: tail_ids {ids.shape}, tail_logprobs {lp.shape} and tail_counts "
                                    f"{cnt.shape} must all be [N, U] with N={N} and U >= 1")
        U = ids.shape[1]
        if U > self.rule.tail_draws:
            raise InvalidInputError(f"seq {sid}: {U} tail entries per position, more than tail_draws="
                                    f"{self.rule.tail_draws}")
        n = np.full(N, U, np.int32) if sc.n_tail is None else as_numpy(sc.n_tail).astype(np.int32).ravel()
        if n.size != N or (N and (n.min() < 0 or n.max() > U)):
            raise InvalidInputError(f"seq {sid}: n_tail must be [N] within [0, {U}]")
        return TailArrays(ids=ids, lp=lp, counts=cnt, n=n, valid=np.arange(U)[None, :] < n[:, None])

    def check(self, sid: str, a: RecordArrays) -> None:
        """The data contract of FORMAT.md's invariants, vectorised over the sequence's entries."""
        ids, lp, valid, ids_v, lp_v, K = a.ids, a.lp, a.valid, a.ids_v, a.lp_v, a.ids.shape[1]
        step = self.codec.logprob_step
        if ids_v.size and (ids_v.min() < 0 or ids_v.max() >= self.vocab_size):
            raise InvalidInputError(f"seq {sid}: entry ids outside [0, {self.vocab_size})")
        if not np.isfinite(lp_v).all() or (lp_v.size and lp_v.max() > LP_TOL):
            raise InvalidInputError(f"seq {sid}: entry logprobs must be finite and <= 0")
        if K > 1 and ((lp[:, 1:] > lp[:, :-1]) if a.fixed else ((lp[:, 1:] > lp[:, :-1]) & valid[:, 1:])).any():
            raise InvalidInputError(f"seq {sid}: entries must be sorted by logprob, most likely first")
        if K > 1 and has_repeats(ids, None if a.fixed else valid):
            raise InvalidInputError(f"seq {sid}: a position lists the same token id twice")
        if not (np.isfinite(a.label_lp).all() and a.label_lp.max(initial=0) <= LP_TOL):
            raise InvalidInputError(f"seq {sid}: label_logprob must be finite and <= 0")
        if not (np.isfinite(a.entropy).all() and a.entropy.min(initial=0) >= -LP_TOL):
            raise InvalidInputError(f"seq {sid}: entropy must be finite and >= 0")
        if not (a.tail.min(initial=0) >= -LP_TOL and a.tail.max(initial=0) <= 1 + LP_TOL):
            raise InvalidInputError(f"seq {sid}: tail_mass must be within [0, 1]")
        if self.codec.values == "qdelta" and lp_v.size and lp_v.min() < -C.QDELTA_MAX * step:
            raise InvalidInputError(f"seq {sid}: logprobs below {-C.QDELTA_MAX * step:.0f} nats "
                                    f"do not fit the qdelta codec at step {step}")
        if a.policy_lp is not None:
            if not (np.isfinite(a.policy_lp).all() and a.policy_lp.max(initial=0) <= LP_TOL):
                raise InvalidInputError(f"seq {sid}: policy_logprob must be finite and <= 0")
            if not (np.isfinite(a.policy_ent).all() and a.policy_ent.min(initial=0) >= -LP_TOL):
                raise InvalidInputError(f"seq {sid}: policy_entropy must be finite and >= 0")
        if "fp16" in (self.codec.values, self.codec.scalars):
            floor = -65504.0  # the most negative finite IEEE half
            scalar_min = min(a.label_lp.min(initial=0), 0 if a.policy_lp is None else a.policy_lp.min(initial=0))
            if (self.codec.values == "fp16" and lp_v.min(initial=0) < floor) or \
                    (self.codec.scalars == "fp16" and scalar_min < floor):
                raise InvalidInputError(f"seq {sid}: logprobs below {floor} do not fit the fp16 codec")
        cnt = a.counts
        if cnt is not None and (cnt.shape != ids.shape or (cnt[valid] < 1).any()
                                or (np.where(valid, cnt, 0).sum(axis=1) > self.rule.draws).any()):
            raise InvalidInputError(f"seq {sid}: counts must be [N, K], >= 1 on valid entries and sum to at most "
                                    f"draws={self.rule.draws} per position")
        if a.drawn is not None:
            self._check_tail(sid, a)
        if a.log_norm is not None:
            ok = np.isfinite(a.log_norm)
            if a.drawn is not None:
                ok |= np.isneginf(a.log_norm) & (a.drawn.n == 0)
            if not ok.all():
                raise InvalidInputError(f"seq {sid}: proposal_log_norm must be finite (-inf only where no tail is "
                                        "drawn)")

    def _check_tail(self, sid: str, a: RecordArrays) -> None:
        """Tail draws: ids in range, distinct and outside the head; logprobs finite, <= 0, descending and no more
        likely than the head's last entry; counts >= 1 summing to exactly tail_draws where the tail is drawn."""
        t, D = a.drawn, self.rule.tail_draws
        ids_v, lp_v = t.ids[t.valid], t.lp[t.valid]
        if ids_v.size and (ids_v.min() < 0 or ids_v.max() >= self.vocab_size):
            raise InvalidInputError(f"seq {sid}: tail ids outside [0, {self.vocab_size})")
        if not np.isfinite(lp_v).all() or (lp_v.size and lp_v.max() > LP_TOL):
            raise InvalidInputError(f"seq {sid}: tail logprobs must be finite and <= 0")
        if t.ids.shape[1] > 1 and ((t.lp[:, 1:] > t.lp[:, :-1]) & t.valid[:, 1:]).any():
            raise InvalidInputError(f"seq {sid}: tail draws must be sorted by logprob, most likely first")
        both = np.concatenate([a.ids, t.ids], 1)
        if has_repeats(both, np.concatenate([a.valid, t.valid], 1)):
            raise InvalidInputError(f"seq {sid}: a tail id repeats another tail id or a head entry of its position")
        head_min = np.where(a.valid, a.lp, np.inf).min(axis=1)
        if (np.where(t.valid, t.lp, -np.inf).max(axis=1, initial=-np.inf) > head_min + LP_TOL).any():
            raise InvalidInputError(f"seq {sid}: a tail draw is more likely than the head's last entry (the head is "
                                    "the top k)")
        sums = np.where(t.valid, t.counts, 0).sum(axis=1)
        if (t.counts[t.valid] < 1).any() or (sums != np.where(t.n > 0, D, 0)).any():
            raise InvalidInputError(f"seq {sid}: tail counts must be >= 1 and sum to tail_draws={D} per position "
                                    "(0 where no tail is drawn)")
        if self.codec.values == "qdelta" and lp_v.size and lp_v.min() < -C.QDELTA_MAX * self.codec.logprob_step:
            raise InvalidInputError(f"seq {sid}: tail logprobs do not fit the qdelta codec")

    def row(self, sid: str, tok: np.ndarray, rec: SequenceRecord, a: RecordArrays) -> dict[str, Any]:
        """The buffered row of one sequence: copies of its values (a caller may reuse its arrays) and the
        aggregates over its target positions, from the full-precision inputs."""
        lp_v = np.minimum(a.lp_v, 0) if a.lp_v.size and a.lp_v.max() > 0 else a.lp_v  # rounding noise above 0
        top1 = a.argmax
        if top1 is None and not isinstance(self.rule, Sampled):
            top1 = a.ids[:, 0]
        mask, labels = a.mask, tok[a.pos]
        nt = int(mask.sum())
        agg = {
            "mean_entropy": float(a.entropy[mask].mean()) if nt else None,
            "teacher_nll": float(-a.label_lp[mask].mean()) if nt else None,
            "token_accuracy": float((top1[mask] == labels[mask]).mean()) if nt and top1 is not None else None,
        }
        if rec.aggregates is not None:
            unknown = set(rec.aggregates) - set(agg)
            if unknown:
                raise InvalidInputError(f"seq {sid}: aggregates {sorted(unknown)} unknown; allowed {sorted(agg)}")
            agg.update({k: None if v is None else float(v) for k, v in rec.aggregates.items()})
        return dict(
            seq_id=sid, record=int(rec.record), sample=int(rec.sample), correct=rec.correct, input_ids=tok.copy(),
            pos=a.pos, loss_mask=mask, label_logprob=np.minimum(a.label_lp, 0), entropy=np.maximum(a.entropy, 0),
            tail_mass=np.clip(a.tail, 0, 1), ids=a.ids_v.astype(np.int32), lp=lp_v.copy() if a.fixed else lp_v,
            n_ent=a.n_ent, counts=None if a.counts is None else a.counts[a.valid].astype(np.uint16), n_targets=nt,
            tail_ids=None if a.drawn is None else a.drawn.ids[a.drawn.valid].astype(np.int32),
            tail_lp=None if a.drawn is None else np.minimum(a.drawn.lp[a.drawn.valid], 0),
            tail_counts=None if a.drawn is None else a.drawn.counts[a.drawn.valid].astype(np.uint16),
            n_tail=None if a.drawn is None else a.drawn.n.copy(),
            log_norm=None if a.log_norm is None else a.log_norm.copy(),
            policy_logprob=None if a.policy_lp is None else np.minimum(a.policy_lp, 0),
            policy_entropy=None if a.policy_ent is None else np.maximum(a.policy_ent, 0),
            **agg,
        )


def check_rule_and_codec(rule: Rule, codec: C.Codec) -> None:
    """Refuse a rule and codec that cannot go together (before any work: the writer and the build driver call it)."""
    if codec.values == "none" and not (isinstance(rule, Sampled) and not rule.tempered):
        raise InvalidInputError("codec values='none' (--values none: no logprobs stored) is only allowed under rule "
                                "sample at proposal temperature 1 (the other rules' estimators need the exact "
                                "logprobs)")


def has_repeats(ids: np.ndarray, valid: np.ndarray | None) -> bool:
    """True when some row of ``ids [N, K]`` lists an id twice among its valid entries (None: all valid)."""
    if valid is None:
        s = np.sort(ids.astype(np.int32, copy=False), axis=1)
    else:
        fill = -1 - np.arange(ids.shape[1], dtype=np.int32)[None, :]  # distinct negatives for padding
        s = np.sort(np.where(valid, ids, fill).astype(np.int32, copy=False), axis=1)
    return bool((s[:, 1:] == s[:, :-1]).any())
