"""trainers.losses against plain full-vocabulary float64 references written here.

The references work on dense probability vectors: ``softmax(z / tau)`` over the whole
vocabulary, or its coarse-graining onto the stored ids plus one bucket for the rest, with
every divergence spelt out as a formula (TAID's target in its product form
``q^(1-t) p^t / Z``). Nothing is compared with the module's own output.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logitstore.errors import InvalidInputError
from trainers import losses as L
from trainers import view as SV
from trainers.targets import SparseTargets

KD = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_rkl", "taid")
BETA, ALPHA, TAID_T = 0.3, 0.2, 0.6  # not the defaults, so the parameters are exercised
F64 = torch.float64
STEP = 5 / 128  # FORMAT.md: the default qdelta step


# ---------------------------------------------------------------- references


def ref_kl(p, q):
    """sum p log(p / q) with 0 log 0 = 0, over the last axis."""
    return torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(-1)


def ref_div(name, p, q, q_sg=None):
    """The divergence ``name`` between dense probability rows p (teacher) and q (student)."""
    if name == "forward_kl":
        return ref_kl(p, q)
    if name == "reverse_kl":
        return ref_kl(q, p)
    if name == "jsd":
        m = BETA * p + (1 - BETA) * q
        return BETA * ref_kl(p, m) + (1 - BETA) * ref_kl(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skew_kl":
        return ref_kl(p, ALPHA * p + (1 - ALPHA) * q)
    if name == "skew_rkl":
        return ref_kl(q, ALPHA * q + (1 - ALPHA) * p)
    assert name == "taid"
    qs = q.detach() if q_sg is None else q_sg
    pt = qs ** (1 - TAID_T) * p ** TAID_T
    return ref_kl(pt / pt.sum(-1, keepdim=True), q)


def module_div(name, log_t, log_s, mask):
    kw = {"jsd": {"beta": BETA}, "skew_kl": {"alpha": ALPHA}, "skew_rkl": {"alpha": ALPHA}, "taid": {"t": TAID_T}}
    return getattr(L, name)(log_t, log_s, mask, **kw.get(name, {}))


def sparse_targets(zt, n, k, *, gen, labels=None, pad_ids=True, logprob_dtype=F64, quantise=False):
    """The cache's view of teacher logits zt [N, V]: the n[i] most likely ids in k columns."""
    N, V = zt.shape
    lp = torch.log_softmax(zt.to(F64), -1)
    order = torch.argsort(lp, dim=1, descending=True)
    cols = order[:, :k] if k <= V else torch.cat([order, order[:, : k - V]], 1)
    valid = torch.arange(k)[None, :] < n[:, None]
    support = torch.zeros(N, V, dtype=torch.bool).scatter_(1, torch.where(valid, cols, order[:, :1]), True)
    tail = (lp.exp() * ~support).sum(-1)
    vals = lp.gather(1, cols)
    if quantise:
        vals = torch.round(vals / STEP) * STEP
    logprobs = torch.where(valid, vals, -math.inf).to(logprob_dtype)
    pad = torch.randint(-2, V + 3, (N, k), generator=gen) if pad_ids else torch.zeros(N, k, dtype=torch.long)
    ids = torch.where(valid, cols, pad)
    if labels is None:
        labels = torch.randint(0, V, (N,), generator=gen)
    return SparseTargets(ids=ids, valid=valid, logprobs=logprobs, tail_mass=tail.to(logprob_dtype),
                           labels=labels, vocab_size=V), support


def coarse(p, targets, support):
    """p [N, V] coarse-grained onto the stored ids (0 where invalid) plus one bucket for the rest."""
    on = torch.where(targets.valid, p.gather(1, targets.ids.clamp(0, p.shape[1] - 1)), 0.0)
    return torch.cat([on, (p * ~support).sum(-1, keepdim=True)], 1)


def restricted(p, targets):
    """p [N, V] restricted to the stored ids and renormalised there."""
    on = torch.where(targets.valid, p.gather(1, targets.ids.clamp(0, p.shape[1] - 1)), 0.0)
    return on / on.sum(-1, keepdim=True)


def logits(gen, n, v, scale=3.0):
    return torch.randn(n, v, generator=gen, dtype=F64) * scale


# ---------------------------------------------------------------- student view


def test_student_view_from_logits_matches_dense():
    gen = torch.Generator().manual_seed(1)
    z = logits(gen, 9, 23)
    targets, _ = sparse_targets(logits(gen, 9, 23), torch.randint(1, 6, (9,), generator=gen), 5, gen=gen)
    for tau in (1.0, 0.7):
        view = SV.student_view_from_logits(z, targets.ids, targets.labels, temperature=tau, need_entropy=True)
        ref = torch.log_softmax(z / tau, -1).gather(1, targets.ids.clamp(0, 22))
        torch.testing.assert_close(view.logp_ids[targets.valid], ref[targets.valid], rtol=0, atol=1e-12)
        lp1 = torch.log_softmax(z, -1)
        torch.testing.assert_close(view.logp_label, lp1[torch.arange(9), targets.labels], rtol=0, atol=1e-12)
        torch.testing.assert_close(view.entropy, -(lp1.exp() * lp1).sum(-1), rtol=0, atol=1e-12)
    low = SV.student_view_from_logits(z.to(torch.bfloat16), targets.ids, targets.labels)
    assert low.logp_ids.dtype == torch.float32 and low.entropy is None


