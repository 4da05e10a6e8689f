"""Fixtures for builder tests: a tiny Llama teacher built from a config, with a real tokenizer."""

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from transformers import AutoTokenizer

    from builders.embedded import prepare_embedded_teacher

    return AutoTokenizer.from_pretrained(prepare_embedded_teacher())


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, embedded_tokenizer):
    """A 2-layer random Llama with the embedded teacher's tokenizer (vocab 49152), saved as a model dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a sharper head than the default init, so distributions are not near-uniform
        model.lm_head.weight.mul_(40)
    path = tmp_path_factory.mktemp("tiny") / "teacher"
    model.save_pretrained(path)
    embedded_tokenizer.save_pretrained(path)
    return path


def reference_logprobs(model_dir, input_ids: np.ndarray) -> np.ndarray:
    """The plain reference: model(input_ids).logits -> float64 log-softmax over the full vocabulary, [T-1, V]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor(np.asarray(input_ids, np.int64))[None]).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).numpy()
