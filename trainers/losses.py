"""Distillation losses between a student and the sparse teacher entries of a cache.

A cache holds, per position, n <= K teacher token ids with their full-vocabulary
temperature-1 logprobs ``lp`` and the tail mass ``m = 1 - sum exp(lp)`` outside them
(FORMAT.md, "Sparse entries" and "Logprob semantics"); a sampled cache may hold only ids and
``counts`` of D draws. This module turns that and a student into per-position losses, in layers:

1. ``student_view`` runs the student's output head over N rows in chunks, each under
   activation checkpointing, so one ``[chunk, V]`` logits tensor is alive at a time in the
   forward and the backward pass, and keeps ``logp_ids [N, K]`` (full-vocabulary
   ``log_softmax(z / tau)`` at the stored ids), ``logp_label [N]`` (T = 1) and, if asked,
   the entropy ``[N]`` (T = 1, no grad).
2. ``buckets`` puts teacher p and student q on the same B outcomes per position:
   - ``tail="other"`` (B = K + 1): the stored ids and one bucket for everything else.
     Student: ``q_j = softmax(z / tau)_j``, ``q_other = 1 - sum_j q_j``, computed as
     ``log(-expm1(logsumexp(log q_j)))`` and floored at the machine epsilon of the dtype
     (1.2e-7 in float32: below that ``1 - sum`` cannot be resolved). Teacher:
     ``p_j ∝ exp(lp_j / tau)``, ``p_other ∝ (V - n) * (m / (V - n)) ** (1 / tau)``, then
     normalised over the buckets (quantised entries make ``sum + m`` differ from 1 by ~2%).
     The tempered tail ASSUMES the tail mass is spread evenly over the V - n unseen tokens:
     exact at tau = 1 and for a uniform tail; for tau > 1 it is an upper bound on the
     tempered tail mass (``x ** (1 / tau)`` is concave) and a tail on a single token the
     lower bound (for tau < 1 the reverse). Where n = V or m = 0 the "other" bucket is masked
     on both sides (then reverse-type divergences see a student summing to < 1 on the support).
   - ``tail="renormalize"`` (B = K): both sides restricted to the support and renormalised.
   For f-divergences a divergence over buckets is a lower bound on the full-vocabulary one
   (data processing inequality); with n = V they are equal.
3. Divergences ``(log_t [N, B], log_s [N, B], mask [N, B]) -> [N]``, with p = teacher, q = student:
   - ``forward_kl``: ``sum p (log p - log q)``; ``reverse_kl``: ``sum q (log q - log p)``
   - ``jsd``: GKD's generalized JSD (Agarwal et al., "On-Policy Distillation of Language Models",
     ICLR 2024): ``beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``
   - ``tvd``: ``0.5 sum |p - q|``
   - ``skew_kl``/``skew_rkl``: skew KL of DistiLLM (Ko et al., ICML 2024), with a = alpha:
     ``KL(p || a p + (1 - a) q)`` and ``KL(q || a q + (1 - a) p)``
   - ``taid``: TAID (Shing et al., "Temporally Adaptive Interpolated Distillation", ICLR 2025):
     ``KL(p_t || q)``, ``p_t = softmax((1 - t) sg(log q) + t log p)`` over the buckets (sg =
     stop-gradient); t rises adaptively during training (``Objective.step_end``).
   Masked buckets hold 0 in ``log_t``/``log_s`` and are dropped with ``torch.where``, so they
   add exactly 0 to values and gradients.
4. ``sampled_forward_kl``: the estimator of "Sparse Logit Sampling" (Anshumann et al., ACL
   2025) for caches with counts, ``sum_j (c_j / D) (lp_j - log q_j)`` with the full-vocabulary
   student logprob ``log q_j``; ``E[c_j / D] = p_j``, so its value and gradient are unbiased
   for the full forward KL at T = 1. ``ce``: ``-log q(label)``.
5. ``reduce``: the one masking/normalising helper, ``sum_i w_i l_i / sum_i w_i`` over w_i > 0.
6. ``Objective``: per position ``kd_coef * tau**2 * kd + ce_coef * ce``, reduced with the
   weights; the tau**2 keeps gradient magnitudes comparable across temperatures (Hinton et
   al., 2015, "Distilling the Knowledge in a Neural Network"). It also carries TAID's adaptive t.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from logitstore.errors import InvalidInputError
from trainers.config import LOSSES, TAILS

logger = logging.getLogger(__name__)

#: Stands in for log 0 inside a logsumexp: exp underflows to 0 yet every gradient stays finite.
_NEG = -1e30


@dataclasses.dataclass
class SparseTargets:
    """The teacher side of N cached positions (K entry columns, padded)."""

    ids: torch.Tensor  # [N, K] long, most likely first; any value where ~valid
    valid: torch.Tensor  # [N, K] bool
    logprobs: torch.Tensor | None  # [N, K] full-vocabulary log-softmax at T = 1, -inf where ~valid
    tail_mass: torch.Tensor  # [N] 1 - sum exp(logprobs) over the valid entries
    labels: torch.Tensor  # [N] long, the actual next tokens
    vocab_size: int  # V of the teacher
    counts: torch.Tensor | None = None  # [N, K] draws that hit each id (sampled caches), 0 where ~valid
    draws: int | None = None  # D, the draws per position

    def __post_init__(self):
        nk = tuple(self.ids.shape)
        want = {"ids": nk, "valid": nk, "logprobs": nk, "counts": nk, "tail_mass": nk[:1], "labels": nk[:1]}
        for name, shape in want.items():
            t = getattr(self, name)
            if len(nk) != 2 or (t is not None and tuple(t.shape) != shape):
                raise InvalidInputError(f"{name} has shape {tuple(t.shape)}; ids must be [N, K] and {name} {shape}")
        if self.counts is not None and not (isinstance(self.draws, int) and self.draws >= 1):
            raise InvalidInputError(f"draws={self.draws!r} with counts given; it must be an int >= 1")


@dataclasses.dataclass
class StudentView:
    """What the losses need of the student's full-vocabulary distribution at N positions."""

    logp_ids: torch.Tensor  # [N, K] log_softmax(z / tau) at targets.ids (grad flows)
    logp_label: torch.Tensor  # [N] log_softmax(z) at the labels (grad flows)
    entropy: torch.Tensor | None  # [N] entropy of softmax(z), no grad; None unless asked