@pytest.mark.parametrize("tau", [1.0, 1.5])  # 1.0: the fused gather's own backward
@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_chunked_view_matches_plain_values_and_gradients(chunk, tau):
    N, H, V, K = 13, 6, 37, 5
    gen = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(H, V)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=gen))
    hidden = torch.randn(N, H, generator=gen)
    ids = torch.randint(-1, V + 2, (N, K), generator=gen)  # padding values out of range on purpose
    labels = torch.randint(0, V, (N,), generator=gen)
    r_ids, r_lab = torch.randn(N, K, generator=gen), torch.randn(N, generator=gen)
    calls = []

    def counted(h):
        calls.append(h.shape[0])
        return head(h)

    def run(view_fn):
        head.zero_grad()
        h = hidden.clone().requires_grad_()
        view = view_fn(h)
        ((view.logp_ids * r_ids).sum() + (view.logp_label * r_lab).sum()).backward()
        return view, h.grad.clone(), head.weight.grad.clone()

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        got, gh, gw = run(lambda h: SV.student_view(h, counted, ids, labels, temperature=tau, chunk_size=chunk,
                                                   need_entropy=True))
    assert saved and all(shape[-1:] != (V,) for shape in saved)  # no [chunk, V] tensor kept for the backward
    sizes = [min(chunk, N - s) for s in range(0, N, chunk)]
    assert calls[:len(sizes)] == sizes and sorted(calls[len(sizes):]) == sorted(sizes)  # recomputed in backward
    plain, ph, pw = run(lambda h: SV.student_view_from_logits(head(h), ids, labels, temperature=tau,
                                                             need_entropy=True))
    # plain float64 reference of the same functional, gradients by autograd
    h64 = hidden.to(F64).requires_grad_()
    w64 = head.weight.detach().to(F64).requires_grad_()
    z = h64 @ w64.T + head.bias.detach().to(F64)
    ref_ids = torch.log_softmax(z / tau, -1).gather(1, ids.clamp(0, V - 1))
    lp1 = torch.log_softmax(z, -1)
    ref_lab = lp1[torch.arange(N), labels]
    ((ref_ids * r_ids).sum() + (ref_lab * r_lab).sum()).backward()
    ref_ent = -(lp1.exp() * lp1).sum(-1)
    for a, b, want in ((got.logp_ids, plain.logp_ids, ref_ids), (got.logp_label, plain.logp_label, ref_lab),
                       (got.entropy, plain.entropy, ref_ent), (gh, ph, h64.grad), (gw, pw, w64.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.to(F64), want.detach(), rtol=0, atol=1e-4)
    # recompute=False: the same numbers, with the head run once per chunk (forward only)
    calls.clear()
    kept, kh, kw = run(lambda h: SV.student_view(h, counted, ids, labels, temperature=tau, chunk_size=chunk,
                                                need_entropy=True, recompute=False))
    assert calls == sizes
    for a, b in ((kept.logp_ids, got.logp_ids), (kept.logp_label, got.logp_label), (kh, gh), (kw, gw)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_student_view_rejects_bad_arguments():
    h, ids, lab = torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    head = torch.nn.Linear(2, 5)
    with pytest.raises(InvalidInputError, match="chunk_size=0"):
        SV.student_view(h, head, ids, lab, chunk_size=0)
    with pytest.raises(InvalidInputError, match="temperature=0"):
        SV.student_view(h, head, ids, lab, temperature=0)
    with pytest.raises(InvalidInputError, match=r"labels \(2,\)"):
        SV.student_view(h, head, ids, lab[:2])
    with pytest.raises(InvalidInputError, match=r"hidden has shape \(3, 2, 1\)"):
        SV.student_view(h[..., None], head, ids, lab)


def test_sparse_targets_check_shapes():
    ids, v = torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.bool)
    kw = {"ids": ids, "valid": v, "logprobs": None, "tail_mass": torch.zeros(4), "labels": ids[:, 0], "vocab_size": 9}
    SparseTargets(**kw)
    for bad, match in (({"valid": v[:, :2]}, r"valid has shape \(4, 2\)"), ({"labels": ids[:3, 0]}, "labels"),
                       ({"ids": ids[0]}, "ids must be"), ({"counts": ids.float()}, "draws=None")):
        with pytest.raises(InvalidInputError, match=match):
            SparseTargets(**{**kw, **bad})


# ---------------------------------------------------------------- laws


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(7, 40), kfrac=st.floats(0, 1), tau=st.sampled_from([0.5, 1, 2]),
       tail=st.sampled_from(["other", "renormalize"]), scale=st.floats(0.1, 5), low=st.booleans())
def test_laws_self_divergence_zero_and_nonnegative(seed, V, kfrac, tau, tail, scale, low):
    """KL(p||p) = 0 and every divergence >= 0; bucket distributions sum to 1. ``low``: float32 and quantised."""
    gen = torch.Generator().manual_seed(seed)
    N, K = 6, 1 + int(kfrac * (V - 1))
    zt, zs = logits(gen, N, V, scale), logits(gen, N, V, scale)
    n = torch.randint(1, K + 1, (N,), generator=gen)
    dt = torch.float32 if low else F64
    targets, _ = sparse_targets(zt, n, K, gen=gen, logprob_dtype=dt, quantise=low)
    tol = 1e-6 if low else 1e-9
    for z in (zt, zs):
        view = SV.student_view_from_logits(z.to(dt), targets.ids, targets.labels, temperature=tau)
        log_t, log_s, mask = L.buckets(view, targets, tail=tail, temperature=tau)
        assert log_t.shape == (N, K + (tail == "other"))
        off = []  # how far each row's bucket masses miss 1 (rounding of the stored logprobs)
        for lg in (log_t, log_s):
            total = torch.where(mask, lg.exp(), 0.0).sum(-1)
            torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=10 * tol)
            off.append((total - 1).abs())
        # Gibbs's inequality holds for distributions; for masses a, b near 1 the log-sum inequality
        # bounds KL below by a*log(a/b) ~ -(|a-1| + |b-1|), so the floor is the measured miss, per row.
        floor = -(tol + off[0] + off[1])
        for name in KD:
            d = module_div(name, log_t, log_s, mask)
            assert torch.isfinite(d).all() and (d >= floor).all(), (name, d, floor)
            self_d = module_div(name, log_t, log_t, mask)
            assert (self_d.abs() <= tol).all(), (name, self_d)
            if z is zt and not low and (tail == "renormalize" or tau == 1):  # student = teacher exactly
                assert (d.abs() <= tol).all(), (name, d)


