"""The student's side of a distillation loss: its full-vocabulary logprobs at the cached ids, chunked.

``student_view`` runs the student's output head over N rows in chunks, each under
activation checkpointing, so one ``[chunk, V]`` logits tensor is alive at a time in the
forward and the backward pass, and keeps ``logp_ids [N, S]`` (full-vocabulary
``log_softmax(z / tau)`` at the ids asked for: a cache's entries and, under rule topk_tail,
its tail draws), ``logp_label [N]`` (T = 1) and, if asked, the entropy ``[N]`` (T = 1, no
grad). At tau = 1 the gather of the ids and the label is one fused autograd function
(``_GatheredLogSoftmax``), whose backward pass writes one ``[c, V]`` gradient. Given a target
entropy per row (``tail_target``, loss tail ``entropy``), it also keeps the completed tail:
``tail_xent [N] = sum_x r_x log q_x`` over the ids outside the support (grad flows) and ``tail_h [N]
= H(r)``, with ``r`` the student's distribution there re-tempered to that entropy
(``completed_tail``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from logitstore.errors import InvalidInputError
from trainers.checks import number


@dataclasses.dataclass
class StudentView:
    """What the losses need of the student's full-vocabulary distribution at N positions."""

    logp_ids: torch.Tensor  # [N, K] log_softmax(z / tau) at targets.ids (grad flows)
    logp_label: torch.Tensor  # [N] log_softmax(z) at the labels (grad flows)
    entropy: torch.Tensor | None  # [N] entropy of softmax(z), no grad; None unless asked
    tail_xent: torch.Tensor | None = None  # [N] sum_j r_j log q_j over the ids outside the support (grad flows)
    tail_h: torch.Tensor | None = None  # [N] H(r), no grad (``completed_tail``)


