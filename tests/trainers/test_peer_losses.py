"""trainers.losses against other projects' published distillation losses, with the cache holding the full vocabulary.

Each peer's loss is RESTATED here in plain float64 torch from its source (read, not copied, not imported: none of
these projects is a dependency), with the repository, file, function and commit it was read at, and its
conventions: which argument is the teacher, what its mixture weight means, whether its value is a KL or a
cross-entropy, how it reduces over positions, and how it applies a temperature. With K = V (every id in the
support, no "other" bucket) our bucketed divergences must equal them to float rounding (1e-10), the values after
adding a known constant where the peer reports a cross-entropy, and the gradients w.r.t. the student logits always.

Peers compute in float32 (``softmax(..., dtype=torch.float32)``); the restatements keep their formulas in float64.
Positions whose label is -100 are dropped by every peer and averaged over the rest ("per-token mean"), which is our
``reduce`` with weight 1 on the kept positions and 0 on the others.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainers import losses as L
from trainers import view as SV
from trainers.targets import SparseTargets

F64 = torch.float64
N, V = 6, 12
SEEDS = (0, 1, 2)
IGNORE = -100


# ---------------------------------------------------------------- cases and our side


def case(seed: int, scale: float = 3.0):
    """Random teacher logits zt, student logits zs (a leaf), labels in [0, V) and the peers' labels (-100 dropped)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    zt = torch.randn(N, V, generator=gen, dtype=F64) * scale
    zs = (torch.randn(N, V, generator=gen, dtype=F64) * scale).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen)
    drop = torch.rand(N, generator=gen) < 0.35
    drop[0] = False  # at least one kept position
    drop[-1] = True  # and at least one dropped
    return zt, zs, labels, torch.where(drop, IGNORE, labels)


def full_targets(zt: torch.Tensor, labels: torch.Tensor) -> SparseTargets:
    """The cache's view of teacher logits with K = V: every id stored (most likely first), no tail mass."""
    lp = torch.log_softmax(zt, -1)
    ids = torch.argsort(lp, dim=1, descending=True)
    return SparseTargets(ids=ids, valid=torch.ones(N, V, dtype=torch.bool), logprobs=lp.gather(1, ids),
                         tail_mass=torch.zeros(N, dtype=F64), labels=labels, vocab_size=V)


def kept(peer_labels: torch.Tensor) -> torch.Tensor:
    return (peer_labels != IGNORE).to(F64)


def ours(name: str, zt, zs, labels, peer_labels, tau: float = 1.0, **kw) -> torch.Tensor:
    """Our per-token mean of divergence ``name`` (tail "other", K = V) over the kept positions."""
    targets = full_targets(zt, labels)
    view = SV.student_view_from_logits(zs, targets.ids, labels, temperature=tau)
    log_t, log_s, mask = L.buckets(view, targets, tail="other", temperature=tau)
    assert not mask[:, -1].any()  # K = V: the "other" bucket is masked out on both sides
    return L.reduce(getattr(L, name)(log_t, log_s, mask, **kw), kept(peer_labels))


def token_mean(per_token: torch.Tensor, peer_labels: torch.Tensor) -> torch.Tensor:
    """sum over the kept positions / their number (distillm, torchtune, TAID, Liger, TRL with labels)."""
    keep = peer_labels != IGNORE
    return (per_token * keep).sum() / keep.sum()


def entropy_mean(log_p: torch.Tensor, peer_labels: torch.Tensor) -> torch.Tensor:
    """The per-token mean entropy of a distribution that does not depend on the student (no grad)."""
    log_p = log_p.detach()
    return token_mean(-(log_p.exp() * log_p).sum(-1), peer_labels)


def assert_same(got_fn, want_fn, zs, *, offset=0.0, msg=""):
    """Values (``got + offset`` against ``want``) and gradients w.r.t. the student logits zs, to 1e-10."""
    got = got_fn()
    (g_got,) = torch.autograd.grad(got, zs)
    want = want_fn()
    (g_want,) = torch.autograd.grad(want, zs)
    torch.testing.assert_close(got + offset, want, rtol=0, atol=1e-10, msg=f"value {msg}")
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-10, msg=f"gradient {msg}")


def kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_v a (log a - log b) per row; what ``F.kl_div(input=log_b, target=log_a, log_target=True)`` sums to."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


# ---------------------------------------------------------------- huggingface/trl


def trl_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """huggingface/trl @ f2cd57710ae3 (1.10.0.dev0), trl/experimental/gkd/gkd_trainer.py,
    ``GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature, "batchmean")``.

    Both logits are divided by the temperature (no tau**2 factor). beta is the TEACHER's weight in the mixture:
    ``m = beta p + (1 - beta) q``, ``jsd = beta KL(p || m) + (1 - beta) KL(q || m)`` (their ``F.kl_div(log m,
    log p)`` is KL(p || m)), a KL, not a cross-entropy. Special cases by convention, not by limit: beta = 0 is
    forward KL(p || q), beta = 1 reverse KL(q || p). Reduction "batchmean" with labels: the sum over the kept
    positions (labels != -100) and the vocabulary divided by the number of kept positions.
    """
    log_q = torch.log_softmax(student_logits / temperature, -1)
    log_p = torch.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        per_token = kl_rows(log_p, log_q)
    elif beta == 1:
        per_token = kl_rows(log_q, log_p)
    else:
        log_m = torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp())
        per_token = beta * kl_rows(log_p, log_m) + (1 - beta) * kl_rows(log_q, log_m)
    keep = labels != IGNORE
    return per_token[keep].sum() / keep.sum()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_trl_generalized_jsd(seed, tau, beta):
    """Same beta: TRL's beta and ours are both the teacher's mixture weight (GKD, Agarwal et al., Eq. 1)."""
    zt, zs, labels, pl = case(seed)
    assert_same(lambda: ours("jsd", zt, zs, labels, pl, tau, beta=beta),
                lambda: trl_generalized_jsd(zs, zt, pl, beta, tau), zs, msg=f"beta={beta}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_trl_jsd_endpoints_map_to_our_kls(seed, tau):
    """TRL's beta = 0 / 1 (our jsd takes beta in (0, 1) only) are forward / reverse KL: our forward_kl / reverse_kl."""
    zt, zs, labels, pl = case(seed)
    assert_same(lambda: ours("forward_kl", zt, zs, labels, pl, tau),
                lambda: trl_generalized_jsd(zs, zt, pl, 0.0, tau), zs, msg="beta=0")
    assert_same(lambda: ours("reverse_kl", zt, zs, labels, pl, tau),
                lambda: trl_generalized_jsd(zs, zt, pl, 1.0, tau), zs, msg="beta=1")


# ---------------------------------------------------------------- linkedin/Liger-Kernel


def liger_jsd(log_q, log_p, shift_labels, beta):
    """linkedin/Liger-Kernel @ ead96b618e5c (0.8.2), src/liger_kernel/ops/jsd.py ``_jsd_kernel`` /
    ``LigerJSDFunction.forward(_input, target, shift_labels, beta)``, wrapped by transformers/jsd.py ``LigerJSD``.

    ``_input`` = X = log Q is the STUDENT (log-space), ``target`` = Y = log P the TEACHER. beta is the teacher's
    mixture weight, ``M = beta P + (1 - beta) Q``; per element ``beta P Y + (1 - beta) Q X - M log M``, i.e.
    ``beta KL(P || M) + (1 - beta) KL(Q || M)`` (a KL); beta = 0: ``P (Y - X)`` (forward KL), beta = 1: ``Q (X - Y)``
    (reverse KL). Rows whose label is -100 give 0; the sum is scaled by 1 / (number of kept rows). No temperature
    here: the chunked ``LigerFusedLinearJSDLoss`` (chunked_loss/fused_linear_distillation.py ``_compute_loss``)
    divides both logits by it before the log-softmax, with no tau**2 factor.
    """
    keep = (shift_labels != IGNORE).to(log_q.dtype)[:, None]
    p, q = log_p.exp(), log_q.exp()
    if beta == 0.0:
        elem = p * (log_p - log_q)
    elif beta == 1.0:
        elem = q * (log_q - log_p)
    else:
        m = beta * p + (1 - beta) * q
        elem = beta * p * log_p + (1 - beta) * q * log_q - m * torch.log(m)
    return (elem * keep).sum() / keep.sum()


def liger_jsd_grad_input(log_q, log_p, shift_labels, beta):
    """The kernel's hand-written gradient w.r.t. its input X = log Q (the elements of X taken as free variables):
    ``(1 - beta) Q (X - log M)``, beta = 0: ``-P``, beta = 1: ``Q (X - Y) + Q``; 0 on dropped rows; / kept rows."""
    keep = (shift_labels != IGNORE).to(log_q.dtype)[:, None]
    p, q = log_p.exp(), log_q.exp()
    if beta == 0.0:
        dx = -p
    elif beta == 1.0:
        dx = q * (log_q - log_p) + q
    else:
        dx = (1 - beta) * q * (log_q - torch.log(beta * p + (1 - beta) * q))
    return dx * keep / keep.sum()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_liger_jsd_value_and_handwritten_gradient(seed, tau, beta):
    """Liger's beta = ours (teacher weight); its beta 0 / 1 are our forward_kl / reverse_kl. Its inputs are
    ``log_softmax(z / tau)`` as the chunked loss forms them. Besides autograd through the restated value, the
    kernel's own gradient formula, pulled back through the log-softmax (``dz = (dX - q sum dX) / tau``), must
    equal our autograd gradient."""
    zt, zs, labels, pl = case(seed)
    name, kw = {0.0: ("forward_kl", {}), 1.0: ("reverse_kl", {})}.get(beta, ("jsd", {"beta": beta}))

    def liger():
        return liger_jsd(torch.log_softmax(zs / tau, -1), torch.log_softmax(zt / tau, -1), pl, beta)

    assert_same(lambda: ours(name, zt, zs, labels, pl, tau, **kw), liger, zs, msg=f"beta={beta}")
    (g_ours,) = torch.autograd.grad(ours(name, zt, zs, labels, pl, tau, **kw), zs)
    with torch.no_grad():
        log_q = torch.log_softmax(zs / tau, -1)
        dx = liger_jsd_grad_input(log_q, torch.log_softmax(zt / tau, -1), pl, beta)
        dz = (dx - log_q.exp() * dx.sum(-1, keepdim=True)) / tau
    torch.testing.assert_close(g_ours, dz, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- jongwooko/distillm


def distillm_forward_kl(logits, teacher_logits, labels):
    """jongwooko/distillm @ d47e77ff9d27, distillm/losses.py ``forward_kl(logits, teacher_logits, no_model_batch)``:
    ``logits`` = student, ``teacher_logits`` = teacher; ``-sum_v p log q``, a CROSS-ENTROPY (= KL(p || q) + H(p)),
    per-token mean over labels != -100; no temperature (finetune.py calls it on raw logits)."""
    return token_mean(-(torch.softmax(teacher_logits, -1) * torch.log_softmax(logits, -1)).sum(-1), labels)


def distillm_reverse_kl(logits, teacher_logits, labels):
    """distillm/losses.py ``reverse_kl``: ``-sum_v q (log p - log q)`` = KL(q || p), a KL; per-token mean."""
    q, log_q, log_p = torch.softmax(logits, -1), torch.log_softmax(logits, -1), torch.log_softmax(teacher_logits, -1)
    return token_mean(-(q * log_p - q * log_q).sum(-1), labels)


def distillm_skewed_forward_kl(logits, teacher_logits, labels, lam):
    """distillm/losses.py ``skewed_forward_kl(..., lam)``: mixture ``lam p + (1 - lam) q`` (lam = the TEACHER's
    weight), value ``-sum_v p log(mixture)``, a CROSS-ENTROPY (= KL(p || mixture) + H(p)); per-token mean."""
    p, q = torch.softmax(teacher_logits, -1), torch.softmax(logits, -1)
    return token_mean(-(p * torch.log(lam * p + (1 - lam) * q)).sum(-1), labels)


def distillm_skewed_reverse_kl(logits, teacher_logits, labels, lam):
    """distillm/losses.py ``skewed_reverse_kl(..., lam)``: mixture ``(1 - lam) p + lam q`` (lam = the STUDENT's
    weight), value ``-sum_v (q log(mixture) - q log q)`` = KL(q || mixture), a KL; per-token mean."""
    p, q, log_q = torch.softmax(teacher_logits, -1), torch.softmax(logits, -1), torch.log_softmax(logits, -1)
    return token_mean(-(q * torch.log((1 - lam) * p + lam * q) - q * log_q).sum(-1), labels)


def distillm_js_distance(logits, teacher_logits, labels, lam):
    """distillm/losses.py ``js_distance(..., lam)``: mixture ``(1 - lam) p + lam q`` (lam = the STUDENT's weight),
    value ``lam KL(q || m) + (1 - lam) KL(p || m)`` (each as ``-sum (x log m - x log x)``), a KL; per-token mean."""
    p, q = torch.softmax(teacher_logits, -1), torch.softmax(logits, -1)
    log_p, log_q = torch.log_softmax(teacher_logits, -1), torch.log_softmax(logits, -1)
    log_m = torch.log((1 - lam) * p + lam * q)
    return (lam * token_mean(-(q * log_m - q * log_q).sum(-1), labels)
            + (1 - lam) * token_mean(-(p * log_m - p * log_p).sum(-1), labels))


def distillm_tv_distance(logits, teacher_logits, labels):
    """distillm/losses.py ``tv_distance``: ``0.5 sum_v |p - q|``; per-token mean."""
    return token_mean(0.5 * (torch.softmax(teacher_logits, -1) - torch.softmax(logits, -1)).abs().sum(-1), labels)


def distillm_symmetric_kl(logits, teacher_logits, labels, lam):
    """distillm/losses.py ``symmetric_kl(..., lam)``: ``(1 - lam) forward_kl + lam reverse_kl`` (lam = the REVERSE
    part's weight), with distillm's forward_kl a cross-entropy."""
    return ((1 - lam) * distillm_forward_kl(logits, teacher_logits, labels)
            + lam * distillm_reverse_kl(logits, teacher_logits, labels))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("lam", [0.1, 0.3])
def test_distillm_losses(seed, lam):
    """distillm has no temperature in its losses (tau = 1). Mapped: skewed_forward_kl(lam) = our skew_kl(alpha=lam)
    + H(p); skewed_reverse_kl(lam) = our skew_rkl(alpha=lam); js_distance(lam) = our jsd(beta=1 - lam) (its lam
    weights the student); forward_kl = our forward_kl + H(p); symmetric_kl(lam) = (1 - lam) forward_kl + lam
    reverse_kl + (1 - lam) H(p); reverse_kl and tv_distance as they are."""
    zt, zs, labels, pl = case(seed)
    h = entropy_mean(torch.log_softmax(zt, -1), pl)
    assert_same(lambda: ours("forward_kl", zt, zs, labels, pl), lambda: distillm_forward_kl(zs, zt, pl), zs,
                offset=h, msg="forward_kl")
    assert_same(lambda: ours("reverse_kl", zt, zs, labels, pl), lambda: distillm_reverse_kl(zs, zt, pl), zs,
                msg="reverse_kl")
    assert_same(lambda: ours("skew_kl", zt, zs, labels, pl, alpha=lam),
                lambda: distillm_skewed_forward_kl(zs, zt, pl, lam), zs, offset=h, msg="skewed_forward_kl")
    assert_same(lambda: ours("skew_rkl", zt, zs, labels, pl, alpha=lam),
                lambda: distillm_skewed_reverse_kl(zs, zt, pl, lam), zs, msg="skewed_reverse_kl")
    assert_same(lambda: ours("jsd", zt, zs, labels, pl, beta=1 - lam),
                lambda: distillm_js_distance(zs, zt, pl, lam), zs, msg="js_distance")
    assert_same(lambda: ours("tvd", zt, zs, labels, pl), lambda: distillm_tv_distance(zs, zt, pl), zs, msg="tvd")
    assert_same(lambda: (1 - lam) * ours("forward_kl", zt, zs, labels, pl)
                + lam * ours("reverse_kl", zt, zs, labels, pl),
                lambda: distillm_symmetric_kl(zs, zt, pl, lam), zs, offset=(1 - lam) * h, msg="symmetric_kl")


# ---------------------------------------------------------------- pytorch/torchtune


def torchtune_forward_kl(student_logits, teacher_logits, labels):
    """pytorch/torchtune @ bd2a0fc7c314 (0.7.0), torchtune/modules/loss/kd_losses.py
    ``ForwardKLLoss.forward(student_logits, teacher_logits, labels, normalize=True)``: ``-sum_v p log q``, a
    CROSS-ENTROPY despite the name (= KL(p || q) + H(p)); per-token mean over labels != -100; no temperature."""
    return token_mean(-(torch.softmax(teacher_logits, -1) * torch.log_softmax(student_logits, -1)).sum(-1), labels)


def torchtune_reverse_kl(student_logits, teacher_logits, labels):
    """kd_losses.py ``ReverseKLLoss.forward``: ``-sum_v (q log p - q log q)`` = KL(q || p), a KL; per-token mean."""
    q, log_q = torch.softmax(student_logits, -1), torch.log_softmax(student_logits, -1)
    return token_mean(-(q * torch.log_softmax(teacher_logits, -1) - q * log_q).sum(-1), labels)


def torchtune_symmetric_kl(student_logits, teacher_logits, labels, sym_kd_ratio):
    """kd_losses.py ``SymmetricKLLoss(sym_kd_ratio)``: ``ratio ForwardKLLoss + (1 - ratio) ReverseKLLoss`` (the
    ratio weights the FORWARD part, the reverse of distillm's symmetric_kl lam)."""
    return (sym_kd_ratio * torchtune_forward_kl(student_logits, teacher_logits, labels)
            + (1 - sym_kd_ratio) * torchtune_reverse_kl(student_logits, teacher_logits, labels))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_torchtune_kd_losses(seed, ratio):
    """ForwardKLLoss = our forward_kl + H(p) (same gradient); ReverseKLLoss = our reverse_kl; SymmetricKLLoss(r) =
    r forward_kl + (1 - r) reverse_kl + r H(p). tau = 1 (torchtune's KD losses take no temperature)."""
    zt, zs, labels, pl = case(seed)
    h = entropy_mean(torch.log_softmax(zt, -1), pl)
    assert_same(lambda: ours("forward_kl", zt, zs, labels, pl), lambda: torchtune_forward_kl(zs, zt, pl), zs,
                offset=h, msg="ForwardKLLoss")
    assert_same(lambda: ours("reverse_kl", zt, zs, labels, pl), lambda: torchtune_reverse_kl(zs, zt, pl), zs,
                msg="ReverseKLLoss")
    assert_same(lambda: ratio * ours("forward_kl", zt, zs, labels, pl)
                + (1 - ratio) * ours("reverse_kl", zt, zs, labels, pl),
                lambda: torchtune_symmetric_kl(zs, zt, pl, ratio), zs, offset=ratio * h, msg="SymmetricKLLoss")


# ---------------------------------------------------------------- arcee-ai/DistillKit


def distillkit_reduce(per_token, labels, temperature):
    """DistillKit's loss classes (lossfuncs/kl.py ``KLDLoss.__call__``, jsd.py ``JSDLoss``, tvd.py ``TVDLoss``):
    ``sum(per_token * mask) * temperature**2 / mask.sum()`` with the trainer's mask ``labels >= 0``
    (trainer.py). The tau**2 factor is INSIDE the loss, where ours is in ``Objective``."""
    keep = (labels >= 0).to(per_token.dtype)
    return (per_token * keep).sum() * temperature**2 / keep.sum()


def distillkit_dense_kl(logits, target_logits, labels, temperature):
    """arcee-ai/DistillKit @ a61c2e7d25c2 (1.0.0), distillkit/lossfuncs/kl.py ``dense_kl_div``: ``logits`` =
    student, ``target_logits`` = teacher, both divided by the temperature; ``F.kl_div(log q, log p)`` summed over
    the vocabulary = KL(p || q), a KL."""
    log_q, log_p = torch.log_softmax(logits / temperature, -1), torch.log_softmax(target_logits / temperature, -1)
    return distillkit_reduce(kl_rows(log_p, log_q), labels, temperature)


def distillkit_sparse_kl(logits, target_ids, target_values, labels, temperature, symmetric_uniform=False):
    """kl.py ``sparse_kl_div_inner`` with common.py ``get_logprobs`` / ``get_target_logprobs`` (log_target=True,
    target_generation_temperature = 1): student ``(z / tau)[ids] - logsumexp(z / tau)``; teacher from the stored
    T = 1 logprobs ``lp``: ``lp / tau - logsumexp(lp / tau)`` (missing = ZERO), then ``sum p_j (lt_j - ls_j)``.
    SYMMETRIC_UNIFORM (used here at tau = 1 only, where the teacher values are taken as stored) adds
    ``m_t (log m_t - log m_s)`` with each side's missing mass ``1 - sum`` clamped to [1e-8, 1 - 1e-8] in log1p."""
    ls = (logits / temperature).gather(-1, target_ids) - torch.logsumexp(logits / temperature, -1, keepdim=True)
    if symmetric_uniform:
        assert temperature == 1.0
        lt = target_values
    else:
        lt = target_values / temperature - torch.logsumexp(target_values / temperature, -1, keepdim=True)
    inner = (lt.exp() * (lt - ls)).sum(-1)
    if symmetric_uniform:
        eps = 1e-8
        log_mt = torch.log1p(-lt.exp().sum(-1).clamp(min=eps, max=1 - eps))
        log_ms = torch.log1p(-ls.exp().sum(-1).clamp(min=eps, max=1 - eps))
        inner = inner + log_mt.exp() * (log_mt - log_ms)
    return distillkit_reduce(inner, labels, temperature)


def distillkit_dense_jsd(logits, target_logits, labels, temperature):
    """jsd.py ``dense_js_div``: both divided by the temperature, ``m = (p + q) / 2``, ``0.5 (KL(q || m) + KL(p || m))``
    (the symmetric JSD, beta = 1/2, no parameter)."""
    log_q, log_p = torch.log_softmax(logits / temperature, -1), torch.log_softmax(target_logits / temperature, -1)
    log_m = torch.logaddexp(log_q, log_p) - math.log(2.0)
    return distillkit_reduce(0.5 * (kl_rows(log_q, log_m) + kl_rows(log_p, log_m)), labels, temperature)


def distillkit_dense_tvd(logits, target_logits, labels, temperature):
    """tvd.py ``dense_tvd``: ``0.5 sum_v |p - q|`` of the tempered distributions."""
    p, q = torch.softmax(target_logits / temperature, -1), torch.softmax(logits / temperature, -1)
    return distillkit_reduce(0.5 * (p - q).abs().sum(-1), labels, temperature)


def distillkit_sparse_tvd(logits, target_ids, target_values, labels, temperature):
    """tvd.py ``sparse_tvd_inner`` (missing = ZERO): ``0.5 (sum_j |p_j - q_j| + max(0, 1 - sum_j q_j))``."""
    ls = (logits / temperature).gather(-1, target_ids) - torch.logsumexp(logits / temperature, -1, keepdim=True)
    lt = target_values / temperature - torch.logsumexp(target_values / temperature, -1, keepdim=True)
    q = ls.exp()
    return distillkit_reduce(0.5 * ((lt.exp() - q).abs().sum(-1) + (1 - q.sum(-1)).clamp(min=0)), labels,
                             temperature)


def objective_loss(loss, zt, zs, labels, peer_labels, tau, **kw):
    """Our training loss (``Objective``: kd_coef * tau**2 * kd, ce_weight 0) with weight 1 on the kept positions."""
    targets = full_targets(zt, labels)
    view = SV.student_view_from_logits(zs, targets.ids, labels, temperature=tau)
    value, _ = L.Objective(loss, temperature=tau, **kw)(view, targets, kept(peer_labels))
    return value


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_distillkit_losses_through_objective(seed, tau):
    """DistillKit's KLDLoss / JSDLoss / TVDLoss (tau**2 included) against our Objective("forward_kl" / "jsd" with
    beta 0.5 / "tvd"), dense logits and the sparse path fed our cache's K = V ids and stored T = 1 logprobs.
    DistillKit's sparse JSD is left out: it drops terms with p or q <= 1e-8 and clamps M at 1e-8 (guards, not
    part of the formula); its SYMMETRIC_UNIFORM path at tau != 1 gives the rounding residue 1 - sum p (~1e-16)
    the power 1 / tau (~1e-8) and is compared at tau = 1 only."""
    zt, zs, labels, pl = case(seed)
    targets = full_targets(zt, labels)
    ids, lp = targets.ids, targets.logprobs
    assert_same(lambda: objective_loss("forward_kl", zt, zs, labels, pl, tau),
                lambda: distillkit_dense_kl(zs, zt, pl, tau), zs, msg="dense_kl_div")
    assert_same(lambda: objective_loss("forward_kl", zt, zs, labels, pl, tau),
                lambda: distillkit_sparse_kl(zs, ids, lp, pl, tau), zs, msg="sparse_kl_div ZERO")
    if tau == 1.0:
        assert_same(lambda: objective_loss("forward_kl", zt, zs, labels, pl, tau),
                    lambda: distillkit_sparse_kl(zs, ids, lp, pl, tau, symmetric_uniform=True), zs,
                    msg="sparse_kl_div SYMMETRIC_UNIFORM")
    assert_same(lambda: objective_loss("jsd", zt, zs, labels, pl, tau, beta=0.5),
                lambda: distillkit_dense_jsd(zs, zt, pl, tau), zs, msg="dense_js_div")
    assert_same(lambda: objective_loss("tvd", zt, zs, labels, pl, tau),
                lambda: distillkit_dense_tvd(zs, zt, pl, tau), zs, msg="dense_tvd")
    assert_same(lambda: objective_loss("tvd", zt, zs, labels, pl, tau),
                lambda: distillkit_sparse_tvd(zs, ids, lp, pl, tau), zs, msg="sparse_tvd ZERO")


# ---------------------------------------------------------------- SakanaAI/TAID


def taid_reference_loss(logits, teacher_logits, labels, t):
    """SakanaAI/TAID @ a0628922c161, src/distil_losses/taid.py ``TAID.compute_loss(logits, teacher_logits, mask)``
    with fkl.py ``forward_kl(..., teacher_probs=p_t)``: ``p_t = softmax((1 - t) sg(z_student) + t z_teacher)`` on the
    RAW logits (ours mixes log-probabilities: the same softmax, the per-row log-normalisers cancel), value
    ``-sum_v p_t log q``, a CROSS-ENTROPY (= KL(p_t || q) + H(p_t), H(p_t) free of gradient); per-token mean; no
    temperature."""
    p_t = torch.softmax((1 - t) * logits.detach() + t * teacher_logits, -1)
    return token_mean(-(p_t * torch.log_softmax(logits, -1)).sum(-1), labels)


def taid_reference_schedule(losses, t_start, t_end, alpha, beta, num_train_steps):
    """taid.py ``TAID.update_t(loss, global_step, num_train_steps)`` over a sequence of losses, global_step 0, 1, ...
    (the optimiser steps done before the one whose loss it is): the first call only stores the loss; then
    ``rel = (prev - loss) / (prev + 1e-15)``, ``mom = beta mom + (1 - beta) rel``,
    ``t = min(t_end, max(t_start + (t_end - t_start) step / steps, t + alpha sigmoid(mom) (1 - t)))``."""
    t, prev, mom, out = t_start, None, 0.0, []
    for step, loss in enumerate(losses):
        if prev is not None:
            mom = beta * mom + (1 - beta) * (prev - loss) / (prev + 1e-15)
            target = t_start + (t_end - t_start) * step / num_train_steps
            t = min(t_end, max(target, t + alpha / (1 + math.exp(-mom)) * (1 - t)))
        prev = loss
        out.append(t)
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("t", [0.4, 0.75, 1.0])
def test_taid_reference_loss(seed, t):
    """TAID's loss = our taid(t) + H(p_t) (values), and the same gradient (p_t carries none on either side)."""
    zt, zs, labels, pl = case(seed)
    h = entropy_mean(torch.log_softmax((1 - t) * zs.detach() + t * zt, -1), pl)
    assert_same(lambda: ours("taid", zt, zs, labels, pl, t=t), lambda: taid_reference_loss(zs, zt, pl, t), zs,
                offset=h, msg=f"t={t}")


def test_taid_reference_schedule_on_the_same_losses():
    """Our Objective.step_end(loss, step) with step = the optimiser steps done before (as trainers/loop.py passes
    it) follows TAID's update_t on the same loss sequence. Differences of convention, not of formula: our relative
    change divides by |prev| + 1e-8 (theirs prev + 1e-15: ~1e-12 in t here, losses ~ 1). Not compared,
    because it is the caller's choice: in training trainers/loop.py feeds the KD metric, our KL(p_t || q) averaged
    over the step's micro-batches, once per optimiser step; TAID feeds its own loss, the cross-entropy
    KL(p_t || q) + H(p_t), at every forward pass."""
    steps, t_start, t_end, alpha, beta = 120, 0.4, 1.0, 0.02, 0.99
    losses = [1.5 * 0.985**s + 0.1 * math.sin(0.7 * s) + 0.2 for s in range(steps)]
    obj = L.Objective("taid", taid_start=t_start, taid_end=t_end, taid_alpha=alpha, taid_beta=beta,
                      total_steps=steps)
    got = []
    for step, x in enumerate(losses):
        obj.step_end(x, step)
        got.append(obj.taid_t)
    want = taid_reference_schedule(losses, t_start, t_end, alpha, beta, steps)
    assert got == pytest.approx(want, abs=1e-10, rel=0)
    assert got[-1] > got[0] + 0.3


# ---------------------------------------------------------------- the comparison can fail


@pytest.mark.parametrize("seed", SEEDS)
def test_deliberately_wrong_restatements_are_told_apart(seed):
    """The same checks on deliberately wrong restatements fail, by far more than the tolerance: teacher and student
    swapped (TRL's JSD at beta 0.1, Liger's kernel, distillm's skewed reverse KL), forward and reverse KL
    confused, a cross-entropy compared without its entropy constant, distillm's lam read as the teacher's weight."""
    zt, zs, labels, pl = case(seed)
    tau = 2.0

    def far(a, b, what):
        assert (a - b).abs().max() > 1e-3, what

    def grad(x):
        return torch.autograd.grad(x, zs)[0]

    ours_jsd = ours("jsd", zt, zs, labels, pl, tau, beta=0.1)
    far(ours_jsd, trl_generalized_jsd(zt, zs, pl, 0.1, tau), "TRL with teacher and student swapped")
    far(grad(ours("jsd", zt, zs, labels, pl, tau, beta=0.1)), grad(trl_generalized_jsd(zt, zs, pl, 0.1, tau)),
        "TRL swapped: gradient")
    far(ours_jsd, trl_generalized_jsd(zs, zt, pl, 0.9, tau), "TRL with beta read as the student's weight")
    swapped = liger_jsd(torch.log_softmax(zt / tau, -1), torch.log_softmax(zs / tau, -1), pl, 0.1)
    far(ours_jsd, swapped, "Liger with the teacher as its input")
    far(ours("forward_kl", zt, zs, labels, pl), torchtune_reverse_kl(zs, zt, pl), "forward KL against a reverse KL")
    far(ours("forward_kl", zt, zs, labels, pl), torchtune_forward_kl(zs, zt, pl), "a cross-entropy without H(p)")
    far(ours("skew_rkl", zt, zs, labels, pl, alpha=0.1), distillm_skewed_reverse_kl(zt, zs, pl, 0.1),
        "distillm's skewed reverse KL with the arguments swapped")
    far(ours("jsd", zt, zs, labels, pl, beta=0.1), distillm_js_distance(zs, zt, pl, 0.1),
        "distillm's js_distance lam taken as our beta")
    # and the gradient of the cross-entropy stays ours: the constant is the only difference
    torch.testing.assert_close(grad(ours("forward_kl", zt, zs, labels, pl)), grad(torchtune_forward_kl(zs, zt, pl)),
                               rtol=0, atol=1e-10)