@pytest.mark.parametrize("tail", ["other", "renormalize"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("pad", [0, 3])
def test_full_support_equals_dense(tail, tau, pad):
    """K = V (plus ``pad`` invalid columns): every divergence and its gradient equal the dense ones."""
    gen = torch.Generator().manual_seed(3)
    N, V = 7, 11
    zt, zs = logits(gen, N, V), logits(gen, N, V).requires_grad_()
    targets, _ = sparse_targets(zt, torch.full((N,), V), V + pad, gen=gen)
    p = torch.softmax(zt / tau, -1)
    r = torch.rand(N, generator=gen, dtype=F64)
    for name in KD:
        view = SV.student_view_from_logits(zs, targets.ids, targets.labels, temperature=tau)
        got = module_div(name, *L.buckets(view, targets, tail=tail, temperature=tau))
        (g_got,) = torch.autograd.grad((got * r).sum(), zs)
        want = ref_div(name, p, torch.softmax(zs / tau, -1))
        (g_want,) = torch.autograd.grad((want * r).sum(), zs)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=name)
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-10, msg=name)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(8, 40), kfrac=st.floats(0, 0.8))
def test_sparse_equals_coarse_grained_dense(seed, V, kfrac):
    """K < V at tau = 1: tail "other" is the divergence between the coarse-grained distributions
    (value and gradient), at most the full-vocabulary one for the KLs; "renormalize" is the
    divergence between the distributions restricted to the support and renormalised."""
    gen = torch.Generator().manual_seed(seed)
    N, K = 5, 1 + int(kfrac * (V - 2))
    zt, zs = logits(gen, N, V), logits(gen, N, V).requires_grad_()
    targets, support = sparse_targets(zt, torch.randint(1, K + 1, (N,), generator=gen), K, gen=gen)
    p, q = torch.softmax(zt, -1), torch.softmax(zs, -1)
    view = SV.student_view_from_logits(zs, targets.ids, targets.labels)
    other, renorm = L.buckets(view, targets, tail="other"), L.buckets(view, targets, tail="renormalize")
    for name in KD:
        got = module_div(name, *other)
        want = ref_div(name, coarse(p, targets, support), coarse(q, targets, support))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)
        grads = [torch.autograd.grad(v.sum(), zs, retain_graph=True)[0] for v in (got, want)]
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-9, msg=name)
        want_r = ref_div(name, restricted(p, targets), restricted(q, targets))
        torch.testing.assert_close(module_div(name, *renorm), want_r, rtol=1e-9, atol=1e-10, msg=name)
    assert (L.forward_kl(*other) <= ref_kl(p, q) + 1e-10).all()
    assert (L.reverse_kl(*other) <= ref_kl(q, p) + 1e-10).all()


@pytest.mark.parametrize("tau", [0.5, 2.0, 3.0])
def test_uniform_tail_tempering_exact_and_bounds(tau):
    """With a uniform teacher tail the tempered "other" bucket is exact; otherwise it bounds the
    true tempered tail from above (tau > 1) or below (tau < 1), as documented."""
    gen = torch.Generator().manual_seed(4)
    N, V, K = 6, 30, 6
    n = torch.randint(1, K + 1, (N,), generator=gen)
    zt = torch.zeros(N, V, dtype=F64)  # the tail: every token outside the support has logit 0
    on = torch.arange(K)[None, :] < n[:, None]
    zt[:, :K] = torch.where(on, 1.0 + torch.rand(N, K, generator=gen, dtype=F64) * 4, 0.0)
    zt = zt[:, torch.randperm(V, generator=gen)]
    zs = logits(gen, N, V)
    targets, support = sparse_targets(zt, n, K, gen=gen)
    view = SV.student_view_from_logits(zs, targets.ids, targets.labels, temperature=tau)
    b = L.buckets(view, targets, tail="other", temperature=tau)
    p = coarse(torch.softmax(zt / tau, -1), targets, support)
    q = coarse(torch.softmax(zs / tau, -1), targets, support)
    for name in KD:
        torch.testing.assert_close(module_div(name, *b), ref_div(name, p, q), rtol=1e-9, atol=1e-10, msg=name)
    # a non-uniform tail: the uniform assumption is a bound, and not exact
    zt2 = logits(gen, N, V)
    targets2, support2 = sparse_targets(zt2, n, K, gen=gen)
    log_t = L.buckets(view, targets2, tail="other", temperature=tau)[0]
    true_other = coarse(torch.softmax(zt2 / tau, -1), targets2, support2)[:, K]
    assumed = log_t[:, K].exp()
    assert ((assumed >= true_other) if tau > 1 else (assumed <= true_other)).all()
    assert ((assumed - true_other).abs() > 1e-6).all()


def test_other_bucket_kept_when_the_teacher_tail_is_empty():
    """Tail mass 0 with n < V (fp16 flushes tails below 6e-8 to 0; a top-p rule can cover all the mass): the
    "other" bucket stays on both sides, so the student's mass outside the support is still penalised."""
    gen = torch.Generator().manual_seed(5)
    targets, _ = sparse_targets(logits(gen, 4, 9), torch.tensor([1, 2, 3, 3]), 3, gen=gen)
    targets.tail_mass = torch.tensor([0.0, 0.2, 0.0, 0.1], dtype=F64)
    view = SV.student_view_from_logits(logits(gen, 4, 9), targets.ids, targets.labels)
    log_t, log_s, mask = L.buckets(view, targets)
    assert mask[:, 3].tolist() == [True] * 4
    assert torch.isfinite(log_t).all() and torch.isfinite(log_s).all()
    eps = torch.finfo(F64).eps  # the teacher's empty bucket is floored at the dtype's epsilon
    assert log_t[[0, 2], 3].exp().max() < 2 * eps
    with pytest.raises(InvalidInputError, match="tail='sample'"):
        L.buckets(view, targets, tail="sample")


