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
   - ``tail="entropy"`` (``completed_forward_kl``): the ``other`` buckets, plus the teacher's mass outside the
     support spread over the full vocabulary as the student's own tail re-tempered to the teacher's exact
     entropy there (``SparseTargets.tail_entropy``, ``trainers.view.completed_tail``); forward_kl at tau = 1.
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
   for the full forward KL at T = 1; or, with the inclusion design, each drawn id weighed by
   ``p_j / pi_j`` (Horvitz-Thompson, ``trainers.targets``), unbiased too. ``ce``: ``-log q(label)``.
5. ``reduce``: the one masking/normalising helper, ``sum_i w_i l_i / sum_i w_i`` over w_i > 0.
6. ``Objective``: per position ``kd_coef * tau**2 * kd + ce_coef * ce``, reduced with the
   weights; the tau**2 keeps gradient magnitudes comparable across temperatures (Hinton et
   al., 2015, "Distilling the Knowledge in a Neural Network"). It also carries TAID's adaptive t.
"""

from __future__ import annotations

import logging
import math

import torch

from logitstore.errors import InvalidInputError
from trainers.checks import choice, number
from trainers.config import ESTIMATORS, LOSSES, SAMPLED_TAILS, TAILS
from trainers.targets import SparseTargets
from trainers.view import StudentView

logger = logging.getLogger(__name__)

#: Stands in for log 0 inside a logsumexp: exp underflows to 0 yet every gradient stays finite.
_NEG = -1e30


def _masked_lse(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last axis of the entries under ``mask``; [N, B] -> [N]."""
    return torch.logsumexp(torch.where(mask, x, _NEG), dim=-1)


def _log_normalize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-normalise [N, B] over the masked entries; masked-out entries become 0."""
    return torch.where(mask, x - _masked_lse(x, mask).unsqueeze(-1), 0.0)


def buckets(student: StudentView, targets: SparseTargets, *, tail: str = "other",
            temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher and student as distributions over the same buckets: (log_t, log_s, mask), each [N, B].

    The support S is every id the cache names (``targets.support()``: the head, and the tail draws
    of a topk_tail cache, each with its exact logprob); ``student.logp_ids`` must be at those ids and
    at the same ``temperature``. B = |S| + 1 for ``tail="other"`` (one bucket for the rest of the
    mass), |S| + 2 for ``"label"`` (the label's own bucket where it is outside S, then the rest),
    |S| for ``"renormalize"``. See the module docstring. Needs teacher logprobs.
    """
    choice("tail", tail, ("other", "renormalize", "label"))
    tau = number("temperature", temperature, 0.0, math.inf, lo_open=True, hi_open=True)
    ids, valid, lp = targets.support()
    if lp is None:
        raise InvalidInputError("targets.logprobs is None: the cache stores only sampled ids and counts, so only "
                                "forward_kl with tail 'sampled' (the sampled estimator) or loss 'ce' apply")
    dev = student.logp_ids.device
    valid = valid.to(dev)
    dtype = torch.promote_types(student.logp_ids.dtype, torch.float32)
    eps = torch.finfo(dtype).eps
    ls = torch.where(valid, student.logp_ids.to(dtype), 0.0)
    lt = torch.where(valid, lp.to(dev, dtype) / tau, 0.0)
    if tail == "renormalize":
        return _log_normalize(lt, valid), _log_normalize(ls, valid), valid
    # the teacher's mass outside S (the tail mass counts the head only: take the tail draws off)
    m = targets.outside_mass(dtype).to(dev)
    unseen = (targets.vocab_size - valid.sum(-1)).to(dtype)
    if tail == "label":
        if tau != 1.0:
            raise InvalidInputError(f"tail 'label' with temperature={temperature!r}: the label bucket uses the "
                                    "temperature-1 label logprobs; use temperature 1 or tail 'other'")
        if targets.label_logprob is None:
            raise InvalidInputError("tail 'label' needs targets.label_logprob (the teacher's exact label logprob)")
        outside = ~((ids.to(dev) == targets.labels.to(dev)[:, None]) & valid).any(-1) & (unseen > 0)
        lt_lab = targets.label_logprob.to(dev, dtype)
        m = torch.where(outside, (m - lt_lab.exp()).clamp(0.0, 1.0), m)
        unseen = unseen - outside.to(dtype)
        valid = torch.cat([valid, outside[:, None]], 1)
        lt = torch.cat([lt, torch.where(outside, lt_lab, 0.0)[:, None]], 1)
        ls = torch.cat([ls, torch.where(outside, student.logp_label.to(dtype), 0.0)[:, None]], 1)
    # the rest: present wherever some token is outside the buckets, even when the teacher puts (almost) no mass
    # there, so the student's mass outside is always penalised; the teacher's is floored at eps (continuous as m -> 0)
    has_other = unseen > 0
    unseen = torch.where(has_other, unseen, 1.0)
    other_t = torch.log(m.clamp(min=eps)) / tau + (1.0 - 1.0 / tau) * torch.log(unseen)  # (V-n) (m/(V-n))^(1/tau)
    support_s = _masked_lse(ls, valid).clamp(max=0.0)
    other_s = torch.log((-torch.expm1(support_s)).clamp(min=eps))
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
    beta = number("beta", beta, 0.0, 1.0, lo_open=True, hi_open=True)
    log_m = _mix(log_t, log_s, beta)
    return beta * forward_kl(log_t, log_m, mask) + (1.0 - beta) * forward_kl(log_s, log_m, mask)


