"""Cross-tokenizer losses over aligned chunks: ALM's binarised chunk divergence, and ULD's sorted-probability L1.

ALM (Minixhofer et al., "Universal Cross-Tokenizer Distillation via Approximate Likelihood
Matching", NeurIPS 2025; arXiv 2503.20083). A chunk c is a stretch of text both tokenizations
cut at the same byte offsets (``trainers.align``); its teacher log-likelihood ``t_c`` is the sum of
the teacher's exact label logprobs over its teacher tokens, its student log-likelihood ``s_c`` the
sum of the student's over its student tokens. The likelihoods of all other texts are out of reach,
so each chunk is *binarised*: the event "the chunk is this text" has probability
``p = exp(t_c / tau)`` under the teacher and ``q = exp(s_c / tau)`` under the student, and the loss is
a divergence between the two Bernoulli distributions. With tau large both are close to 1 and the
divergence stays informative for long chunks (tau = 100 is the default of the paper's code,
``tokenkit``, ``binarization_temp``). Here:

    alm_kl(t, s) = tau * [ p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q)) ],  log p = t / tau - eps

the binary KL (the paper's code minimises the binary cross-entropy, which differs by the teacher's
binary entropy: the same gradient), with ``eps = 1e-6`` as in ``tokenkit`` (keeps ``1 - p > 0`` where
t = 0). It is scaled by ``tau`` (a constant factor the paper does not have: the minimiser and the
gradient's direction are the paper's), so that its gradient keeps the size of a log-likelihood's as tau
grows (as Hinton's tau^2 does for KD): for tau -> infinity, ``alm_kl`` tends to
``|s| - |t| - |t| log(|s| / |t|)`` (``tokenkit``'s ``binary_kl_temp_limit``), >= 0 and 0 at s = t. The
paper balances several losses by gradient magnitude (GradMag); here ``--ce-weight`` mixes the
student's own cross-entropy with a fixed weight.

ULD (Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss
for LLMs", TMLR 2025; arXiv 2402.12030): the L1 distance between the teacher's and the student's
next-token probabilities sorted in decreasing order (a Wasserstein distance that needs no
vocabulary mapping). A cache holds the teacher's top K and the mass m of the rest, so
``sorted_l1`` compares the top K ranks exactly and the rest as one bucket:
``sum_r |p_(r) - q_(r)| + |m_p - m_q|``, a lower bound of the full sorted L1 (triangle inequality).
"""

from __future__ import annotations

import math

import torch

from trainers.checks import number

ALM_EPS = 1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, accurate on both sides of log(1/2) (Maechler, "Accurately Computing
    log(1 - exp(-|a|))", 2012)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def alm_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float = 100.0) -> torch.Tensor:
    """ALM's binarised KL per chunk (module docstring): chunk log-likelihoods ``[C]`` (teacher, student) -> ``[C]``,
    computed in float64. Both are clamped to <= 0 (a sum of logprobs, up to rounding)."""
    tau = number("alm_temperature", temperature, 0.0, math.inf, lo_open=True, hi_open=True)
    a = teacher.double().clamp(max=0.0) / tau - ALM_EPS
    b = student.double().clamp(max=0.0) / tau - ALM_EPS
    p = torch.exp(a)
    return tau * (p * (a - b) + (-torch.expm1(a)) * (log1mexp(a) - log1mexp(b)))


def sorted_l1(p_top: torch.Tensor, p_rest: torch.Tensor, q_top: torch.Tensor, q_rest: torch.Tensor) -> torch.Tensor:
    """ULD over buckets: ``p_top, q_top [C, K]`` probabilities sorted descending (0 where absent), ``p_rest, q_rest
    [C]`` the mass outside them; ``[C]``."""
    return (p_top - q_top).abs().sum(-1) + (p_rest - q_rest).abs()