@pytest.mark.parametrize("loss", [name for name in L.LOSSES if name != "ce"])
def test_every_loss_is_continuous_as_the_tail_mass_goes_to_zero(loss):
    """No jump at m = 0 (version 1 masked the bucket there: reverse KL 24.8 at m = 1e-12, -0.070 at m = 0): the
    values converge monotonically to the value at 0, which equals the value just below the floor."""
    gen = torch.Generator().manual_seed(11)
    targets, _ = sparse_targets(logits(gen, 3, 12), torch.tensor([3, 4, 5]), 5, gen=gen)
    view = SV.student_view_from_logits(logits(gen, 3, 12), targets.ids, targets.labels)
    obj = L.Objective(loss, tail="other")
    exact = targets.valid.to(F64) * targets.logprobs.exp()
    values = []
    for m in (1e-4, 1e-8, 1e-12, 1e-17, 0.0):
        targets.tail_mass = torch.full((3,), m, dtype=F64)
        targets.logprobs = torch.where(targets.valid, (exact / exact.sum(1, keepdim=True) * (1 - m)).log(), -math.inf)
        values.append(obj.kd(view, targets))
    v = torch.stack(values)  # [5, 3]
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v[3], v[4], rtol=0, atol=1e-12)  # below the floor: the same as m = 0
    steps = (v[1:] - v[:-1])
    assert ((steps >= -1e-9).all() or (steps <= 1e-9).all()), v  # monotone in m: no jump on the way to 0


@pytest.mark.parametrize("loss", [name for name in L.LOSSES if name not in ("ce", "taid")])
def test_every_loss_is_minimised_by_the_teacher_when_its_tail_is_empty(loss):
    """A free student distribution trained on one position with an empty teacher tail ends at the teacher: its
    mass on the support in the teacher's proportions and (almost) none outside (version 1's reverse KL kept
    only 1/e of it on the support)."""
    V, n = 10, 4
    lp_t = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=F64))
    targets = SparseTargets(ids=torch.arange(n)[None], valid=torch.ones(1, n, dtype=torch.bool), logprobs=lp_t,
                            tail_mass=torch.zeros(1, dtype=F64), labels=torch.zeros(1, dtype=torch.long),
                            vocab_size=V)
    z = torch.zeros(1, V, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.05)
    obj = L.Objective(loss, tail="other")
    for _ in range(3000):
        view = SV.student_view_from_logits(z, targets.ids, targets.labels)
        opt.zero_grad()
        obj.kd(view, targets).sum().backward()
        opt.step()
    q = torch.softmax(z.detach(), -1)[0]
    assert q[:n].sum() > 0.99, (loss, q)
    torch.testing.assert_close(q[:n] / q[:n].sum(), lp_t[0].exp(), atol=2e-3, rtol=0)


# ---------------------------------------------------------------- the completed tail (tail "entropy")


def with_entropy(targets, zt):
    """``targets`` with the teacher's exact full-vocabulary entropy of logits ``zt``."""
    lp = torch.log_softmax(zt.to(F64), -1)
    targets.entropy = -(lp.exp() * lp).sum(-1)
    return targets


def ref_tail_entropy(p, support):
    """The entropy of p [N, V] restricted to the ids outside ``support`` and renormalised."""
    out = torch.where(support, 0.0, p)
    out = out / out.sum(-1, keepdim=True)
    return -torch.where(out > 0, out * out.log(), 0.0).sum(-1)


def ref_completed(p, q, support, h):
    """The dense target: p on the support, the teacher's mass outside it spread as ``q^b`` there, renormalised,
    with b found by bisection (200 halvings of [e^-8, e^8]) so that its entropy is ``h``."""
    rows = []
    for i in range(p.shape[0]):
        s = q[i][~support[i]].log()
        lo, hi = -8.0, 8.0
        for _ in range(200):
            mid = (lo + hi) / 2
            r = torch.softmax(math.exp(mid) * s, 0)
            lo, hi = (mid, hi) if -(r * r.log()).sum() > h[i] else (lo, mid)
        row = torch.where(support[i], p[i], 0.0)
        row[~support[i]] = p[i][~support[i]].sum() * torch.softmax(math.exp(lo) * s, 0)
        rows.append(row)
    return torch.stack(rows)


def test_the_tail_entropy_is_the_teachers_outside_the_entries():
    """``SparseTargets.tail_entropy`` from the exact entropy and the entries against the dense distribution's; NaN
    where the mass outside is so small (here ~1e-13) that the values' rounding, divided by it, swamps it."""
    gen = torch.Generator().manual_seed(21)
    zt = logits(gen, 6, 30)
    zt[5, 0] = 40.0  # one id holds all but ~1e-13 of the mass
    targets, support = sparse_targets(zt, torch.tensor([1, 3, 5, 7, 2, 1]), 7, gen=gen)
    got = with_entropy(targets, zt).tail_entropy()
    want = ref_tail_entropy(torch.softmax(zt, -1), support)
    torch.testing.assert_close(got[:5], want[:5], rtol=0, atol=1e-9)
    assert torch.isnan(got[5])
    targets.entropy = None
    with pytest.raises(InvalidInputError, match="needs targets.entropy"):
        targets.tail_entropy()


