"""The data contract a record must meet before it is written: shapes, ranges, order (FORMAT.md, "Invariants").

``Contract(rule, codec, vocab_size)`` is what ``CacheWriter.add`` runs on each
``SequenceRecord``: ``arrays`` converts it to numpy (torch tensors without importing torch)
and checks its shapes, ``check`` enforces the per-position invariants vectorised (ids in
range and distinct, logprobs finite, ``<= 0`` and descending, tail mass in ``[0, 1]``,
counts under rule sample, what the codec can represent), and ``row`` makes the buffered
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
from logitstore.rules import Rule, Sampled

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


class Contract:
    """The checks of one cache's rule, codec and vocabulary (see the module docstring)."""

    def __init__(self, rule: Rule, codec: C.Codec, vocab_size: int):
        self.rule, self.codec, self.vocab_size = rule, codec, vocab_size

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
        return a

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
        if "fp16" in (self.codec.values, self.codec.scalars):
            floor = -65504.0  # the most negative finite IEEE half
            if (self.codec.values == "fp16" and lp_v.min(initial=0) < floor) or \
                    (self.codec.scalars == "fp16" and a.label_lp.min(initial=0) < floor):
                raise InvalidInputError(f"seq {sid}: logprobs below {floor} do not fit the fp16 codec")
        cnt = a.counts
        if cnt is not None and (cnt.shape != ids.shape or (cnt[valid] < 1).any()
                                or (np.where(valid, cnt, 0).sum(axis=1) > self.rule.draws).any()):
            raise InvalidInputError(f"seq {sid}: counts must be [N, K], >= 1 on valid entries and sum to at most "
                                    f"draws={self.rule.draws} per position")

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
            **agg,
        )

    # ------------------------------------------------------------ writing


def has_repeats(ids: np.ndarray, valid: np.ndarray | None) -> bool:
    """True when some row of ``ids [N, K]`` lists an id twice among its valid entries (None: all valid)."""
    if valid is None:
        s = np.sort(ids.astype(np.int32, copy=False), axis=1)
    else:
        fill = -1 - np.arange(ids.shape[1], dtype=np.int32)[None, :]  # distinct negatives for padding
        s = np.sort(np.where(valid, ids, fill).astype(np.int32, copy=False), axis=1)
    return bool((s[:, 1:] == s[:, :-1]).any())
