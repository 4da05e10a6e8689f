"""The vLLM backend.

Everywhere: the conversion of vLLM's per-position logprob dicts (the structure its source
documents: the actual token first with its vocabulary rank, then ranks 1..k, k+1 entries when
the actual token ranks below k) into cache fields, against the float64 full-vocabulary
reference of the tiny teacher; the entropy bound against the exact entropy; the version and
rule guards. On a machine with a CUDA GPU and vLLM installed: parity of the real vLLM backend
with the transformers backend on the same model (marked ``gpu``; skipped elsewhere).
"""

import collections
import sys
import types

import numpy as np
import pytest

from builders.backends import get_backend
from builders.backends.vllm import (
    VLLMBackend,
    VLLMUnavailableError,
    candidates,
    entropy_upper_bound,
    import_vllm,
    scored_from_candidates,
)
from logitstore.errors import InvalidInputError
from logitstore.rules import MassTopK, Sampled, TopK, sparsify
from tests.builders.conftest import reference_logprobs

Logprob = collections.namedtuple("Logprob", "logprob rank decoded_token")


def vllm_dicts(full: np.ndarray, labels: np.ndarray, k: int) -> list[dict]:
    """What vLLM returns per position, built from full logprobs ``[N, V]`` as its source describes."""
    out = []
    for row, y in zip(full, labels):
        order = np.argsort(-row, kind="stable")
        d = {int(y): Logprob(float(row[y]), int((row >= row[y]).sum()), None)}  # actual token first, true rank
        for r, tid in enumerate(order[:k], start=1):
            d[int(tid)] = Logprob(float(row[tid]), r, None)  # a top-k actual token is overwritten with its rank
        out.append(d)
    return out


@pytest.fixture(scope="module")
def reference(tiny_teacher):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    ids = np.array(tok("the cache stores sparse teacher distributions for many students to share")["input_ids"])
    return ids, reference_logprobs(tiny_teacher, ids)  # [T-1, V]: row t-1 predicts ids[t]


@pytest.mark.parametrize("rule", [TopK(8), MassTopK(0.6, 16)], ids=["topk", "mass"])
def test_conversion_matches_the_full_vocabulary_reference(reference, rule):
    ids, full = reference
    labels = ids[1:]
    got = scored_from_candidates(*candidates(vllm_dicts(full, labels, rule.k), labels, rule.k), rule, full.shape[1])
    want = sparsify(full, rule)
    np.testing.assert_array_equal(got.n_entries, want.n_entries)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-6)
    np.testing.assert_allclose(got.tail_mass, want.tail_mass, atol=1e-6)
    np.testing.assert_allclose(got.label_logprob, full[np.arange(len(labels)), labels], atol=1e-6)
    np.testing.assert_array_equal(got.argmax, full.argmax(1))
    exact = -(np.exp(full) * full).sum(1)
    assert np.all(got.entropy >= exact - 1e-4)  # an upper bound, never below the truth
    # the bound: the k known probabilities, and the rest of the mass spread over the other V - k ids
    top = np.sort(full, 1)[:, ::-1][:, :rule.k]
    p = np.exp(top)
    tail = 1 - p.sum(1)
    want_bound = -(p * top).sum(1) + tail * (np.log(full.shape[1] - rule.k) - np.log(tail))
    np.testing.assert_allclose(got.entropy, want_bound, rtol=1e-5)


def test_the_actual_token_outside_the_top_k_is_the_label_not_an_entry(reference):
    ids, full = reference
    labels = ids[1:]
    k = 2
    dicts = vllm_dicts(full, labels, k)
    outside = [i for i, d in enumerate(dicts) if len(d) == k + 1]
    assert outside, "the fixture should have labels ranked below k"
    top, lps, label = candidates(dicts, labels, k)
    for i in outside:
        assert labels[i] not in top[i]
        assert label[i] == pytest.approx(full[i, labels[i]])
    assert np.all(np.isfinite(lps))  # exactly k entries everywhere