def _number(name: str, value, lo: float, hi: float, *, lo_open=False, hi_open=False) -> float:
    """``value`` as a float in the given interval, else InvalidInputError naming both."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name}={value!r} is not a number") from None
    ok = math.isfinite(x) and (lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise InvalidInputError(f"{name}={value!r} is not allowed; it must be in {interval}")
    return x


def _choice(name: str, value, allowed: tuple) -> str:
    if value not in allowed:
        raise InvalidInputError(f"{name}={value!r} is not allowed; choose from {', '.join(allowed)}")
    return value


class _GatheredLogSoftmax(torch.autograd.Function):
    """``log_softmax(z)`` at the columns ``idx`` only: ``[c, V], [c, M] -> [c, M]``.

    The backward pass writes ``dz = -softmax(z) * sum(g) + scatter(g at idx)`` into one new
    ``[c, V]`` tensor, where autograd's logsumexp + gather would allocate, fill and add several
    (this keeps a KD step within a few percent of a plain cross-entropy step)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        ctx.save_for_backward(z, lse, idx)
        return z.gather(1, idx) - lse

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, lse, idx = ctx.saved_tensors
        dz = torch.sub(z, lse).exp_().mul_(-g.sum(1, keepdim=True))
        return dz.scatter_add_(1, idx, g), None