def test_the_tail_entropy_of_quantised_entries_is_within_its_bound_or_undetermined():
    """qdelta entries (rounded to STEP): where ``tail_entropy`` gives a number it is within ``max_error`` of the dense
    one; it gives none where the mass outside is small (the rounding, divided by m, could exceed that), and the
    worst rows it does give miss by more than the exact codec's rounding."""
    from logitstore.codec import Codec

    gen = torch.Generator().manual_seed(26)
    N, V, K = 400, 60, 6
    zt = logits(gen, N, V, 2.5)
    targets, support = sparse_targets(zt, torch.randint(1, K + 1, (N,), generator=gen), K, gen=gen, quantise=True)
    with_entropy(targets, zt).codec = Codec(values="qdelta", logprob_step=STEP)
    want = ref_tail_entropy(torch.softmax(zt, -1), support)
    m = targets.tail_mass
    for max_error in (0.25, 0.05):
        got = targets.tail_entropy(max_error=max_error)
        ok = torch.isfinite(got)
        assert (got[ok] - want[ok]).abs().max() <= max_error
        assert 0.2 * N < int(ok.sum()) < N and not ok[m < 0.02].any()
    assert (got[ok] - want[ok]).abs().max() > 1e-4


@pytest.mark.parametrize("chunk", [None, 2, 64])  # None: student_view_from_logits
def test_the_completed_forward_kl_equals_a_dense_reference(chunk):
    """Value and gradient against KL(t || q) with the dense target ``ref_completed`` held fixed; padded columns,
    supports of different sizes, and the chunked view."""
    gen = torch.Generator().manual_seed(22)
    N, V, K, H = 7, 40, 6, 5
    zt = logits(gen, N, V)
    targets, support = sparse_targets(zt, torch.tensor([1, 2, 6, 3, 5, 6, 4]), K, gen=gen)
    with_entropy(targets, zt)
    head = torch.nn.Linear(H, V, dtype=F64)
    hidden = torch.randn(N, H, generator=gen, dtype=F64) * 2
    tt = targets.tail_entropy()
    if chunk is None:
        zs = head(hidden)
        view = SV.student_view_from_logits(zs, targets.ids, targets.labels, tail_target=tt, valid=targets.valid)
    else:
        view = SV.student_view(hidden, head, targets.ids, targets.labels, chunk_size=chunk, tail_target=tt,
                               valid=targets.valid)
    got = L.Objective("forward_kl", tail="entropy").kd(view, targets)
    g_got = torch.autograd.grad(got.sum(), head.weight)[0]
    zs = head(hidden)
    q = torch.softmax(zs, -1)
    # the target's tail has the teacher's entropy there, to completed_tail's tolerance (1e-9 nats in float64); the
    # reference target is built at the entropy reached
    assert (view.tail_h - ref_tail_entropy(torch.softmax(zt, -1), support)).abs().max() <= 1e-9
    t = ref_completed(torch.softmax(zt, -1), q.detach(), support, view.tail_h.detach())
    want = ref_kl(t, q)
    g_want = torch.autograd.grad(want.sum(), head.weight)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-8)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-8)
    # the loss adds m KL(r || q_out) to the buckets' KL: above it wherever the tail is not negligible
    bucket_kl = ref_kl(coarse(torch.softmax(zt, -1), targets, support), coarse(q, targets, support))
    assert (want >= bucket_kl - 1e-12).all() and (want > bucket_kl + 1e-6)[targets.tail_mass > 0.05].all()


def test_the_completed_tail_is_the_teacher_where_the_teachers_tail_is_a_power_of_the_students():
    """A teacher whose tail is ``q^2`` renormalised (and exact entries elsewhere): the completed target is the
    teacher itself, so the loss is the full-vocabulary KL(p || q), value and gradient; at q = p it is 0 with
    gradient 0."""
    gen = torch.Generator().manual_seed(23)
    N, V, K = 5, 30, 4
    zs = logits(gen, N, V, 1.0).requires_grad_()
    zt = 2 * zs.detach().clone()
    zt.scatter_(1, torch.randint(0, V, (N, K), generator=gen), torch.randn(N, K, generator=gen, dtype=F64) + 8)
    targets, _ = sparse_targets(zt, torch.full((N,), K), K, gen=gen)
    with_entropy(targets, zt)
    for student, want in ((zs, ref_kl(torch.softmax(zt, -1), torch.softmax(zs, -1))), (zt.clone().requires_grad_(),
                                                                                    torch.zeros(N, dtype=F64))):
        view = SV.student_view_from_logits(student, targets.ids, targets.labels, tail_target=targets.tail_entropy(),
                                           valid=targets.valid)
        got = L.Objective("forward_kl", tail="entropy").kd(view, targets)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
        (g,) = torch.autograd.grad(got.sum(), student)
        g_want = torch.softmax(student.detach(), -1) - torch.softmax(zt, -1)
        torch.testing.assert_close(g, g_want, rtol=0, atol=1e-9)