def test_entropy_bound_is_exact_with_the_whole_vocabulary_and_above_it_otherwise():
    rng = np.random.default_rng(0)
    for V in (5, 50, 500):
        logits = rng.normal(size=(64, V)) * rng.uniform(0.1, 5, size=(64, 1))
        lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        exact = -(np.exp(lp) * lp).sum(1)
        srt = np.sort(lp, 1)[:, ::-1]
        np.testing.assert_allclose(entropy_upper_bound(srt, V), exact, atol=1e-9)
        for k in (1, 3, V // 2):
            assert np.all(entropy_upper_bound(srt[:, :k], V) >= exact - 1e-9)


def test_missing_actual_token_is_an_error_not_a_guess():
    with pytest.raises(Exception, match="no logprob for the actual token"):
        candidates([{5: Logprob(-0.1, 1, None)}], np.array([7]), 1)


def test_version_and_install_guards(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.9.2"))
    with pytest.raises(VLLMUnavailableError, match=r"vLLM 0.9.2 lacks logprobs_mode.*vllm>=0.10.0"):
        import_vllm()
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails
    with pytest.raises(VLLMUnavailableError, match=r"logitstore\[vllm\]"):
        get_backend("vllm")("some/model")


def _bare_backend(k=4, vocab=100):
    b = VLLMBackend.__new__(VLLMBackend)  # the parts of the backend that do not talk to the engine
    b.max_logprobs, b.vocab_size = k, vocab
    b._memo, b._memo_positions = collections.OrderedDict(), 0
    b.llm = None  # any engine call would fail
    return b


def test_generated_responses_are_stored_from_their_sample_logprobs():
    rng = np.random.default_rng(1)
    b = _bare_backend()
    prompt = np.array([1, 2, 3])
    resp = np.array([9, 4, 7, 0])
    logits = rng.normal(size=(4, 100)) * 3
    full = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    b._remember(np.concatenate([prompt, resp]), 3, vllm_dicts(full, resp, 4), resp)
    pos = np.arange(3, 7)
    (got,) = b.score([np.concatenate([prompt, resp])], [pos], TopK(4))  # no engine call: from the memo
    want = sparsify(full, TopK(4))
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.label_logprob, full[np.arange(4), resp], atol=1e-6)
    assert not b._memo and b._memo_positions == 0  # used once, then dropped


def test_rules_vllm_cannot_serve_are_refused():
    b = _bare_backend(k=4)
    with pytest.raises(InvalidInputError, match="rule sample"):
        b.score([np.array([1, 2])], [np.array([1])], Sampled(16))
    with pytest.raises(InvalidInputError, match="max_logprobs=4"):
        b.score([np.array([1, 2])], [np.array([1])], TopK(8))


def _has_vllm_gpu():
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('tests.builders.test_backend_vllm', fromlist=['x'])._has_vllm_gpu()",
                    reason="needs a CUDA GPU and vLLM")
def test_vllm_matches_the_transformers_backend(tiny_teacher):
    from tests.builders.test_backend_hf import sequences

    hf = get_backend("transformers")(str(tiny_teacher), device="cuda")
    vl = get_backend("vllm")(str(tiny_teacher), dtype="fp32", max_logprobs=16, gpu_memory_utilization=0.3,
                             max_model_len=512)
    assert vl.vocab_size == hf.vocab_size and vl.tokenizer_record() == hf.tokenizer_record()
    seq = sequences(hf.tokenizer)
    pos = [np.arange(1, len(s)) for s in seq]
    for rule in (TopK(16), MassTopK(0.9, 16)):
        for a, b in zip(hf.score(seq, pos, rule), vl.score(seq, pos, rule)):
            np.testing.assert_allclose(b.label_logprob, a.label_logprob, atol=2e-3)
            np.testing.assert_allclose(b.tail_mass, a.tail_mass, atol=2e-3)
            assert np.all(b.entropy >= a.entropy - 2e-3)  # vLLM's entropy is an upper bound of the exact one
            for i in range(len(a.n_entries)):
                n = min(a.n_entries[i], b.n_entries[i])
                # same id sets except near-ties at the cut
                near = np.abs(a.logprobs[i, :n] - a.logprobs[i, n - 1]) < 2e-3
                assert set(a.ids[i, :n][~near]) <= set(b.ids[i, :b.n_entries[i]])
                np.testing.assert_allclose(np.sort(b.logprobs[i, :n]), np.sort(a.logprobs[i, :n]), atol=2e-3)