def completed_tail(lq: torch.Tensor, outside: torch.Tensor, target: torch.Tensor, tol: float | None = None,
                   max_iterations: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's distribution over the ids outside the support, re-tempered to a given entropy: (``r [c, V]``,
    ``H(r) [c]``).

    ``r ∝ q^beta`` on ``outside`` (0 elsewhere) with beta > 0 such that ``H(r) = target`` (nats): among the
    distributions on those ids with that entropy, the one closest to the student's own in KL(r || q_outside)
    (the I-projection: a Lagrange multiplier on the entropy gives ``log r = beta log q + const``). ``lq [c, V]``
    the student's logprobs, ``outside [c, V]`` bool, ``target [c]``; a row whose target is not finite, or with
    fewer than two ids outside, keeps beta = 1 (``r`` the student's own tail). Newton's method on ``u = log
    beta`` (``H = log Z(beta) - beta E_r[log q]``, ``dH/du = -beta^2 Var_r(log q)``), from beta = 1, steps clipped
    to ``|du| <= 1`` and beta to ``[e^-6, e^6]``, until every row is within ``tol`` nats of its target (default
    1e-4 in float32, 1e-9 in float64: a few times their rounding of H; Newton converges quadratically) (a target
    outside the reachable range ends at that bound) or ``max_iterations``. ``H(r)`` is returned as reached. Each
    step is a few passes over the row (an exp and three sums): the moments of ``s = log q`` under ``r``."""
    tol = (1e-9 if lq.dtype == torch.float64 else 1e-4) if tol is None else tol
    with torch.no_grad():
        n_out = outside.sum(-1)
        live = torch.isfinite(target) & (n_out > 1)
        u = torch.zeros_like(lq[:, 0])
        rows = live.nonzero().squeeze(1)
        tempering = _Tempering(lq, outside)
        if rows.numel():  # the rows with a target: Newton's method on them alone (formed once when that is all)
            sub = tempering if rows.numel() == lq.shape[0] else _Tempering(lq[rows], outside[rows])
            u[rows] = _solve_log_beta(sub, target[rows].to(lq), n_out[rows], tol, max_iterations)
        w, z, h, _ = tempering.moments(u.exp())
        return w.div_(z[:, None]), h


class _Tempering:
    """``r ∝ q^beta`` on the ids ``outside`` of rows ``lq [c, V]`` (log q); what does not depend on beta is formed
    once: ``d = s - max s`` (-inf elsewhere), ``s`` and ``s^2`` (0 elsewhere), with ``s = lq``."""

    def __init__(self, lq: torch.Tensor, outside: torch.Tensor):
        self.s = torch.where(outside, lq, 0.0)
        self.s2 = self.s * self.s
        self.smax = torch.where(outside, lq, -torch.inf).amax(-1).clamp(min=torch.finfo(lq.dtype).min)
        self.d = torch.where(outside, lq - self.smax[:, None], -torch.inf)

    def moments(self, beta: torch.Tensor):
        """(``w = exp(beta d)`` [c, V], ``Z = sum w``, ``H(r)``, ``Var_r(s)``) at ``beta [c]``."""
        w = torch.mul(self.d, beta[:, None]).exp_()
        z = w.sum(-1)
        mean = torch.linalg.vecdot(w, self.s) / z
        var = (torch.linalg.vecdot(w, self.s2) / z - mean * mean).clamp(min=0.0)
        return w, z, torch.log(z) + beta * (self.smax - mean), var


def _solve_log_beta(tempering: _Tempering, target, n_out, tol: float, max_iterations: int) -> torch.Tensor:
    """``log beta`` [c] of ``completed_tail`` for the rows of ``tempering``, which all have a finite target."""
    tgt = torch.minimum(target, torch.log(n_out.to(target)))
    u = torch.zeros_like(tgt)
    for _ in range(max_iterations):
        beta = u.exp()
        _, _, h, var = tempering.moments(beta)
        miss = h - tgt
        slope = -(beta ** 2) * var
        stuck = ((u <= -6.0) & (miss < 0)) | ((u >= 6.0) & (miss > 0)) | (slope >= 0)
        if not bool(((miss.abs() > tol) & ~stuck).any()):
            break
        step = torch.where(slope < 0, miss / slope.clamp(max=-1e-30), 0.0)
        u = (u - step.clamp(-1.0, 1.0)).clamp(-6.0, 6.0)
    return u


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
          need_entropy: bool, tail_target: torch.Tensor | None = None,
          valid: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """logits [c, V] -> (logp_ids [c, K], logp_label [c], entropy [c] or None, tail_xent [c] or None, tail_h [c] or
    None); float64 stays float64. ``tail_target [c]`` (with ``valid [c, K]``): the completed tail's entropy."""
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
    entropy = tail_xent = tail_h = None
    if need_entropy:
        with torch.no_grad():
            lp = torch.log_softmax(z, dim=-1)
            entropy = -(lp.exp() * lp).sum(-1)
    if tail_target is not None:
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        # the ids outside the valid support (a padded column names no id)
        outside = torch.zeros_like(z, dtype=torch.int32).scatter_add_(1, ids, valid.to(torch.int32)) == 0
        r, tail_h = completed_tail((z - lse).detach(), outside, tail_target)
        tail_xent = torch.linalg.vecdot(r, z) - lse.squeeze(1)  # r sums to 1
    return logp_ids, logp_label, entropy, tail_xent, tail_h


def _check_tail_args(n: int, ids: torch.Tensor, tail_target: torch.Tensor | None, valid: torch.Tensor | None
                     ) -> None:
    if tail_target is None and valid is None:
        return
    if tail_target is None or valid is None or tail_target.shape != (n,) or valid.shape != ids.shape:
        raise InvalidInputError("tail_target [N] and valid [N, K] (the support's valid columns) go together; got "
                                f"{None if tail_target is None else tuple(tail_target.shape)} and "
                                f"{None if valid is None else tuple(valid.shape)} for ids {tuple(ids.shape)}")


def _check_view_args(n: int, ids: torch.Tensor, labels: torch.Tensor, temperature) -> float:
    if ids.dim() != 2 or ids.shape[0] != n or labels.shape != (n,):
        raise InvalidInputError(f"ids {tuple(ids.shape)} and labels {tuple(labels.shape)} must be [N, K] and [N] "
                                f"with N = {n} rows of the student input")
    return number("temperature", temperature, 0.0, math.inf, lo_open=True, hi_open=True)


def student_view(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor,
                 labels: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = 1024,
                 need_entropy: bool = False, recompute: bool = True, tail_target: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None) -> StudentView:
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

    _check_tail_args(hidden.shape[0], ids, tail_target, valid)

    def run(h, i, lab, tt, v):
        return _view(head(h), i, lab, tau, need_entropy, tt, v)

    n = hidden.shape[0]
    parts = []
    for s in range(0, max(n, 1), chunk_size):
        piece = slice(s, s + chunk_size)
        args = (hidden[piece], ids[piece], labels[piece], *(None if t is None else t[piece]
                                                             for t in (tail_target, valid)))
        ckpt = recompute and torch.is_grad_enabled()
        parts.append(checkpoint(run, *args, use_reentrant=False) if ckpt else run(*args))
    return StudentView(*(None if c[0] is None else torch.cat(c) for c in zip(*parts)))


def student_view_from_logits(logits: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, *,
                             temperature: float = 1.0, need_entropy: bool = False,
                             tail_target: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> StudentView:
    """``student_view`` from full logits [N, V] (no chunking): for small vocabularies and tests."""
    if logits.dim() != 2:
        raise InvalidInputError(f"logits has shape {tuple(logits.shape)}; it must be [N, V]")
    tau = _check_view_args(logits.shape[0], ids, labels, temperature)
    _check_tail_args(logits.shape[0], ids, tail_target, valid)
    return StudentView(*_view(logits, ids, labels, tau, need_entropy, tail_target, valid))
