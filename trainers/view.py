"""The student's side of a distillation loss: its full-vocabulary logprobs at the cached ids, chunked.

``student_view`` runs the student's output head over N rows in chunks, each under
activation checkpointing, so one ``[chunk, V]`` logits tensor is alive at a time in the
forward and the backward pass, and keeps ``logp_ids [N, S]`` (full-vocabulary
``log_softmax(z / tau)`` at the ids asked for: a cache's entries and, under rule topk_tail,
its tail draws), ``logp_label [N]`` (T = 1) and, if asked, the entropy ``[N]`` (T = 1, no
grad). At tau = 1 the gather of the ids and the label is one fused autograd function
(``_GatheredLogSoftmax``), whose backward pass writes one ``[c, V]`` gradient.
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
    return number("temperature", temperature, 0.0, math.inf, lo_open=True, hi_open=True)


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
