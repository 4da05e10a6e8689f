"""Codec round trips (write -> ``logitstore.open``) against plain-numpy references, the qdelta
quantisation functions, the id map, padding, and the reference ``sparsify`` rules."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logitstore
from logitstore import Codec, InvalidInputError, MassTopK, Sampled, TopK
from logitstore import codec as C
from logitstore.verify import verify
from tests.conftest import (
    CODECS,
    DEFAULT_STEP,
    as_record,
    assert_logprobs_within_bound,
    assert_sequence_matches,
    log_softmax,
    make_sequence,
    random_logprobs,
    reference_id_map,
    write_cache,
)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------- round trips through a cache


@st.composite
def rules(draw):
    k = draw(st.integers(1, 256))
    kind = draw(st.sampled_from(["topk", "mass", "sample"]))
    if kind == "topk":
        return TopK(k)
    if kind == "mass":
        return MassTopK(draw(st.floats(0.05, 1.0)), k)
    return Sampled(draw(st.integers(1, 300)), k)


vocabs = st.one_of(st.integers(2, 64), st.integers(65, 5000), st.integers(5001, 262144), st.just(262144))


@settings(max_examples=45, **SETTINGS)
@given(
    codec_name=st.sampled_from(sorted(CODECS)),
    vocab=vocabs,
    rule=rules(),
    lengths=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    scale=st.sampled_from([0.3, 1.0, 3.0, 8.0]),
    subset=st.booleans(),
    mask_prob=st.sampled_from([0.0, 0.3, 1.0]),
    give_argmax=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip(codec_name, vocab, rule, lengths, scale, subset, mask_prob, give_argmax, seed):
    codec = CODECS[codec_name]
    rng = np.random.default_rng(seed)
    refs = [
        make_sequence(rng, vocab=vocab, n_tokens=T, rule=rule, seq_id=f"s{i}", scale=scale, subset=subset,
                      mask_prob=mask_prob, give_argmax=give_argmax, record=i, sample=i % 2)
        for i, T in enumerate(lengths)
    ]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c"
        write_cache(path, refs, vocab=vocab, rule=rule, codec=codec)
        cache = logitstore.open(path)
        assert cache.k == rule.k and len(cache) == len(refs)
        assert cache.num_positions == sum(r.n for r in refs)
        got = list(cache)
        assert [s.seq_id for s in got] == [r.seq_id for r in refs]
        for s, r in zip(got, refs):
            assert_sequence_matches(s, r, codec, rule, rule.k)
        for r in refs[::-1]:  # random access decodes the same values
            assert_sequence_matches(cache[r.seq_id], r, codec, rule, rule.k)
        # a freshly written cache is sound: verify has no false positives on any rule, vocab or codec
        assert verify(path) == []


@pytest.mark.parametrize("codec_name", sorted(CODECS))
@pytest.mark.parametrize("rule", [TopK(5), MassTopK(0.5, 5), Sampled(16, 5)], ids=["topk", "mass", "sample"])
@pytest.mark.parametrize("n_tokens,explicit", [(1, False), (1, True), (2, False), (6, True)],
                         ids=["T1", "T1-positions[]", "T2", "T6-positions[]"])
def test_zero_and_one_position_sequences(tmp_path, codec_name, rule, n_tokens, explicit):
    """T=1 has no position to cache; T=2 has one; positions=[] caches none of a longer sequence."""
    codec = CODECS[codec_name]
    vocab = 40
    rng = np.random.default_rng(n_tokens)
    ref = make_sequence(rng, vocab=vocab, n_tokens=n_tokens, rule=rule, seq_id="x", subset=False)
    kw = ref.add_kwargs()
    if explicit:  # nothing cached out of T tokens
        ref = make_sequence(rng, vocab=vocab, n_tokens=1, rule=rule, seq_id="x")
        ref.input_ids = rng.integers(0, vocab, n_tokens)
        kw = ref.add_kwargs()
        kw["positions"] = []
        assert kw["ids"].shape == (0, kw["ids"].shape[1])
    expected_n = 1 if (n_tokens == 2 and not explicit) else 0
    assert ref.n == expected_n
    with logitstore.CacheWriter(tmp_path / "c", vocab_size=vocab, rule=rule, codec=codec) as w:
        assert w.add(as_record(**kw))
    seq = logitstore.open(tmp_path / "c")["x"]
    assert seq.ids.shape == (expected_n, rule.k) and seq.logprobs.shape == (expected_n, rule.k)
    assert_sequence_matches(seq, ref, codec, rule, rule.k)
    if expected_n == 0:
        assert seq.mean_entropy is None and seq.teacher_nll is None and seq.token_accuracy is None
        assert seq.n_targets == 0
    assert verify(tmp_path / "c") == []


@pytest.mark.parametrize("step", [DEFAULT_STEP, 0.01, 0.25, 1.0])
def test_qdelta_error_bound_is_tight(tmp_path, step):
    """Through a cache: the decoded error stays within step/2 and, on a large random sample,
    comes close to it (> step/4), so a cache that used another step than it records would fail."""
    rng = np.random.default_rng(int(step * 1000))
    vocab, rule, codec = 5000, TopK(64), Codec(logprob_step=step)
    refs = [make_sequence(rng, vocab=vocab, n_tokens=60, rule=rule, seq_id=f"s{i}", scale=2.0) for i in range(4)]
    write_cache(tmp_path / "c", refs, vocab=vocab, rule=rule, codec=codec)
    cache = logitstore.open(tmp_path / "c")
    assert cache.codec.logprob_step == step
    errs = []
    for r in refs:
        s = cache[r.seq_id]
        valid = np.arange(rule.k)[None, :] < r.n_entries[:, None]
        errs.append(np.abs(s.logprobs[valid].astype(np.float64) - r.logprobs[valid].astype(np.float64)))
    err = np.concatenate(errs)
    assert err.size > 10_000
    biggest = max(float(np.abs(r.logprobs[np.isfinite(r.logprobs)]).max()) for r in refs)
    assert err.max() <= step / 2 + 1e-6 * max(1.0, biggest)
    assert err.max() > step / 4
    # the errors are spread like rounding errors: mean abs error about step / 4
    assert 0.2 * step < err.mean() < 0.3 * step


def test_fp16_error_bound_is_tight(tmp_path):
    """fp16 values: relative error <= 2^-11, and close to it on a large sample."""
    rng = np.random.default_rng(5)
    vocab, rule, codec = 3000, TopK(64), Codec(values="fp16")
    refs = [make_sequence(rng, vocab=vocab, n_tokens=60, rule=rule, seq_id=f"s{i}") for i in range(3)]
    write_cache(tmp_path / "c", refs, vocab=vocab, rule=rule, codec=codec)
    cache = logitstore.open(tmp_path / "c")
    rel = []
    for r in refs:
        s = cache[r.seq_id]
        assert_logprobs_within_bound(s.logprobs, r.logprobs, codec)
        ok = r.logprobs < -1e-3
        rel.append(np.abs(s.logprobs[ok].astype(np.float64) / r.logprobs[ok] - 1))
    rel = np.concatenate(rel)
    assert 2.0**-13 < rel.max() <= 2.0**-11


def test_fp16_refuses_logprobs_below_half_range(tmp_path):
    """FORMAT.md: fp16 logprobs below -65504 are refused (never stored as -inf)."""
    lp = np.array([[-1.0, -70000.0]], np.float32)
    kw = dict(input_ids=[1, 2], ids=[[2, 3]], logprobs=lp, label_logprob=[-1.0], entropy=[1.0],
              tail_mass=[1 - math.exp(-1.0)])
    with logitstore.CacheWriter(tmp_path / "a", vocab_size=10, rule=TopK(2), codec=Codec(values="fp16")) as w:
        with pytest.raises(InvalidInputError):
            w.add(as_record(**kw))
    with logitstore.CacheWriter(tmp_path / "b", vocab_size=10, rule=TopK(2), codec=Codec(scalars="fp16")) as w:
        with pytest.raises(InvalidInputError):
            w.add(as_record(**{**kw, "logprobs": [[-1.0, -2.0]], "label_logprob": [-70000.0]}))


# ---------------------------------------------------------------- quantisation functions


def _reference_q(lp: np.ndarray, step: float) -> np.ndarray:
    return -np.asarray(lp, np.float64) / step


@st.composite
def flat_positions(draw):
    """(flat descending-per-position logprobs, starts, lengths, step) within the qdelta range."""
    step = draw(st.sampled_from([DEFAULT_STEP, 0.01, 0.125, 1.0]))
    lo = -60000 * step
    lengths = draw(st.lists(st.integers(1, 40), min_size=0, max_size=12))
    chunks = []
    for n in lengths:
        vals = draw(st.lists(st.floats(lo, 0.0, allow_nan=False, allow_infinity=False), min_size=n, max_size=n))
        chunks.append(np.sort(np.array(vals, np.float64))[::-1])
    lp = np.concatenate(chunks) if chunks else np.zeros(0)
    lengths = np.array(lengths, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if lengths.size else lengths
    return lp, starts, lengths, step


@settings(max_examples=50, **SETTINGS)
@given(flat_positions())
def test_quantise_dequantise_against_reference(case):
    lp, starts, lengths, step = case
    d = C.quantise_deltas(lp, starts, step)
    assert d.dtype == np.uint16 and d.shape == lp.shape
    # reference, position by position: q = cumsum of the deltas is a nearest integer to -lp / step
    qref = -lp / step
    q = np.zeros(lp.size, np.int64)
    for a, n in zip(starts, lengths):
        q[a:a + n] = np.cumsum(d[a:a + n].astype(np.int64))
    assert (np.abs(q - qref) <= 0.5 + 1e-6 * np.maximum(1, np.abs(qref))).all()
    # decoding: -q * step, within the documented bound of the float64 inputs
    out = C.dequantise_flat(d, starts, step)
    assert out.shape == lp.shape
    np.testing.assert_allclose(out.astype(np.float64), -q * step, rtol=1e-6, atol=0)
    assert (np.abs(out - lp) <= step / 2 + 1e-6 * np.maximum(1, np.abs(lp))).all()


def test_quantise_known_values():
    """A hand-computed example: step 0.25, two positions."""
    lp = np.array([-0.1, -0.3, -1.0, -0.0, -0.5], np.float64)
    starts = np.array([0, 3])
    d = C.quantise_deltas(lp, starts, 0.25)
    # q = round(0.4, 1.2, 4.0 | 0.0, 2.0) = 0, 1, 4 | 0, 2
    np.testing.assert_array_equal(d, [0, 1, 3, 0, 2])
    np.testing.assert_array_equal(C.dequantise_flat(d, starts, 0.25), [0.0, -0.25, -1.0, 0.0, -0.5])


def test_quantise_across_position_boundary_may_rise():
    """Descending is required within a position only: a new position may start higher."""
    lp = np.array([-5.0, -6.0, -0.5, -1.0])
    starts = np.array([0, 2])
    d = C.quantise_deltas(lp, starts, DEFAULT_STEP)
    assert (d >= 0).all()
    np.testing.assert_allclose(C.dequantise_flat(d, starts, DEFAULT_STEP), -np.rint(-lp / DEFAULT_STEP) * DEFAULT_STEP,
                               rtol=1e-7)


@pytest.mark.parametrize(
    "lp,starts",
    [
        ([0.5], [0]),  # positive logprob
        ([-1.0, 2.0], [0]),  # positive later in a position
        ([-1.0, -0.5], [0]),  # ascending within a position
        ([-2.0, -3.0, -1.0, -0.2], [0, 2]),  # ascending inside the second position
        ([-65536 * DEFAULT_STEP], [0]),  # below the uint16 range
        ([-1.0, -1.0 - 65536 * DEFAULT_STEP], [0]),  # a delta beyond the uint16 range
    ],
)
def test_quantise_out_of_range_raises(lp, starts):
    with pytest.raises(InvalidInputError, match="qdelta"):
        C.quantise_deltas(np.array(lp, np.float64), np.array(starts), DEFAULT_STEP)


def test_quantise_range_edges_are_accepted():
    step = DEFAULT_STEP
    d = C.quantise_deltas(np.array([0.0, -65535 * step]), np.array([0]), step)
    np.testing.assert_array_equal(d, [0, 65535])
    assert C.quantise_deltas(np.zeros(0), np.zeros(0, np.int64), step).size == 0
    assert C.dequantise_flat(np.zeros(0, np.uint16), np.zeros(0, np.int64), step).size == 0


# ---------------------------------------------------------------- id map and padding


@settings(max_examples=30, **SETTINGS)
@given(vocab=st.integers(1, 700), ids=st.lists(st.integers(0, 699), max_size=600))
def test_id_map_ranks_by_frequency_then_id(vocab, ids):
    ids = np.array([i % vocab for i in ids], np.int32)
    m = C.build_id_map(ids, vocab)
    want = reference_id_map(ids.tolist(), vocab)
    np.testing.assert_array_equal(m, want)
    assert sorted(m.tolist()) == list(range(vocab))
    inv = C.invert_id_map(m)
    for code, tok in enumerate(want):
        assert inv[tok] == code


@settings(max_examples=30, **SETTINGS)
@given(lengths=st.lists(st.integers(1, 6), max_size=8), extra=st.integers(0, 3))
def test_pad_flat_against_loop(lengths, extra):
    lengths = np.array(lengths, np.int64)
    values = np.arange(1, int(lengths.sum()) + 1, dtype=np.int32)
    k = int(lengths.max(initial=1)) + extra
    out = C.pad_flat(values, C.valid_mask(lengths, k), lengths.size, k, -1)
    want = np.full((lengths.size, k), -1, np.int32)
    a = 0
    for i, n in enumerate(lengths):
        want[i, :n] = values[a:a + n]
        a += n
    np.testing.assert_array_equal(out, want)


# ---------------------------------------------------------------- Codec


@pytest.mark.parametrize("kw", [dict(values="int8"), dict(ids="hashed"), dict(scalars="bf16"), dict(logprob_step=0),
                                dict(logprob_step=1.5), dict(zstd_level=23)])
def test_codec_rejects_bad_settings(kw):
    with pytest.raises(InvalidInputError, match=next(iter(kw))):
        Codec(**kw)


def test_codec_bound_and_dict_round_trip():
    assert Codec().logprob_step == 5 / 128
    assert Codec().logprob_error_bound() == 5 / 256
    assert Codec(logprob_step=0.5).logprob_error_bound() == 0.25
    assert Codec(values="fp32").logprob_error_bound() == 0.0
    for c in CODECS.values():
        assert Codec.from_dict(c.to_dict()) == c


# ---------------------------------------------------------------- the reference rules


@settings(max_examples=30, **SETTINGS)
@given(n=st.integers(1, 6), v=st.integers(2, 300), k=st.integers(1, 300), p=st.floats(0.05, 1.0),
       scale=st.sampled_from([0.5, 3.0]), seed=st.integers(0, 2**31))
def test_sparsify_topk_and_mass_against_reference(n, v, k, p, scale, seed):
    lp = random_logprobs(np.random.default_rng(seed), n, v, scale)
    top = logitstore.sparsify(lp, TopK(k))
    mass = logitstore.sparsify(lp, MassTopK(p, k))
    kk = min(k, v)
    for i in range(n):
        order = sorted(range(v), key=lambda t: (-lp[i, t], t))[:kk]
        np.testing.assert_array_equal(top.ids[i], order)
        np.testing.assert_allclose(top.logprobs[i], lp[i, order].astype(np.float32))
        assert top.n_entries[i] == kk
        assert abs(top.tail_mass[i] - (1 - np.exp(lp[i, order]).sum())) < 1e-12 + 1e-9
        # mass: the smallest prefix with cumulative probability >= p, capped at k
        csum = np.cumsum(np.exp(lp[i, order]))
        want_n = next((j + 1 for j in range(kk) if csum[j] >= p), kk)
        assert mass.n_entries[i] == want_n
        np.testing.assert_array_equal(mass.ids[i, :want_n], order[:want_n])
        assert np.isneginf(mass.logprobs[i, want_n:]).all()
        assert abs(mass.tail_mass[i] - max(0.0, 1 - csum[want_n - 1])) < 1e-9


def test_sparsify_sampled_counts_are_unbiased():
    """Sampled: unique ids most likely first, counts summing to draws, counts / draws ~ p."""
    rng = np.random.default_rng(0)
    lp = log_softmax(np.array([[2.0, 1.0, 0.0, -1.0, -3.0]]))
    e = logitstore.sparsify(np.repeat(lp, 8, axis=0), Sampled(20000), rng=rng)
    p = np.exp(lp[0])
    est = np.zeros(5)
    for i in range(8):
        n = e.n_entries[i]
        ids = e.ids[i, :n]
        assert len(set(ids.tolist())) == n
        assert (np.diff(lp[0, ids]) <= 0).all()
        np.testing.assert_allclose(e.logprobs[i, :n], lp[0, ids].astype(np.float32))
        assert int(e.counts[i, :n].sum()) == 20000
        assert abs(e.tail_mass[i] - (1 - p[ids].sum())) < 1e-9
        est[ids] += e.counts[i, :n]
    est /= 8 * 20000
    sigma = np.sqrt(p * (1 - p) / (8 * 20000))
    assert (np.abs(est - p) < 5 * sigma + 1e-12).all()


def test_sparsify_sampled_zero_positions():
    e = logitstore.sparsify(np.zeros((0, 10)), Sampled(8))
    assert e.ids.shape[0] == 0 and e.n_entries.shape == (0,)


# ---------------------------------------------------------------- values='none' (rule sample only)


def test_values_none_stores_ids_and_counts_only(tmp_path):
    rng = np.random.default_rng(8)
    vocab, rule, codec = 300, Sampled(40, 12), Codec(values="none")
    refs = [make_sequence(rng, vocab=vocab, n_tokens=T, rule=rule, seq_id=f"s{T}") for T in (1, 2, 15, 30)]
    write_cache(tmp_path / "c", refs, vocab=vocab, rule=rule, codec=codec)
    cache = logitstore.open(tmp_path / "c")
    for r in refs:
        s = cache[r.seq_id]
        assert s.logprobs is None
        valid = np.arange(rule.k)[None, :] < r.n_entries[:, None]
        valid_in = np.arange(r.ids.shape[1])[None, :] < r.n_entries[:, None]
        np.testing.assert_array_equal(s.ids[valid], r.ids[valid_in])
        np.testing.assert_array_equal(s.counts[valid], r.counts[valid_in])
        assert (s.ids[~valid] == -1).all() and (s.counts[~valid] == 0).all()
        np.testing.assert_array_equal(s.entropy, r.entropy.astype(np.float32))
    assert verify(tmp_path / "c") == []
    with pytest.raises(InvalidInputError, match="none"):
        logitstore.CacheWriter(tmp_path / "d", vocab_size=vocab, rule=TopK(4), codec=codec)