def tvd(log_t: torch.Tensor, log_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Total variation distance 0.5 sum |p - q|; [N, B] -> [N]."""
    return 0.5 * _sum(mask, (log_t.exp() - log_s.exp()).abs())


def skew_kl(log_t: torch.Tensor, log_s: torch.Tensor, mask: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM's skew KL: KL(p || alpha p + (1 - alpha) q), alpha in [0, 1); alpha = 0 is forward KL."""
    alpha = number("alpha", alpha, 0.0, 1.0, hi_open=True)
    return forward_kl(log_t, log_s if alpha == 0.0 else _mix(log_t, log_s, alpha), mask)


def skew_rkl(log_t: torch.Tensor, log_s: torch.Tensor, mask: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM's skew reverse KL: KL(q || alpha q + (1 - alpha) p), alpha in [0, 1); alpha = 0 is reverse KL."""
    alpha = number("alpha", alpha, 0.0, 1.0, hi_open=True)
    return forward_kl(log_s, log_t if alpha == 0.0 else _mix(log_s, log_t, alpha), mask)


def taid(log_t: torch.Tensor, log_s: torch.Tensor, mask: torch.Tensor, t: float) -> torch.Tensor:
    """TAID: KL(p_t || q) with log p_t = log_softmax((1 - t) sg(log q) + t log p) over the buckets; t in [0, 1]."""
    t = number("t", t, 0.0, 1.0)
    log_pt = _log_normalize((1.0 - t) * log_s.detach() + t * log_t, mask)
    return forward_kl(log_pt, log_s, mask)


def ce(student: StudentView) -> torch.Tensor:
    """Cross-entropy with the labels at T = 1: -log q(label); [N]."""
    return -student.logp_label


def sampled_forward_kl(student: StudentView, targets: SparseTargets, *, temperature: float = 1.0,
                       exact_label: bool = False, design: str = "auto") -> torch.Tensor:
    """The unbiased forward-KL estimator of a cache with draws, [N]: ``sum_x p_hat_x (lp_x - log q_x)``.

    ``p_hat`` is ``targets.estimate()`` on the support (sampled cache: ``(c/D) * p/q``; topk_tail:
    the exact head plus ``(c/D) * p/q`` on the tail draws, ``p/q = m`` at proposal temperature 1), and
    ``log q_x`` the student's full-vocabulary logprob (``logp_ids`` at the support; not
    renormalised, no other bucket). ``E[p_hat] = p``, so the value and the gradient are unbiased
    for KL(p || q) at T = 1. Without teacher logprobs (a sampled cache stored with ``values none``)
    it is the cross-entropy ``-sum_x p_hat_x log q_x``: the same gradient, but the value also holds
    the teacher entropy. Only temperature 1: the draws were made from the temperature-1 teacher.
    ``exact_label`` (tail ``sampled_label``): the label's term uses its exact target
    (``targets.estimate_exact_label()``), ``+ p_label (label_logprob - log q_label)`` where the head does not
    hold the label, and its draws count 0; still unbiased, with no variance on the label.
    ``design``: how a draw is weighed (``SparseTargets.estimate``): ``"counts"``, ``"inclusion"`` or ``"auto"``.
    """
    if temperature != 1.0:
        raise InvalidInputError(f"temperature={temperature!r} with the sampled estimator; only 1.0 is allowed "
                                "because the cached draws were made from the temperature-1 teacher")
    if not targets.sampled:
        raise InvalidInputError("the sampled estimator needs draws (a cache built with --sample D or --top-k K "
                                "--tail-draws D); these targets have none: use tail 'other', 'label' or 'renormalize'")
    ls = student.logp_ids
    dtype = torch.promote_types(ls.dtype, torch.float32)
    _, valid, lp = targets.support()
    if exact_label:
        w, p_lab = (t.to(ls.device) for t in targets.estimate_exact_label(dtype, design))
        lt_lab = targets.label_logprob.to(ls.device, dtype) if lp is not None else torch.zeros_like(p_lab)
        lab = torch.where(p_lab > 0, p_lab * (lt_lab - student.logp_label.to(dtype)), 0.0)
    else:
        w, lab = targets.estimate(dtype, design).to(ls.device), 0.0
    use = valid.to(ls.device) & (w > 0)
    if lp is None:
        return _sum(use, -w * ls) + lab
    return _sum(use, w * (torch.where(use, lp.to(ls.device, dtype), 0.0) - ls)) + lab


def completed_forward_kl(student: StudentView, targets: SparseTargets) -> torch.Tensor:
    """Forward KL against the cache's distribution completed outside its support, [N] (tail ``entropy``).

    The target is the teacher's exact entries, and its mass m outside them spread as ``m r`` with ``r`` the
    student's own distribution there re-tempered to the teacher's exact entropy there
    (``targets.tail_entropy()``, ``trainers.view.completed_tail``: the distribution closest to the student's
    that agrees with all the cache knows of that tail: its mass and its entropy). Value:
    ``KL(buckets, tail 'other') + m KL(r || q_out)`` with ``q_out`` the student's distribution outside the
    support, renormalised; ``r`` carries no gradient. Where the tail entropy is not determined (NaN), ``r =
    q_out`` and this is the ``other`` bucket's KL. ``student`` must come with ``tail_xent`` and ``tail_h``
    (``student_view(..., **Objective.view_options(targets))``)."""
    if student.tail_xent is None or student.tail_h is None:
        raise InvalidInputError("tail 'entropy' needs the student's completed tail: student_view(..., "
                                "**objective.view_options(targets))")
    log_t, log_s, mask = buckets(student, targets, tail="other")
    has = mask[:, -1]
    dtype = log_t.dtype
    within = -student.tail_h.to(dtype) - student.tail_xent.to(dtype) + log_s[:, -1]
    return forward_kl(log_t, log_s, mask) + torch.where(has, torch.exp(log_t[:, -1]) * within, 0.0)


def residual_forward_kl(student: StudentView, targets: SparseTargets, *, temperature: float = 1.0) -> torch.Tensor:
    """RS-KD's top-k baseline with the residual mass on the ground truth, [N]: ``KL(t || q)`` with
    ``t`` = the head's ``p_j`` plus the tail mass ``m`` on the label (``targets.residual()``) and ``q`` the
    student's full-vocabulary distribution. A biased target (the tail's mass all on one token)."""
    if temperature != 1.0:
        raise InvalidInputError(f"tail 'residual' with temperature={temperature!r}: only 1.0 is allowed")
    _, t, valid = targets.residual()
    k = targets.ids.shape[1]
    ls = torch.cat([student.logp_ids[:, :k], student.logp_label[:, None]], 1)
    dtype = torch.promote_types(ls.dtype, torch.float32)
    t, valid = t.to(ls.device, dtype), valid.to(ls.device)
    use = valid & (t > 0)
    return _sum(use, t * (torch.log(torch.where(use, t, 1.0)) - ls.to(dtype)))


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
    ``forward_kl`` at temperature 1; ``estimator`` says how it weighs a draw: ``SparseTargets.estimate``'s
    ``design``). Default coefficients: ``kd_coef = 1 - ce_weight``,
    ``ce_coef = ce_weight``. For TAID, ``t`` adapts after each optimiser step (``step_end``).
    """

    def __init__(self, loss: str, *, tail: str = "other", estimator: str = "auto", temperature: float = 1.0,
                 ce_weight: float = 0.0, beta: float = 0.5, alpha: float = 0.1, taid_start: float = 0.4,
                 taid_end: float = 1.0, taid_alpha: float = 5e-4, taid_beta: float = 0.99,
                 total_steps: int | None = None):
        self.loss = choice("loss", loss, LOSSES)
        self.tail = choice("tail", tail, TAILS)
        self.estimator = choice("estimator", estimator, ESTIMATORS)
        if estimator == "inclusion" and tail not in SAMPLED_TAILS:
            raise InvalidInputError(f"estimator={estimator!r} weighs the draws of the sampled tails "
                                    f"({', '.join(SAMPLED_TAILS)}); tail is {tail!r}")
        self.temperature = number("temperature", temperature, 0.0, math.inf, lo_open=True, hi_open=True)
        if tail in (*SAMPLED_TAILS, "residual", "entropy") and (loss != "forward_kl" or self.temperature != 1.0):
            raise InvalidInputError(f"tail={tail!r} with loss={loss!r}, temperature={temperature!r}: that target "
                                    "exists only for loss 'forward_kl' at temperature 1 (the cached draws, "
                                    "label logprobs and entropy are at T = 1); use tail 'other', 'label' or "
                                    "'renormalize'")
        if tail == "label" and self.temperature != 1.0:
            raise InvalidInputError(f"tail='label' with temperature={temperature!r}: the label bucket uses the "
                                    "temperature-1 label logprob; use temperature 1 or tail 'other'")
        self.ce_weight = number("ce_weight", ce_weight, 0.0, 1.0)
        self.beta = number("beta", beta, 0.0, 1.0, lo_open=True, hi_open=True)
        self.alpha = number("alpha", alpha, 0.0, 1.0, hi_open=True)
        self.taid_start = number("taid_start", taid_start, 0.0, 1.0, hi_open=True)
        self.taid_end = number("taid_end", taid_end, self.taid_start, 1.0, lo_open=True)
        self.taid_alpha = number("taid_alpha", taid_alpha, 0.0, 1.0)
        self.taid_beta = number("taid_beta", taid_beta, 0.0, 1.0, hi_open=True)
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise InvalidInputError(f"total_steps={total_steps!r} is not allowed; it must be None or an int >= 1")
        self.total_steps = total_steps
        self._t, self._momentum, self._prev_loss = self.taid_start, 0.0, None

    @classmethod
    def from_config(cls, cfg, rule: str, total_steps: int | None = None) -> Objective:
        """The objective a ``trainers.config.TrainConfig`` names, for a cache of sparse-entry ``rule`` (its name:
        ``--tail auto`` resolves against it)."""
        return cls(cfg.loss, tail=cfg.resolved_tail(rule), estimator=cfg.estimator, temperature=cfg.temperature,
                   ce_weight=cfg.ce_weight,
                   beta=cfg.beta, alpha=cfg.alpha, taid_start=cfg.taid_start, taid_end=cfg.taid_end,
                   total_steps=total_steps)

    @property
    def needs_logprobs(self) -> bool:
        """Whether the targets must carry teacher logprobs."""
        return self.loss != "ce" and (self.tail not in SAMPLED_TAILS or self.estimator == "inclusion")

    def view_options(self, targets: SparseTargets) -> dict:
        """What ``student_view`` must compute beyond the ids for this objective on ``targets``: with tail
        ``entropy``, the completed tail (``tail_target``: the teacher's entropy outside the support; ``valid``)."""
        if self.loss == "ce" or self.tail != "entropy":
            return {}
        return {"tail_target": targets.tail_entropy(), "valid": targets.support()[1]}

    @property
    def needs_entropy(self) -> bool:
        """No loss here uses the student entropy."""
        return False

    @property
    def taid_t(self) -> float:
        return self._t

    def kd(self, student: StudentView, targets: SparseTargets) -> torch.Tensor:
        """The KD divergence per position, [N] (not scaled by tau**2)."""
        if self.tail in SAMPLED_TAILS:
            return sampled_forward_kl(student, targets, temperature=self.temperature,
                                      exact_label=self.tail == "sampled_label", design=self.estimator)
        if self.tail == "residual":
            return residual_forward_kl(student, targets, temperature=self.temperature)
        if self.tail == "entropy":
            return completed_forward_kl(student, targets)
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
        self._t = number("t", d["t"], 0.0, 1.0)
        self._momentum = float(d["momentum"])
        self._prev_loss = None if d["prev_loss"] is None else float(d["prev_loss"])