def test_where_the_tail_entropy_is_undetermined_the_completed_loss_is_the_other_buckets():
    gen = torch.Generator().manual_seed(24)
    zt, zs = logits(gen, 4, 20), logits(gen, 4, 20).requires_grad_()
    targets, _ = sparse_targets(zt, torch.tensor([2, 3, 4, 5]), 5, gen=gen)
    nan = torch.full((4,), math.nan, dtype=F64)
    view = SV.student_view_from_logits(zs, targets.ids, targets.labels, tail_target=nan, valid=targets.valid)
    got = L.Objective("forward_kl", tail="entropy").kd(view, targets)
    (g,) = torch.autograd.grad(got.sum(), zs)
    plain = SV.student_view_from_logits(zs, targets.ids, targets.labels)
    want = L.Objective("forward_kl", tail="other").kd(plain, targets)
    (g_want,) = torch.autograd.grad(want.sum(), zs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(g, g_want, rtol=0, atol=1e-12)


def test_the_completed_tail_refusals():
    from trainers.config import TrainConfig

    TrainConfig(tail="entropy").check_rule("topk", "C", {"entropy": "quantised"})
    with pytest.raises(InvalidInputError, match="--tail entropy needs the teacher's exact entropy; C stores it as "
                                                "'bound'"):
        TrainConfig(tail="entropy").check_rule("topk", "C", {"entropy": "bound"})
    with pytest.raises(InvalidInputError, match="tail='entropy' with loss='reverse_kl'"):
        L.Objective("reverse_kl", tail="entropy")
    with pytest.raises(InvalidInputError, match="tail='entropy' with loss='forward_kl', temperature=2.0"):
        L.Objective("forward_kl", tail="entropy", temperature=2.0)
    gen = torch.Generator().manual_seed(25)
    zt = logits(gen, 3, 12)
    targets, _ = sparse_targets(zt, torch.tensor([2, 3, 4]), 4, gen=gen)
    with pytest.raises(InvalidInputError, match="needs the student's completed tail"):
        L.Objective("forward_kl", tail="entropy").kd(SV.student_view_from_logits(zt, targets.ids, targets.labels),
                                                     with_entropy(targets, zt))
    with pytest.raises(InvalidInputError, match="go together"):
        SV.student_view_from_logits(zt, targets.ids, targets.labels, tail_target=torch.zeros(3, dtype=F64))


# ---------------------------------------------------------------- sampled estimator


def _sampled_case(M, V, D, seed, with_logprobs=True):
    gen = torch.Generator().manual_seed(seed)
    zt, zs = logits(gen, 1, V, 1.5)[0], logits(gen, 1, V, 1.5)[0]
    lp = torch.log_softmax(zt, -1)
    draws = torch.multinomial(lp.exp().expand(M, V), D, replacement=True, generator=gen)
    full = torch.zeros(M, V, dtype=F64).scatter_add_(1, draws, torch.ones(M, D, dtype=F64))
    ids = torch.argsort(full, dim=1, descending=True, stable=True)
    counts = full.gather(1, ids)
    valid = counts > 0
    logprobs = torch.where(valid, lp[ids], -math.inf) if with_logprobs else None
    tail = 1 - torch.where(valid, lp[ids].exp(), 0.0).sum(-1)
    targets = SparseTargets(ids=torch.where(valid, ids, 0), valid=valid, logprobs=logprobs, tail_mass=tail,
                              labels=torch.zeros(M, dtype=torch.long), vocab_size=V, counts=counts, draws=D)
    return zt, zs, targets


@pytest.mark.parametrize("design", ["counts", "auto"])  # auto: inclusion with logprobs, counts without
@pytest.mark.parametrize("with_logprobs", [True, False])
def test_sampled_estimator_unbiased(with_logprobs, design):
    M, V, D = 4000, 8, 16
    zt, zs, targets = _sampled_case(M, V, D, seed=6, with_logprobs=with_logprobs)
    p = torch.softmax(zt, -1)
    z0 = zs.clone().requires_grad_()
    dense = ref_kl(p, torch.softmax(z0, -1))
    (g_ref,) = torch.autograd.grad(dense, z0)
    z = zs.expand(M, V).clone().requires_grad_()
    view = SV.student_view_from_logits(z, targets.ids, targets.labels)
    est = L.sampled_forward_kl(view, targets, design=design)
    est.sum().backward()  # z.grad[i] is row i's gradient
    mean, se = z.grad.mean(0), z.grad.std(0) / math.sqrt(M)
    assert ((mean - g_ref).abs() <= 5 * se + 1e-12).all(), (mean, g_ref, se)
    entropy = -(p * p.log()).sum()
    want = dense.detach() + (0.0 if with_logprobs else entropy)
    assert abs(est.mean() - want) <= 5 * est.std() / math.sqrt(M)
    if with_logprobs:  # the check has power: the support-renormalised KL is biased and is caught
        z.grad = None
        view = SV.student_view_from_logits(z, targets.ids, targets.labels)
        L.forward_kl(*L.buckets(view, targets, tail="renormalize")).sum().backward()
        biased, bse = z.grad.mean(0), z.grad.std(0) / math.sqrt(M)
        assert ((biased - g_ref).abs() > 5 * bse).any()


def test_sampled_estimator_refusals():
    _, zs, targets = _sampled_case(5, 6, 4, seed=7)
    view = SV.student_view_from_logits(zs.expand(5, 6), targets.ids, targets.labels)
    with pytest.raises(InvalidInputError, match="temperature=2.0"):
        L.sampled_forward_kl(view, targets, temperature=2.0)
    targets.counts = None
    with pytest.raises(InvalidInputError, match="needs draws"):
        L.sampled_forward_kl(view, targets)
    targets.logprobs = None
    with pytest.raises(InvalidInputError, match="only sampled ids and counts"):
        L.buckets(view, targets)


# ---------------------------------------------------------------- reduce


def test_reduce_ignores_zero_weight_positions():
    x = torch.tensor([1.0, math.inf, 2.0, math.nan, 3.0, -math.inf], requires_grad=True)
    w = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.5, -1.0])
    out = L.reduce(x, w)
    out.backward()
    assert out.item() == pytest.approx((1 + 4 + 1.5) / 3.5, rel=1e-6)
    torch.testing.assert_close(x.grad, torch.tensor([1, 0, 2, 0, 0.5, 0]) / 3.5)
    x.grad = None
    zero = L.reduce(x, torch.zeros(6))
    zero.backward()
    assert zero.item() == 0.0 and (x.grad == 0).all()
    with pytest.raises(InvalidInputError, match=r"weight \(5,\)"):
        L.reduce(x, torch.ones(5))


# ---------------------------------------------------------------- objective


def _full_case(seed, N=8, V=10):
    gen = torch.Generator().manual_seed(seed)
    zt, zs = logits(gen, N, V), logits(gen, N, V).requires_grad_()
    targets, _ = sparse_targets(zt, torch.full((N,), V), V, gen=gen)
    w = torch.rand(N, generator=gen, dtype=F64) * (torch.arange(N) % 3 != 0)
    return zt, zs, targets, w


def _wmean(x, w):
    return (x * w).sum() / w.sum()


