"""builders.extract against a plain float64 full-vocabulary computation; chunked equals unchunked."""

import dataclasses

import numpy as np
import pytest
import torch

from builders.extract import chunk_rows_for, extract
from logitstore.head import Head
from logitstore.rules import MassTopK, Sampled, TopK, TopKTail, draw, sparsify


def setup(M=37, H=16, V=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, H, generator=g)
    head = Head(weight=torch.randn(V, H, generator=g) * 1.5, bias=torch.randn(V, generator=g))
    labels = torch.randint(0, V, (M,), generator=g)
    ref = torch.log_softmax((h.double() @ head.weight.double().T + head.bias.double()), -1).numpy()
    return h, head, labels, ref


@pytest.mark.parametrize("rule", [TopK(1), TopK(8), TopK(500), MassTopK(0.9, 40), MassTopK(0.5, 3)],
                         ids=["top1", "top8", "topV", "mass0.9", "mass0.5cap3"])
def test_extract_equals_the_plain_reference(rule):
    h, head, labels, ref = setup()
    got = extract(h, head, labels, rule, chunk_rows=5)
    want = sparsify(ref, rule)  # the store's numpy reference of the rule, on float64 logprobs
    np.testing.assert_array_equal(got["n_entries"], want.n_entries)
    valid = np.arange(got["ids"].shape[1])[None] < got["n_entries"][:, None]
    # the ids by rank: each one's float64 logprob is the reference's at that rank, so two ids whose logprobs
    # differ by less than float32 rounding may trade places (the order of such ties is the arithmetic's, not
    # the rule's), any other difference fails; no id twice in a row
    at = np.take_along_axis(ref, np.where(valid, got["ids"], 0), 1)
    np.testing.assert_allclose(at[valid], want.logprobs[valid], atol=2e-5)
    assert all(len(set(r[:n])) == n for r, n in zip(got["ids"], got["n_entries"]))
    np.testing.assert_allclose(got["logprobs"][valid], want.logprobs[valid], atol=2e-5)
    assert np.isneginf(got["logprobs"][~valid]).all()
    p = np.exp(ref)
    np.testing.assert_allclose(got["entropy"], -(p * ref).sum(-1), atol=1e-4)
    np.testing.assert_allclose(got["label_logprob"], ref[np.arange(len(ref)), labels.numpy()], atol=2e-5)
    np.testing.assert_allclose(got["tail_mass"], want.tail_mass, atol=1e-5)
    np.testing.assert_array_equal(got["argmax"], ref.argmax(-1))


@pytest.mark.parametrize("rule", [TopK(8), MassTopK(0.9, 40)], ids=["topk", "mass"])
def test_chunked_equals_unchunked(rule):
    h, head, labels, _ = setup(M=50)
    whole = extract(h, head, labels, rule, chunk_rows=50)
    for rows in (1, 7, 49):
        part = extract(h, head, labels, rule, chunk_rows=rows)
        for k in whole:  # integers exactly; floats to rounding (BLAS kernels differ with the row count)
            if whole[k] is None:
                continue
            if whole[k].dtype.kind in "iu":
                np.testing.assert_array_equal(part[k], whole[k], err_msg=f"{k} at chunk_rows={rows}")
            else:
                np.testing.assert_allclose(part[k], whole[k], atol=2e-5, err_msg=f"{k} at chunk_rows={rows}")


def test_sampled_counts_are_an_unbiased_estimate():
    h, head, labels, ref = setup(M=4, V=30)
    h = h.repeat(500, 1)  # the same 4 distributions, 500 times each
    labels = labels.repeat(500)
    got = extract(h, head, labels, Sampled(20), chunk_rows=64, generator=torch.Generator().manual_seed(1))
    V = ref.shape[1]
    for j in range(4):
        rows = np.arange(j, len(h), 4)
        est = np.zeros(V)
        for r in rows:
            n = got["n_entries"][r]
            ids, cnt, lp = got["ids"][r, :n], got["counts"][r, :n], got["logprobs"][r, :n]
            assert cnt.sum() == 20 and len(set(ids)) == n and (np.diff(lp) <= 0).all()
            np.testing.assert_allclose(lp, ref[j, ids], atol=2e-5)
            est[ids] += cnt / 20
        est /= len(rows)
        p = np.exp(ref[j])
        draws = 20 * len(rows)
        se = np.sqrt(p * (1 - p) / draws)
        # 5 standard errors, plus a few single hits where p is so small that counts are Poisson
        assert (np.abs(est - p) <= 5 * se + 3 / draws).all(), np.abs(est - p).max()


