"""The estimators of caches with draws: unbiased in value and gradient, against the full-vocabulary reference.

Draws come from the builder's own extraction (``builders.extract``) of one teacher position
repeated M times, so every row is an independent draw of the same rule; the cached estimate
``p_hat`` (``SparseTargets.estimate``) and the sampled forward-KL gradient, averaged over the M
rows, must equal the teacher distribution p and the full-KD gradient ``q - p`` within a few
standard errors of the mean (Monte Carlo). The references are plain float64 torch over the full
vocabulary.
"""

from __future__ import annotations

import math

import pytest
import torch

from builders.extract import extract
from logitstore.errors import InvalidInputError
from logitstore.head import Head
from logitstore.rules import Sampled, TopK, TopKTail
from trainers import losses as L
from trainers.targets import SparseTargets
from trainers.view import student_view_from_logits

V, H, M = 40, 8, 6000
FP32 = 2e-6  # the extraction runs in float32; the references in float64 (deterministic parts differ by this)
RULES = [TopKTail(4, 8), TopKTail(4, 8, 2.0), TopKTail(10, 4, 0.7), Sampled(12), Sampled(12, proposal_temperature=1.8),
         TopKTail(4, 8, 2.0, systematic=True), Sampled(12, proposal_temperature=1.8, systematic=True)]


def rule_id(r) -> str:
    return f"{r.name}-{r.draws}-T{r.proposal_temperature}" + ("-sys" if r.systematic else "")


def teacher_case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H, generator=gen) * 0.5  # every token likely enough to be drawn among M draws
    h = torch.randn(1, H, generator=gen)
    lp = torch.log_softmax((h.double() @ w.double().T)[0], -1)  # the float64 reference distribution
    return Head(weight=w), h.repeat(M, 1), lp


def targets_from(res: dict, rule, labels: torch.Tensor) -> SparseTargets:
    t = lambda name: None if res.get(name) is None else torch.as_tensor(res[name])  # noqa: E731
    k = res["ids"].shape[1]
    valid = torch.arange(k)[None, :] < t("n_entries")[:, None]
    tail = {}
    if isinstance(rule, TopKTail):
        u = res["tail_ids"].shape[1]
        tail = dict(tail_ids=t("tail_ids").long(), tail_valid=torch.arange(u)[None, :] < t("n_tail")[:, None],
                    tail_logprobs=t("tail_logprobs").double(), tail_counts=t("tail_counts").double())
    return SparseTargets(ids=t("ids").long(), valid=valid, logprobs=t("logprobs").double(),
                         tail_mass=t("tail_mass").double(), labels=labels, vocab_size=V,
                         counts=None if res.get("counts") is None else t("counts").double(), draws=rule.draws,
                         label_logprob=t("label_logprob").double(), proposal_temperature=rule.proposal_temperature,
                         proposal_log_norm=None if not rule.tempered else t("proposal_log_norm").double(),
                         systematic=rule.systematic, **tail)


def dense(targets: SparseTargets, weights: torch.Tensor) -> torch.Tensor:
    """Per-row estimates scattered onto the full vocabulary: [M, V]."""
    ids, valid, _ = targets.support()
    return torch.zeros(ids.shape[0], V, dtype=torch.float64).scatter_add_(1, ids.clamp(min=0),
                                                                           torch.where(valid, weights, 0.0))


@pytest.mark.parametrize("design", ["counts", "auto"])
@pytest.mark.parametrize("rule", RULES, ids=rule_id)
def test_the_estimate_is_unbiased_for_the_teacher_distribution(rule, design):
    head, h, lp = teacher_case(3)
    labels = torch.zeros(M, dtype=torch.long)
    res = extract(h, head, labels, rule, chunk_rows=700, generator=torch.Generator().manual_seed(9))
    t = targets_from(res, rule, labels)
    est = dense(t, t.estimate(torch.float64, design))  # [M, V]
    mean, se = est.mean(0), est.std(0) / math.sqrt(M)
    p = lp.exp()
    assert ((mean - p).abs() <= 5 * se + FP32).all(), ((mean - p).abs() - 5 * se).max()
    # and the total: E[sum p_hat] = 1
    tot = est.sum(1)
    assert abs(float(tot.mean()) - 1.0) < 5 * float(tot.std()) / math.sqrt(M) + 1e-6