def test_objective_mixing_matches_hand_formula():
    zt, zs, targets, w = _full_case(8)
    tau, lam = 2.0, 0.3
    obj = L.Objective("forward_kl", temperature=tau, ce_weight=lam)
    loss, metrics = obj(SV.student_view_from_logits(zs, targets.ids, targets.labels, temperature=tau), targets, w)
    kl = ref_kl(torch.softmax(zt / tau, -1), torch.softmax(zs / tau, -1))
    ce = -torch.log_softmax(zs, -1)[torch.arange(8), targets.labels]
    want = _wmean((1 - lam) * tau**2 * kl + lam * ce, w)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-10)
    assert metrics["loss"] == pytest.approx(want.item(), abs=1e-10)
    assert metrics["kd"] == pytest.approx(_wmean(kl, w).item(), abs=1e-10)
    assert metrics["ce"] == pytest.approx(_wmean(ce, w).item(), abs=1e-10)
    # per-position coefficients; kd metric over the positions with kd_coef > 0
    kc, cc = torch.tensor([0, 1, 0.5, 2, 0, 1, 1, 0.25], dtype=F64), torch.linspace(0, 1, 8, dtype=F64)
    loss, metrics = obj(SV.student_view_from_logits(zs, targets.ids, targets.labels, temperature=tau), targets, w,
                        kd_coef=kc, ce_coef=cc)
    torch.testing.assert_close(loss, _wmean(kc * tau**2 * kl + cc * ce, w), rtol=0, atol=1e-10)
    assert metrics["kd"] == pytest.approx(_wmean(kl, w * (kc > 0)).item(), abs=1e-10)


def test_objective_zero_coefficient_drops_infinite_terms_and_checks_shapes():
    """ce_weight 0: a label the student rules out (logit -inf, CE = inf) leaves loss and gradient finite."""
    _, zs, targets, w = _full_case(13)
    z = zs.detach().clone()
    z[0, targets.labels[0]] = -math.inf
    targets.valid[0] = targets.ids[0] != targets.labels[0]  # the teacher's support leaves the label out
    targets.logprobs[0] = torch.where(targets.valid[0], targets.logprobs[0], -math.inf)
    targets.tail_mass[0] = 1 - targets.logprobs[0].exp().sum()
    z.requires_grad_()
    w = torch.ones(8, dtype=F64)
    loss, metrics = L.Objective("forward_kl")(SV.student_view_from_logits(z, targets.ids, targets.labels), targets, w)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and metrics["ce"] == math.inf
    with pytest.raises(InvalidInputError, match=r"weight has shape \(7,\)"):
        L.Objective("ce")(SV.student_view_from_logits(zs, targets.ids, targets.labels), targets, w[:7])
    with pytest.raises(InvalidInputError, match=r"kd_coef has shape \(2,\)"):
        L.Objective("tvd")(SV.student_view_from_logits(zs, targets.ids, targets.labels), targets, w, torch.ones(2))


def test_objective_ce_without_logprobs():
    _, zs, targets, w = _full_case(9)
    targets.logprobs = None
    obj = L.Objective("ce", ce_weight=0.0)
    assert not obj.needs_logprobs and not obj.needs_entropy
    loss, metrics = obj(SV.student_view_from_logits(zs, targets.ids, targets.labels), targets, w)
    ce = -torch.log_softmax(zs, -1)[torch.arange(8), targets.labels]
    torch.testing.assert_close(loss, _wmean(ce, w), rtol=0, atol=1e-12)
    assert "kd" not in metrics and metrics["ce"] == pytest.approx(_wmean(ce, w).item(), abs=1e-12)
    with pytest.raises(InvalidInputError, match="only sampled ids and counts"):
        L.Objective("forward_kl")(SV.student_view_from_logits(zs, targets.ids, targets.labels), targets, w)


def test_objective_sampled_matches_hand_formula():
    """Including a cache capped at k = 2 < draws, whose counts sum to less than D."""
    zt, zs, targets = _sampled_case(6, 9, 5, seed=10)
    targets = SparseTargets(**{**vars(targets), **{f: getattr(targets, f)[:, :2] for f in ("ids", "valid",
                                                                                           "logprobs", "counts")}})
    assert (targets.counts.sum(-1) < 5).any()
    obj = L.Objective("forward_kl", tail="sampled", estimator="counts")
    assert not obj.needs_logprobs
    z = zs.expand(6, 9)
    w = torch.ones(6, dtype=F64)
    loss, _ = obj(SV.student_view_from_logits(z, targets.ids, targets.labels), targets, w)
    lq, lp = torch.log_softmax(z, -1), torch.log_softmax(zt, -1)
    per = (targets.counts / 5 * torch.where(targets.valid, lp[targets.ids] - lq.gather(1, targets.ids), 0)).sum(-1)
    torch.testing.assert_close(loss, per.mean(), rtol=0, atol=1e-12)
    # a cap that left draws out: auto weighs by counts, and the inclusion estimator is refused
    targets.capped = True
    auto, _ = L.Objective("forward_kl", tail="sampled")(SV.student_view_from_logits(z, targets.ids, targets.labels),
                                                        targets, w)
    torch.testing.assert_close(auto, per.mean(), rtol=0, atol=1e-12)
    with pytest.raises(InvalidInputError, match="needs every draw kept"):
        L.Objective("forward_kl", tail="sampled", estimator="inclusion")(
            SV.student_view_from_logits(z, targets.ids, targets.labels), targets, w)