def _view(logits: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, tau: float,
          need_entropy: bool) -> tuple[torch.Tensor, ...]:
    """logits [c, V] -> (logp_ids [c, K], logp_label [c][, entropy [c]]); float64 stays float64."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    v = z.shape[-1]
    ids, labels = ids.clamp(0, v - 1), labels.clamp(0, v - 1)
    if tau == 1.0:  # one fused gather of the entries and the label
        both = _GatheredLogSoftmax.apply(z, torch.cat([ids, labels.unsqueeze(1)], dim=1))
        logp_ids, logp_label = both[:, :-1], both[:, -1]
    else:
        lse = torch.logsumexp(z, dim=-1)
        logp_ids = z.gather(1, ids) / tau - torch.logsumexp(z / tau, dim=-1, keepdim=True)
        logp_label = z.gather(1, labels.unsqueeze(1)).squeeze(1) - lse
    if not need_entropy:
        return logp_ids, logp_label
    with torch.no_grad():
        lp = torch.log_softmax(z, dim=-1)
        entropy = -(lp.exp() * lp).sum(-1)
    return logp_ids, logp_label, entropy


def _check_view_args(n: int, ids: torch.Tensor, labels: torch.Tensor, temperature) -> float:
    if ids.dim() != 2 or ids.shape[0] != n or labels.shape != (n,):
        raise InvalidInputError(f"ids {tuple(ids.shape)} and labels {tuple(labels.shape)} must be [N, K] and [N] "
                                f"with N = {n} rows of the student input")
    return _number("temperature", temperature, 0.0, math.inf, lo_open=True, hi_open=True)


def student_view(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor,
                 labels: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = 1024,
                 need_entropy: bool = False, recompute: bool = True) -> StudentView:
    """The student at N positions from its last hidden states, chunked and checkpointed.

    ``hidden`` [N, H]; ``head`` maps [c, H] to raw logits [c, V_student] (any float dtype,
    upcast to float32); ``ids`` [N, K] (values outside [0, V_student) are clamped, so padding is
    safe: callers mask it); ``labels`` [N]. Each chunk of ``chunk_size`` rows is recomputed in
    the backward pass (``torch.utils.checkpoint``, non-reentrant), so memory is one [chunk, V]
    (under ``torch.no_grad`` the chunks run without checkpointing: nothing is kept anyway).
    ``recompute=False`` keeps every chunk's logits for the backward pass instead: memory
    ``[N, V]`` (as a plain ``model(...).logits`` step), and no second head matmul.
    """
    if hidden.dim() != 2:
        raise InvalidInputError(f"hidden has shape {tuple(hidden.shape)}; it must be [N, H]")
    tau = _check_view_args(hidden.shape[0], ids, labels, temperature)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidInputError(f"chunk_size={chunk_size!r} is not allowed; it must be an int >= 1")

    def run(h, i, lab):
        return _view(head(h), i, lab, tau, need_entropy)

    n = hidden.shape[0]
    parts = []
    for s in range(0, max(n, 1), chunk_size):
        args = (hidden[s:s + chunk_size], ids[s:s + chunk_size], labels[s:s + chunk_size])
        ckpt = recompute and torch.is_grad_enabled()
        parts.append(checkpoint(run, *args, use_reentrant=False) if ckpt else run(*args))
    cols = [torch.cat(c) for c in zip(*parts)]
    return StudentView(cols[0], cols[1], cols[2] if need_entropy else None)


def student_view_from_logits(logits: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, *,
                             temperature: float = 1.0, need_entropy: bool = False) -> StudentView:
    """``student_view`` from full logits [N, V] (no chunking): for small vocabularies and tests."""
    if logits.dim() != 2:
        raise InvalidInputError(f"logits has shape {tuple(logits.shape)}; it must be [N, V]")
    tau = _check_view_args(logits.shape[0], ids, labels, temperature)
    out = _view(logits, ids, labels, tau, need_entropy)
    return StudentView(out[0], out[1], out[2] if need_entropy else None)


def _masked_lse(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last axis of the entries under ``mask``; [N, B] -> [N]."""
    return torch.logsumexp(torch.where(mask, x, _NEG), dim=-1)


def _log_normalize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-normalise [N, B] over the masked entries; masked-out entries become 0."""
    return torch.where(mask, x - _masked_lse(x, mask).unsqueeze(-1), 0.0)


def buckets(student: StudentView, targets: SparseTargets, *, tail: str = "other",
            temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher and student as distributions over the same buckets: (log_t, log_s, mask), each [N, B].

    B = K + 1 for ``tail="other"``, K for ``"renormalize"`` (see the module docstring);
    ``student`` must have been computed at the same ``temperature``. Needs teacher logprobs.
    """
    _choice("tail", tail, ("other", "renormalize"))
    tau = _number("temperature", temperature, 0.0, math.inf, lo_open=True, hi_open=True)
    if targets.logprobs is None:
        raise InvalidInputError("targets.logprobs is None: the cache stores only sampled ids and counts, so only "
                                "forward_kl with tail 'sampled' (the sampled estimator) or loss 'ce' apply")
    valid = targets.valid.to(student.logp_ids.device)
    dtype = torch.promote_types(student.logp_ids.dtype, torch.float32)
    ls = torch.where(valid, student.logp_ids.to(dtype), 0.0)
    lt = torch.where(valid, targets.logprobs.to(ls.device, dtype) / tau, 0.0)
    if tail == "renormalize":
        return _log_normalize(lt, valid), _log_normalize(ls, valid), valid
    unseen = (targets.vocab_size - valid.sum(-1)).to(dtype)
    m = targets.tail_mass.to(ls.device, dtype).clamp(0.0, 1.0)
    has_other = (unseen > 0) & (m > 0)
    unseen, m = torch.where(has_other, unseen, 1.0), torch.where(has_other, m, 1.0)
    other_t = torch.log(m) / tau + (1.0 - 1.0 / tau) * torch.log(unseen)  # log((V-n) (m/(V-n))^(1/tau))
    support_s = _masked_lse(ls, valid).clamp(max=0.0)
    other_s = torch.log((-torch.expm1(support_s)).clamp(min=torch.finfo(dtype).eps))
    mask = torch.cat([valid, has_other.unsqueeze(1)], dim=1)
    log_t = _log_normalize(torch.cat([lt, other_t.unsqueeze(1)], dim=1), mask)
    log_s = torch.where(mask, torch.cat([ls, other_s.unsqueeze(1)], dim=1), 0.0)
    return log_t, log_s, mask