@pytest.mark.parametrize("design", ["counts", "auto"])
@pytest.mark.parametrize("rule", RULES, ids=rule_id)
def test_the_sampled_forward_kl_is_unbiased_in_value_and_gradient(rule, design):
    head, h, lp = teacher_case(4)
    labels = torch.zeros(M, dtype=torch.long)
    res = extract(h, head, labels, rule, chunk_rows=700, generator=torch.Generator().manual_seed(10))
    t = targets_from(res, rule, labels)
    zs = torch.randn(1, V, generator=torch.Generator().manual_seed(2), dtype=torch.float64).repeat(M, 1)
    z = zs.clone().requires_grad_(True)
    view = student_view_from_logits(z, t.support()[0], t.labels)
    value = L.sampled_forward_kl(view, t, design=design)
    value.sum().backward()
    value = value.detach()
    ls = torch.log_softmax(zs[0], -1)
    p = lp.exp()
    kl = float((p * (lp - ls)).sum())  # the full-vocabulary references
    g_ref = torch.softmax(zs[0], -1) - p
    assert abs(float(value.mean()) - kl) < 5 * float(value.std()) / math.sqrt(M) + 1e-9
    g, se = z.grad.mean(0), z.grad.std(0) / math.sqrt(M)
    assert ((g - g_ref).abs() <= 5 * se + FP32).all(), ((g - g_ref).abs() - 5 * se).max()


@pytest.mark.parametrize("rank", [0, 12], ids=["label-in-head", "label-in-tail"])
@pytest.mark.parametrize("rule", RULES, ids=rule_id)
def test_the_exact_label_estimator_is_unbiased_and_steadier_on_the_label(rule, rank):
    """Tail ``sampled_label``: the label's draws replaced by its exact target; unbiased in value and gradient against
    the full-vocabulary reference, and (label in the tail) the label's gradient varies less than the plain one's."""
    head, h, lp = teacher_case(4)
    label = int(torch.argsort(lp, descending=True)[rank])
    labels = torch.full((M,), label, dtype=torch.long)
    res = extract(h, head, labels, rule, chunk_rows=700, generator=torch.Generator().manual_seed(11))
    t = targets_from(res, rule, labels)
    torch.testing.assert_close(t.label_logprob, lp[label].expand(M), atol=1e-5, rtol=0)
    zs = torch.randn(1, V, generator=torch.Generator().manual_seed(2), dtype=torch.float64).repeat(M, 1)
    grads = {}
    for exact in (False, True):
        z = zs.clone().requires_grad_(True)
        view = student_view_from_logits(z, t.support()[0], t.labels)
        value = L.sampled_forward_kl(view, t, exact_label=exact, design="counts")
        value.sum().backward()
        grads[exact] = z.grad
    value = value.detach()
    ls = torch.log_softmax(zs[0], -1)
    p = lp.exp()
    assert abs(float(value.mean()) - float((p * (lp - ls)).sum())) < 5 * float(value.std()) / math.sqrt(M) + 1e-9
    g, se = grads[True].mean(0), grads[True].std(0) / math.sqrt(M)
    g_ref = torch.softmax(zs[0], -1) - p
    assert ((g - g_ref).abs() <= 5 * se + FP32).all(), ((g - g_ref).abs() - 5 * se).max()
    w, p_lab = t.estimate_exact_label(torch.float64, "counts")
    in_head = bool((t.ids[0][t.valid[0]] == label).any()) if isinstance(rule, TopKTail) else False
    torch.testing.assert_close(p_lab, torch.zeros(M, dtype=torch.float64) if in_head else p[label].expand(M),
                               atol=1e-5, rtol=0)  # the exact target where the head does not hold the label
    ids, valid, _ = t.support()
    k = t.ids.shape[1] if isinstance(rule, TopKTail) else 0
    assert not (w[:, k:][(ids[:, k:] == label) & valid[:, k:]]).any()  # the label's draws count 0
    if not in_head:
        assert grads[True][:, label].std() < 0.5 * grads[False][:, label].std()