@pytest.mark.parametrize("kwargs, match", [
    ({"loss": "kl"}, "loss='kl'.*forward_kl, reverse_kl"),
    ({"loss": "forward_kl", "tail": "top"}, "tail='top'.*other, renormalize, sampled"),
    ({"loss": "reverse_kl", "tail": "sampled"}, "only for loss .forward_kl. at temperature 1"),
    ({"loss": "ce", "tail": "sampled"}, "only for loss .forward_kl. at temperature 1"),
    ({"loss": "jsd", "tail": "sampled_label"}, "only for loss .forward_kl. at temperature 1"),
    ({"loss": "forward_kl", "tail": "sampled", "temperature": 2.0}, "temperature=2.0: that target exists only"),
    ({"loss": "forward_kl", "temperature": 0.0}, "temperature=0.0"),
    ({"loss": "forward_kl", "temperature": math.nan}, "temperature=nan"),
    ({"loss": "forward_kl", "ce_weight": 1.5}, r"ce_weight=1.5.*\[0.0, 1.0\]"),
    ({"loss": "jsd", "beta": 1.0}, r"beta=1.0.*\(0.0, 1.0\)"),
    ({"loss": "skew_kl", "alpha": 1.0}, r"alpha=1.0.*\[0.0, 1.0\)"),
    ({"loss": "taid", "taid_start": 0.8, "taid_end": 0.5}, "taid_end=0.5"),
    ({"loss": "taid", "total_steps": 0}, "total_steps=0"),
    ({"loss": "forward_kl", "ce_weight": "x"}, "ce_weight='x' is not a number"),
])
def test_objective_rejects_bad_arguments(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        L.Objective(**kwargs)


def test_divergence_parameters_are_checked():
    x, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    for fn, kw, match in ((L.jsd, {"beta": 0.0}, "beta=0.0"), (L.skew_rkl, {"alpha": -0.1}, "alpha=-0.1"),
                          (L.taid, {"t": 1.2}, "t=1.2")):
        with pytest.raises(InvalidInputError, match=match):
            fn(x, x, m, **kw)


def _taid_reference(losses, start, end, alpha, beta, total):
    """The documented recurrence, step by step."""
    t, mom, prev, out = start, 0.0, None, []
    for step, cur in enumerate(losses, 1):
        lin = start + (end - start) * (min(step / total, 1.0) if total else 0.0)
        if prev is None:
            t = max(lin, t)
        else:
            mom = beta * mom + (1 - beta) * (prev - cur) / (abs(prev) + 1e-8)
            t = min(end, max(lin, t + alpha / (1 + math.exp(-mom)) * (1 - t)))
        prev = cur
        out.append(t)
    return out


@pytest.mark.parametrize("total", [None, 150])
def test_taid_schedule(total):
    start, end = 0.4, 0.9
    obj = L.Objective("taid", taid_start=start, taid_end=end, taid_alpha=0.02, total_steps=total)
    losses = [2.0 * 0.98**s + 0.05 * math.sin(s) for s in range(200)]
    ts = []
    for step, x in enumerate(losses, 1):
        obj.step_end(x, step)
        ts.append(obj.taid_t)
    assert ts == pytest.approx(_taid_reference(losses, start, end, 0.02, 0.99, total), abs=1e-12)
    assert all(start <= t <= end for t in ts) and all(a <= b for a, b in itertools.pairwise(ts))
    assert ts[-1] > start + 0.2
    if total:
        assert all(t >= start + (end - start) * min(s / total, 1) - 1e-12 for s, t in enumerate(ts, 1))
        assert ts[-1] == end
    L.Objective("forward_kl").step_end(1.0, 1)  # a no-op elsewhere


def test_taid_update_survives_extreme_losses():
    obj = L.Objective("taid", taid_alpha=0.5)
    for step, x in enumerate([0.0, 1e30, math.nan, 0.0, math.inf, 1e-30], 1):
        obj.step_end(x, step)
        assert 0.4 <= obj.taid_t <= 1.0 and math.isfinite(obj.state_dict()["momentum"])
    assert obj.state_dict()["prev_loss"] == 1e-30  # the non-finite values were skipped


def test_taid_state_round_trip_and_loss_uses_t():
    kw = {"taid_alpha": 0.05, "total_steps": 1000}
    a = L.Objective("taid", **kw)
    for step in range(1, 31):
        a.step_end(3.0 / step, step)
    b, fresh = L.Objective("taid", **kw), L.Objective("taid", **kw)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for o in (a, b, fresh):
        o.step_end(0.09, 31)
    assert a.taid_t == b.taid_t != fresh.taid_t
    with pytest.raises(InvalidInputError, match="keys"):
        b.load_state_dict({"t": 0.5})
    zt, zs, targets, w = _full_case(11)
    loss, metrics = a(SV.student_view_from_logits(zs, targets.ids, targets.labels), targets, w)
    t = metrics["taid_t"]
    assert t == a.taid_t > 0.4
    p, q = torch.softmax(zt, -1), torch.softmax(zs, -1)
    pt = q.detach() ** (1 - t) * p**t
    torch.testing.assert_close(loss, _wmean(ref_kl(pt / pt.sum(-1, keepdim=True), q), w), rtol=0, atol=1e-10)


@pytest.mark.parametrize("tail", ["other", "renormalize", "sampled"])
@pytest.mark.parametrize("loss", L.LOSSES)
def test_gradients_finite_on_degenerate_rows(loss, tail):
    """float32, quantised; rows with one valid entry and tail mass 0, rows covering the vocabulary."""
    if tail == "sampled" and loss != "forward_kl":
        return
    gen = torch.Generator().manual_seed(12)
    N, V, K = 6, 12, 12
    zt = logits(gen, N, V, 8.0)
    targets, _ = sparse_targets(zt, torch.tensor([1, 1, 12, 3, 12, 2]), K, gen=gen, logprob_dtype=torch.float32,
                                quantise=True)
    targets.tail_mass[:2] = 0.0
    targets.counts = torch.where(targets.valid, torch.randint(1, 4, (N, K), generator=gen), 0).float()
    targets.draws = int(targets.counts.sum(-1).max())
    zs = (torch.randn(N, V, generator=gen) * 8).requires_grad_()
    tau = 1.0 if tail == "sampled" else 2.0
    obj = L.Objective(loss, tail=tail, temperature=tau, ce_weight=0.1)
    out, metrics = obj(SV.student_view_from_logits(zs, targets.ids, targets.labels, temperature=tau), targets,
                       torch.ones(N))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0
    assert all(math.isfinite(v) for v in metrics.values())
