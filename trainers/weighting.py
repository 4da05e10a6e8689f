"""Which target tokens a step trains on, and with which loss: token selection, routing, sequence weights.

Per micro-batch, over its N target positions (flattened ``[B, T]`` positions where
``target_mask`` is true), this module returns three ``[N]`` tensors for
``trainers.losses.Objective``:

- ``weight``: the sequence's selection weight (1 without weights), times a 0/1 keep
  mask when ``--keep-fraction f < 1``: the ``ceil(f * n)`` positions of the batch with
  the highest (or, with ``--keep-lowest``, lowest) key are kept, the key being the
  teacher's entropy (cached), the student's entropy (computed in the step, no
  gradient), or a column of a ``logitstore score`` directory (TIP-style selection by
  student entropy or teacher-student divergence). Positions with no score are never kept;
- ``kd_coef`` / ``ce_coef``: how much of the KD term and of the label cross-entropy
  each position gets. By default ``1 - ce_weight`` and ``ce_weight`` everywhere; with
  ``--route correctness``, positions of sequences the verifier marked correct get CE
  only and those marked incorrect KD only (unknown: the default mix).
"""

from __future__ import annotations

import math

import torch


def keep_mask(key: torch.Tensor, eligible: torch.Tensor, fraction: float, lowest: bool = False) -> torch.Tensor:
    """``[N]`` bool: the ``ceil(fraction * n)`` eligible positions with the highest (lowest) ``key``,
    ``n`` = number of eligible positions with a finite key. Ties are broken by position."""
    ok = eligible & torch.isfinite(key)
    n = int(ok.sum())
    out = torch.zeros_like(ok)
    if n == 0:
        return out
    keep = max(1, math.ceil(fraction * n))
    k = key.detach().float().clone()
    k[~ok] = math.inf if lowest else -math.inf
    order = torch.sort(k, descending=not lowest, stable=True).indices[:keep]
    out[order] = True
    return out


def coefficients(batch: dict, sel: torch.Tensor, cfg, student_entropy: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, kd_coef, ce_coef), each ``[N]`` over the positions ``sel [B, T]`` selects (see the module docstring)."""
    weight = batch["weight"][sel].float()
    if cfg.keep_fraction < 1:
        if cfg.keep_by == "teacher_entropy":
            key = batch["teacher_entropy"][sel]
        elif cfg.keep_by == "student_entropy":
            key = student_entropy
        else:
            key = batch["score_" + cfg.keep_by.split(":", 1)[1]][sel]
        weight = weight * keep_mask(key, weight > 0, cfg.keep_fraction, cfg.keep_lowest).to(weight.dtype)
    kd = torch.full_like(weight, 1.0 - cfg.ce_weight)
    ce = torch.full_like(weight, cfg.ce_weight)
    if cfg.loss == "ce":
        kd.zero_()
        ce.fill_(1.0)
    elif cfg.route == "correctness":
        correct = batch["correct"][sel]
        kd = torch.where(correct == 1, 0.0, torch.where(correct == 0, 1.0, kd))
        ce = torch.where(correct == 1, 1.0, torch.where(correct == 0, 0.0, ce))
    return weight, kd, ce