@pytest.mark.parametrize("rule", [Sampled(20, proposal_temperature=1.5, systematic=True),
                                  TopKTail(3, 12, 2.0, systematic=True)], ids=["sample", "topk_tail"])
def test_systematic_draws_hit_each_token_floor_or_ceil_of_d_q_times(rule):
    """Systematic draws: every token is drawn floor(D q) or ceil(D q) times (independent draws are not: a token with
    D q = 2.6 is drawn 0-12 times), D q on average, in the extraction and in the numpy reference alike."""
    h, head, labels, ref = setup(M=3, V=30)
    h, labels, reps = h.repeat(2000, 1), labels.repeat(2000), 2000
    got = extract(h, head, labels, rule, chunk_rows=512, generator=torch.Generator().manual_seed(3))
    tail = isinstance(rule, TopKTail)
    ids_k, cnt_k, n_k = ("tail_ids", "tail_counts", "n_tail") if tail else ("ids", "counts", "n_entries")
    d = rule.draws
    for j in range(3):
        support = np.ones(ref.shape[1], bool)
        if tail:
            support[np.argsort(-ref[j])[:rule.k]] = False
        q = np.where(support, np.exp(ref[j] / rule.proposal_temperature), 0.0)
        q /= q.sum()
        rows = np.arange(j, len(h), 3)
        counts = np.zeros((len(rows), ref.shape[1]))
        for i, r in enumerate(rows):
            n = got[n_k][r]
            counts[i, got[ids_k][r, :n]] = got[cnt_k][r, :n]
        assert (counts.sum(1) == d).all()
        lo, hi = np.floor(d * q - 1e-4), np.ceil(d * q + 1e-4)
        assert ((counts >= lo) & (counts <= hi)).all(), np.abs(counts - d * q).max()
        se = np.sqrt(0.25 / reps)  # a count in {floor, ceil} varies by at most 1/2
        assert (np.abs(counts.mean(0) - d * q) <= 5 * se + 1e-3).all(), np.abs(counts.mean(0) - d * q).max()
        # the numpy reference makes the same design
        lp = np.repeat(ref[j:j + 1], 500, 0)
        drawn, _ = draw(lp, np.repeat(support[None], 500, 0), d, rule.proposal_temperature,
                        np.random.default_rng(0), systematic=True)
        ref_counts = np.stack([np.bincount(row, minlength=ref.shape[1]) for row in drawn])
        assert ((ref_counts >= lo) & (ref_counts <= hi)).all()
        assert (np.abs(ref_counts.mean(0) - d * q) <= 5 * np.sqrt(0.25 / 500) + 1e-3).all()
    # independent draws of the same rule break the floor/ceil band: the check above can fail
    indep = extract(h, head, labels, dataclasses.replace(rule, systematic=False), chunk_rows=512,
                    generator=torch.Generator().manual_seed(3))
    spread = [int(indep[cnt_k][r, :indep[n_k][r]].max()) for r in range(0, len(h), 3)]
    assert max(spread) - min(spread) > 2


def test_empty_and_budget():
    h, head, labels, _ = setup(M=0)
    got = extract(h, head, labels, TopK(4), chunk_rows=8)
    assert got["ids"].shape == (0, 4) and got["entropy"].shape == (0,)
    assert chunk_rows_for(152_064, 96 << 20) == 82 and chunk_rows_for(10, 1) == 1


def test_post_head_transforms_and_masked_logits():
    """Softcap and scale are applied as the model defines them; -inf logits (masked vocab) give p = 0, not NaN."""
    h, head, labels, _ = setup(M=9, V=60)
    head.weight[5] = 0
    head.bias[5] = -torch.inf  # a masked token
    head.softcap, head.scale = 7.0, 0.5
    raw = h.double() @ head.weight.double().T + head.bias.double()
    ref = torch.log_softmax(torch.tanh(raw * 0.5 / 7.0) * 7.0, -1).numpy()
    got = extract(h, head, labels, TopK(60), chunk_rows=4)
    p = np.exp(ref)
    np.testing.assert_allclose(got["entropy"], -np.nansum(np.where(p > 0, p * ref, 0.0), -1), atol=1e-4)
    assert np.isfinite(got["entropy"]).all()
    np.testing.assert_allclose(np.sort(got["logprobs"], -1)[:, ::-1][:, :59], np.sort(ref, -1)[:, ::-1][:, :59],
                               atol=2e-5)