def _sum(mask: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, terms, 0.0).sum(-1)


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) from log a and log b, for 0 < w < 1."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def forward_kl(log_t: torch.Tensor, log_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum p (log p - log q); [N, B] -> [N]."""
    return _sum(mask, log_t.exp() * (log_t - log_s))


def reverse_kl(log_t: torch.Tensor, log_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum q (log q - log p); [N, B] -> [N]."""
    return _sum(mask, log_s.exp() * (log_s - log_t))


def jsd(log_t: torch.Tensor, log_s: torch.Tensor, mask: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalized JSD (GKD): beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; beta in (0, 1)."""
    beta = _number("beta", beta, 0.0, 1.0, lo_open=True, hi_open=True)
    log_m = _mix(log_t, log_s, beta)
    return beta * forward_kl(log_t, log_m, mask) + (1.0 - beta) * forward_kl(log_s, log_m, mask)


def tvd(log_t: torch.Tensor, log_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Total variation distance 0.5 sum |p - q|; [N, B] -> [N]."""
    return 0.5 * _sum(mask, (log_t.exp() - log_s.exp()).abs())


def skew_kl(log_t: torch.Tensor, log_s: torch.Tensor, mask: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM's skew KL: KL(p || alpha p + (1 - alpha) q), alpha in [0, 1); alpha = 0 is forward KL."""
    alpha = _number("alpha", alpha, 0.0, 1.0, hi_open=True)
    return forward_kl(log_t, log_s if alpha == 0.0 else _mix(log_t, log_s, alpha), mask)


def skew_rkl(log_t: torch.Tensor, log_s: torch.Tensor, mask: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM's skew reverse KL: KL(q || alpha q + (1 - alpha) p), alpha in [0, 1); alpha = 0 is reverse KL."""
    alpha = _number("alpha", alpha, 0.0, 1.0, hi_open=True)
    return forward_kl(log_s, log_t if alpha == 0.0 else _mix(log_s, log_t, alpha), mask)


def taid(log_t: torch.Tensor, log_s: torch.Tensor, mask: torch.Tensor, t: float) -> torch.Tensor:
    """TAID: KL(p_t || q) with log p_t = log_softmax((1 - t) sg(log q) + t log p) over the buckets; t in [0, 1]."""
    t = _number("t", t, 0.0, 1.0)
    log_pt = _log_normalize((1.0 - t) * log_s.detach() + t * log_t, mask)
    return forward_kl(log_pt, log_s, mask)


def ce(student: StudentView) -> torch.Tensor:
    """Cross-entropy with the labels at T = 1: -log q(label); [N]."""
    return -student.logp_label


def sampled_forward_kl(student: StudentView, targets: SparseTargets, *, temperature: float = 1.0) -> torch.Tensor:
    """Sparse Logit Sampling's forward KL estimator, [N]: ``sum_j (c_j / D) (lp_j - log q_j)``.

    ``log q_j`` is the student's full-vocabulary logprob (``logp_ids``; not renormalised, no
    tail bucket). Unbiased for the value and the gradient of KL(p || q) at T = 1. Without
    teacher logprobs it is the cross-entropy ``-sum_j (c_j / D) log q_j``: same gradient, but
    the value also holds the teacher entropy. Only temperature 1: the draws were made at T = 1.
    """
    if temperature != 1.0:
        raise InvalidInputError(f"temperature={temperature!r} with the sampled estimator; only 1.0 is allowed "
                                "because the cached draws were made from the temperature-1 teacher")
    if targets.counts is None or targets.draws is None:
        raise InvalidInputError("the sampled estimator needs targets.counts and targets.draws (a cache built with "
                                "rule 'sample'); these targets have none: use tail 'other' or 'renormalize'")
    ls = student.logp_ids
    dtype = torch.promote_types(ls.dtype, torch.float32)
    counts = targets.counts.to(ls.device, dtype)
    use = targets.valid.to(ls.device) & (counts > 0)
    w = counts / targets.draws
    if targets.logprobs is None:
        return _sum(use, -w * ls)
    lp = torch.where(use, targets.logprobs.to(ls.device, dtype), 0.0)
    return _sum(use, w * (lp - ls))


def reduce(per_position: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i l_i / sum_i w_i`` over positions with w_i > 0 (others may hold inf/nan), [N], [N] -> [].

    0 (still on the graph) when no weight is positive.
    """
    if weight.shape != per_position.shape or per_position.dim() != 1:
        raise InvalidInputError(f"per_position {tuple(per_position.shape)} and weight {tuple(weight.shape)} must "
                                "both be [N]")
    w = weight.to(per_position.device, per_position.dtype)
    use = w > 0
    w = torch.where(use, w, 0.0)
    total = (w * torch.where(use, per_position, 0.0)).sum()
    den = w.sum()
    return total / torch.where(den > 0, den, 1.0)


_DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "tvd": tvd, "skew_kl": skew_kl,
                "skew_rkl": skew_rkl, "taid": taid}
assert set(_DIVERGENCES) | {"ce"} == set(LOSSES), "every loss name of trainers.config has an implementation here"


class Objective:
    """The training loss: per position ``kd_coef * tau**2 * kd + ce_coef * ce``, reduced with ``weight``.

    ``loss`` names the KD divergence (or ``"ce"``: labels only); ``tail`` how the teacher's
    mass outside the stored ids is handled (``"sampled"``: the unbiased estimator, only with
    ``forward_kl`` at temperature 1). Default coefficients: ``kd_coef = 1 - ce_weight``,
    ``ce_coef = ce_weight``. For TAID, ``t`` adapts after each optimiser step (``step_end``).
    """

    def __init__(self, loss: str, *, tail: str = "other", temperature: float = 1.0, ce_weight: float = 0.0,
                 beta: float = 0.5, alpha: float = 0.1, taid_start: float = 0.4, taid_end: float = 1.0,
                 taid_alpha: float = 5e-4, taid_beta: float = 0.99, total_steps: int | None = None):
        self.loss = _choice("loss", loss, LOSSES)
        self.tail = _choice("tail", tail, TAILS)
        self.temperature = _number("temperature", temperature, 0.0, math.inf, lo_open=True, hi_open=True)
        if tail == "sampled" and (loss != "forward_kl" or self.temperature != 1.0):
            raise InvalidInputError(f"tail='sampled' with loss={loss!r}, temperature={temperature!r}: the sampled "
                                    "estimator exists only for loss 'forward_kl' at temperature 1 (the cached draws "
                                    "were made at T = 1); use tail 'other' or 'renormalize' otherwise")
        self.ce_weight = _number("ce_weight", ce_weight, 0.0, 1.0)
        self.beta = _number("beta", beta, 0.0, 1.0, lo_open=True, hi_open=True)
        self.alpha = _number("alpha", alpha, 0.0, 1.0, hi_open=True)
        self.taid_start = _number("taid_start", taid_start, 0.0, 1.0, hi_open=True)
        self.taid_end = _number("taid_end", taid_end, self.taid_start, 1.0, lo_open=True)
        self.taid_alpha = _number("taid_alpha", taid_alpha, 0.0, 1.0)
        self.taid_beta = _number("taid_beta", taid_beta, 0.0, 1.0, hi_open=True)
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise InvalidInputError(f"total_steps={total_steps!r} is not allowed; it must be None or an int >= 1")
        self.total_steps = total_steps
        self._t, self._momentum, self._prev_loss = self.taid_start, 0.0, None

    @property
    def needs_logprobs(self) -> bool:
        """Whether the targets must carry teacher logprobs."""
        return self.loss != "ce" and self.tail != "sampled"

    @property
    def needs_entropy(self) -> bool:
        """No loss here uses the student entropy."""
        return False

    @property
    def taid_t(self) -> float:
        return self._t

    def kd(self, student: StudentView, targets: SparseTargets) -> torch.Tensor:
        """The KD divergence per position, [N] (not scaled by tau**2)."""
        if self.tail == "sampled":
            return sampled_forward_kl(student, targets, temperature=self.temperature)
        b = buckets(student, targets, tail=self.tail, temperature=self.temperature)
        extra = {"jsd": {"beta": self.beta}, "skew_kl": {"alpha": self.alpha}, "skew_rkl": {"alpha": self.alpha},
                 "taid": {"t": self._t}}.get(self.loss, {})
        return _DIVERGENCES[self.loss](*b, **extra)

    def __call__(self, student: StudentView, targets: SparseTargets, weight: torch.Tensor,
                 kd_coef: torch.Tensor | None = None,
                 ce_coef: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss, metrics as floats: loss, kd (absent for "ce"), ce, taid_t (TAID)).

        ``weight``, ``kd_coef``, ``ce_coef``: [N] or scalars; ``kd_coef`` is unused for loss "ce",
        whose ``ce_coef`` defaults to 1.
        """
        ce_i = ce(student)
        n = ce_i.shape[0]

        def coef(name, value, default):
            c = torch.as_tensor(default if value is None else value, dtype=ce_i.dtype, device=ce_i.device)
            if c.shape not in ((), (n,)):
                raise InvalidInputError(f"{name} has shape {tuple(c.shape)}; it must be a scalar or [N] = [{n}]")
            return c.expand(n)

        weight = coef("weight", weight, 1.0)
        c = coef("ce_coef", ce_coef, 1.0 if self.loss == "ce" else self.ce_weight)
        total = torch.where(c != 0, c * ce_i, 0.0)
        kd_i = None
        if self.loss != "ce":
            kd_i = self.kd(student, targets)
            k = coef("kd_coef", kd_coef, 1.0 - self.ce_weight)
            total = total + torch.where(k != 0, k * self.temperature ** 2 * kd_i, 0.0)
        loss = reduce(total, weight)
        metrics = {"loss": float(loss.detach()), "ce": float(reduce(ce_i.detach(), weight))}
        if kd_i is not None:
            metrics["kd"] = float(reduce(kd_i.detach(), weight * (k > 0)))
        if self.loss == "taid":
            metrics["taid_t"] = self._t
        return loss, metrics

    def step_end(self, loss_value: float, step: int) -> None:
        """TAID's adaptive update of t after optimiser step ``step`` (a no-op for other losses).

        ``loss_value`` is the objective just minimised (best the KD term). The first call
        records it and applies only the linear floor. Then, as in TAID's reference implementation:
        ``delta = (prev - cur) / (|prev| + 1e-8)``, ``mom = beta mom + (1 - beta) delta``,
        ``t = min(t_end, max(t_linear(step), t + alpha sigmoid(mom) (1 - t)))`` with
        ``t_linear`` rising from t_start to t_end over ``total_steps`` (t_start without it).
        Non-finite losses are skipped (they would poison the momentum).
        """
        if self.loss != "taid":
            return
        cur = float(loss_value)
        if not math.isfinite(cur):
            logger.warning("TAID: loss %r at step %d is not finite; t stays %.6f", loss_value, step, self._t)
            return
        progress = 0.0 if self.total_steps is None else min(max(step / self.total_steps, 0.0), 1.0)
        linear = self.taid_start + (self.taid_end - self.taid_start) * progress
        if self._prev_loss is None:
            self._t = max(linear, self._t)
        else:
            delta = (self._prev_loss - cur) / (abs(self._prev_loss) + 1e-8)
            self._momentum = self.taid_beta * self._momentum + (1.0 - self.taid_beta) * delta
            sig = 0.5 * (1.0 + math.tanh(0.5 * self._momentum))  # sigmoid, without overflow
            self._t = min(self.taid_end, max(linear, self._t + self.taid_alpha * sig * (1.0 - self._t)))
        self._prev_loss = cur

    def state_dict(self) -> dict:
        """TAID's state (t, momentum, previous loss) for an exact resume."""
        return {"t": self._t, "momentum": self._momentum, "prev_loss": self._prev_loss}

    def load_state_dict(self, d: dict) -> None:
        if set(d) != {"t", "momentum", "prev_loss"}:
            raise InvalidInputError(f"objective state has keys {sorted(d)}; expected momentum, prev_loss, t")
        self._t = _number("t", d["t"], 0.0, 1.0)
        self._momentum = float(d["momentum"])
        self._prev_loss = None if d["prev_loss"] is None else float(d["prev_loss"])
