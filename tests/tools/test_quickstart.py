"""The README's first command (tools/quickstart.py) on the real embedded teacher.

The cached values are checked against an independent reference: the model's raw
logits turned into log-probabilities by a plain float64 numpy log-softmax over the
full vocabulary.
"""

import numpy as np
import pytest

from tests.conftest import FP32_ATOL

pytestmark = pytest.mark.teacher


@pytest.fixture(scope="module")
def quickstart_cache(tmp_path_factory):
    from tools import quickstart

    out = tmp_path_factory.mktemp("qs") / "cache"
    assert quickstart.main(["-o", str(out), "--sequences", "3", "--length", "48", "--top-k", "16"]) == 0
    return out


def test_quickstart_cache_matches_a_plain_full_vocabulary_reference(quickstart_cache):
    import torch
    from transformers import AutoModelForCausalLM

    import logitstore as ls
    from builders.embedded import prepare_embedded_teacher
    from logitstore.verify import verify

    assert verify(quickstart_cache) == []
    cache = ls.open(quickstart_cache)
    assert cache.manifest.vocab_size == 49152 and cache.manifest.complete
    assert cache.manifest.tokenizer["fingerprint"] and len(cache) == 3
    model = AutoModelForCausalLM.from_pretrained(prepare_embedded_teacher(), dtype=torch.float32).eval()
    bound = cache.codec.logprob_error_bound() + FP32_ATOL  # quantised, then float32 noise against the reference
    for seq in cache:
        with torch.inference_mode():
            logits = model(torch.tensor(seq.input_ids)[None].long()).logits[0, :-1].double().numpy()
        m = logits.max(-1, keepdims=True)
        lp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))  # float64 log-softmax, full vocab
        p = np.exp(lp)
        np.testing.assert_allclose(seq.entropy, -(p * lp).sum(-1), atol=1e-3)
        np.testing.assert_allclose(seq.label_logprob, lp[np.arange(len(lp)), seq.input_ids[1:]], atol=1e-4)
        order = np.argsort(-lp, axis=-1)[:, :16]
        ref_top = np.take_along_axis(lp, order, -1)
        assert np.abs(seq.logprobs - ref_top).max() <= bound
        # same top-k id sets except near-ties at the boundary (|gap| < 2 FP32_ATOL nats)
        for i in range(len(lp)):
            diff = set(order[i]) ^ set(seq.ids[i])
            assert all(abs(lp[i, t] - ref_top[i, -1]) < 2 * FP32_ATOL for t in diff), (i, diff)
        np.testing.assert_allclose(seq.tail_mass, 1 - np.exp(ref_top).sum(-1), atol=FP32_ATOL)
        ties = np.sort(lp, -1)[:, -1] - np.sort(lp, -1)[:, -2] < 2 * FP32_ATOL  # top-1 may order either way
        hit = order[:, 0] == seq.input_ids[1:]
        assert abs(seq.token_accuracy - hit.mean()) <= ties.mean() + 1e-6


def test_the_cli_reports_the_quickstart_cache(quickstart_cache, capsys):
    import json

    from tools.cli import main

    assert main(["info", str(quickstart_cache), "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sequences"] == 3 and info["positions"] == 3 * 47
    assert info["exactness"]["entropy"] == "exact" and info["exactness"]["topk_logprobs"] == "quantised"
    assert main(["verify", "-q", str(quickstart_cache)]) == 0
