"""Helpers of the builder tests (the tiny teacher fixture lives in tests/conftest.py)."""

import numpy as np
import torch


def reference_logprobs(model_dir, input_ids: np.ndarray) -> np.ndarray:
    """The plain reference: model(input_ids).logits -> float64 log-softmax over the full vocabulary, [T-1, V]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor(np.asarray(input_ids, np.int64))[None]).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).numpy()