@pytest.mark.parametrize("rule", RULES, ids=rule_id)
def test_the_inclusion_estimator_is_unbiased_and_never_more_variable_per_token(rule):
    """``design="inclusion"`` (Horvitz-Thompson, ``p_x / pi_x``, ``pi_x = 1 - (1 - q_x)^D``, or ``min(1, D q_x)``
    for systematic draws): unbiased for p, and its forward-KL
    value and gradient for the full-vocabulary ones; per token its spread is at most the counts estimator's (it is
    that estimator averaged over the draws that give each token the same drawn-or-not), and below it in total."""
    head, h, lp = teacher_case(3)
    labels = torch.zeros(M, dtype=torch.long)
    res = extract(h, head, labels, rule, chunk_rows=700, generator=torch.Generator().manual_seed(12))
    t = targets_from(res, rule, labels)
    p = lp.exp()
    est = dense(t, t.estimate(torch.float64, design="inclusion"))
    mean, se = est.mean(0), est.std(0) / math.sqrt(M)
    assert ((mean - p).abs() <= 5 * se + FP32).all(), ((mean - p).abs() - 5 * se).max()
    # the reference inclusion probability of one token, from the proposal over the full vocabulary in float64
    tail = torch.ones(V, dtype=torch.bool)
    if isinstance(rule, TopKTail):
        tail[torch.argsort(lp, descending=True)[:rule.k]] = False
    q = torch.where(tail, torch.exp(lp / rule.proposal_temperature), 0.0)
    q = q / q.sum()
    x = int(torch.argsort(torch.where(tail, lp, -math.inf), descending=True)[2])
    drawn = est[:, x] > 0
    pi = min(1.0, rule.draws * float(q[x])) if rule.systematic else 1 - (1 - q[x]) ** rule.draws
    torch.testing.assert_close(est[drawn, x], (p[x] / pi).expand(int(drawn.sum())), atol=1e-5, rtol=1e-4)
    counts = dense(t, t.estimate(torch.float64, "counts"))
    sd_i, sd_c = est.std(0), counts.std(0)
    assert (sd_i <= sd_c * 1.1 + FP32).all(), (sd_i - sd_c * 1.1).max()  # 1.1: the spread of M-draw sd estimates
    # independent draws: strictly steadier in total; systematic ones: equal where D q < 1 (a count is 0 or 1 there)
    assert float(est.var(0).sum()) < (1 + 1e-9 if rule.systematic else 0.95) * float(counts.var(0).sum())
    zs = torch.randn(1, V, generator=torch.Generator().manual_seed(2), dtype=torch.float64).repeat(M, 1)
    for exact_label in (False, True):
        z = zs.clone().requires_grad_(True)
        view = student_view_from_logits(z, t.support()[0], t.labels)
        value = L.sampled_forward_kl(view, t, exact_label=exact_label, design="inclusion")
        value.sum().backward()
        value = value.detach()
        ls = torch.log_softmax(zs[0], -1)
        assert abs(float(value.mean()) - float((p * (lp - ls)).sum())) < 5 * float(value.std()) / math.sqrt(M) + 1e-9
        g, se = z.grad.mean(0), z.grad.std(0) / math.sqrt(M)
        g_ref = torch.softmax(zs[0], -1) - p
        assert ((g - g_ref).abs() <= 5 * se + FP32).all(), ((g - g_ref).abs() - 5 * se).max()


def test_the_inclusion_estimator_needs_logprobs_and_a_known_design():
    t = SparseTargets(ids=torch.tensor([[1, 2]]), valid=torch.ones(1, 2, dtype=torch.bool), logprobs=None,
                      tail_mass=torch.zeros(1), labels=torch.tensor([1]), vocab_size=4,
                      counts=torch.tensor([[3.0, 1.0]]), draws=4)
    for design in ("counts", "auto"):  # auto: counts, as there are no logprobs to weigh by inclusion
        torch.testing.assert_close(t.estimate(torch.float64, design), torch.tensor([[0.75, 0.25]], dtype=torch.float64))
    with pytest.raises(InvalidInputError, match="inclusion-probability estimator needs the draws' logprobs"):
        t.estimate(design="inclusion")
    with pytest.raises(InvalidInputError, match="design='hh' is not allowed; it must be 'auto', 'counts' or"):
        t.estimate(design="hh")


def test_a_top_k_bucket_is_biased_where_the_tail_estimator_is_not():
    """The check above can fail: the top-k "other" bucket's gradient is off by many standard errors."""
    head, h, lp = teacher_case(4)
    labels = torch.zeros(M, dtype=torch.long)
    res = extract(h, head, labels, TopK(4), chunk_rows=700)
    t = targets_from(res, TopK(4), labels)
    zs = torch.randn(1, V, generator=torch.Generator().manual_seed(2), dtype=torch.float64).repeat(M, 1)
    z = zs.clone().requires_grad_(True)
    view = student_view_from_logits(z, t.support()[0], t.labels)
    L.forward_kl(*L.buckets(view, t)).sum().backward()
    g_ref = torch.softmax(zs[0], -1) - lp.exp()
    assert ((z.grad[0] - g_ref).abs() > 1e-3).any()  # deterministic and biased: no draws to average away


def test_tail_draws_are_outside_the_head_with_counts_summing_to_the_draws():
    head, h, lp = teacher_case(5)
    rule = TopKTail(6, 10, 1.5)
    res = extract(h[:500], head, torch.zeros(500, dtype=torch.long), rule, chunk_rows=64,
                  generator=torch.Generator().manual_seed(1))
    top = set(torch.argsort(lp, descending=True)[:6].tolist())
    for i in range(500):
        n = int(res["n_tail"][i])
        assert n >= 1 and int(res["tail_counts"][i, :n].sum()) == 10 and (res["tail_counts"][i, n:] == 0).all()
        ids = res["tail_ids"][i, :n].tolist()
        assert len(set(ids)) == n and not set(ids) & top
        assert (res["tail_logprobs"][i, :n][1:] <= res["tail_logprobs"][i, :n][:-1]).all()
        torch.testing.assert_close(torch.as_tensor(res["tail_logprobs"][i, :n]).double(), lp[ids], atol=1e-5, rtol=0)
    rest = torch.ones(V, dtype=torch.bool)
    rest[list(top)] = False
    log_z = torch.logsumexp(lp[rest] / 1.5, -1)
    torch.testing.assert_close(torch.as_tensor(res["proposal_log_norm"]).double(), log_z.expand(500), atol=1e-5,
                               rtol=0)


def test_when_k_covers_the_vocabulary_the_tail_draws_nothing_and_the_estimate_is_exact():
    head, h, lp = teacher_case(6)
    rule = TopKTail(V, 5)
    res = extract(h[:20], head, torch.zeros(20, dtype=torch.long), rule, chunk_rows=8)
    assert (res["n_tail"] == 0).all()
    t = targets_from(res, rule, torch.zeros(20, dtype=torch.long))
    for design in ("counts", "inclusion"):
        torch.testing.assert_close(dense(t, t.estimate(torch.float64, design)), lp.exp().expand(20, V), atol=1e-6,
                                   rtol=0)


def test_the_residual_target_puts_the_tail_mass_on_the_label():
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.6, 0.25, 0.1]], dtype=torch.float64))
    t = SparseTargets(ids=torch.tensor([[3, 1, 7], [2, 5, 0]]), valid=torch.ones(2, 3, dtype=torch.bool),
                      logprobs=lp, tail_mass=torch.tensor([0.2, 0.05], dtype=torch.float64),
                      labels=torch.tensor([9, 5]), vocab_size=10)
    ids, tgt, valid = t.residual(torch.float64)
    want0 = {3: 0.5, 1: 0.2, 7: 0.1, 9: 0.2}  # label 9 is outside the head: its own column
    want1 = {2: 0.6, 5: 0.25 + 0.05, 0: 0.1}  # label 5 is in the head: the mass goes to its column
    for row, want in ((0, want0), (1, want1)):
        got = {}
        for j in range(4):
            if valid[row, j]:
                got[int(ids[row, j])] = got.get(int(ids[row, j]), 0.0) + float(tgt[row, j])
        assert got == pytest.approx(want)
