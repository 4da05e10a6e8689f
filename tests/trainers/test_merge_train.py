"""A merged cache of two tiny teachers against the numpy mixture of their full distributions; it verifies,
answers SQL, selects and trains like any cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import logitstore
from tests.conftest import FP32_ATOL
from tests.trainers.conftest import english_lines


@pytest.fixture(scope="module")
def two_teacher_caches(tmp_path_factory, tiny_teacher, embedded_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from builders.config import BuildConfig
    from builders.driver import build

    d = tmp_path_factory.mktemp("merge")
    torch.manual_seed(7)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    with torch.no_grad():
        other.lm_head.weight.mul_(40)
    other.save_pretrained(d / "teacher_b")
    embedded_tokenizer.save_pretrained(d / "teacher_b")
    data = d / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in english_lines(12)))
    caches = []
    for name, teacher in (("a", tiny_teacher), ("b", d / "teacher_b")):
        build(str(teacher), data, d / name, BuildConfig(rule=logitstore.TopK(8), max_length=32,
                                                        codec=logitstore.Codec(values="fp32")), progress=False)
        caches.append(d / name)
    return d, caches, [tiny_teacher, d / "teacher_b"]


def full_logprobs(teacher_dir, ids) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor(ids)[None]).logits[0].double(), -1).numpy()


def test_merge_of_two_teachers_is_their_mixture_and_trains(two_teacher_caches, student_config, tmp_path):
    from logitstore.merge import merge
    from logitstore.subset import make_selection
    from logitstore.verify import verify
    from trainers.config import TrainConfig
    from trainers.loop import train

    d, (a, b), teachers = two_teacher_caches
    out = tmp_path / "merged"
    rec = merge([a, b], out, weights=[3, 1])
    assert rec["in_all"] == rec["sequences"] == len(logitstore.open(a))
    merged = logitstore.open(out)
    w = np.array([0.75, 0.25])
    for seq in list(merged)[:4]:
        full = [full_logprobs(t, seq.input_ids) for t in teachers]
        mix = w[0] * np.exp(full[0]) + w[1] * np.exp(full[1])  # [T, V], row p - 1 predicts token p
        rows = seq.pos - 1
        np.testing.assert_allclose(seq.label_logprob, np.log(mix[rows, seq.labels]), atol=FP32_ATOL)
        for j, r in enumerate(rows):
            n = seq.n_entries[j]
            ids, p = seq.ids[j, :n], np.exp(seq.logprobs[j, :n].astype(np.float64))
            tops = [set(np.argsort(-f[r])[:8].tolist()) for f in full]
            known = np.array([sum(wi * math.exp(f[r, t]) for wi, f, top in zip(w, full, tops) if t in top)
                              for t in ids])
            np.testing.assert_allclose(p, known, rtol=1e-3, atol=1e-6)  # the known part of the mixture
            assert (p <= mix[r, ids] + 1e-5).all()
            true_h = -(mix[r] * np.log(mix[r])).sum()
            assert seq.entropy[j] >= true_h - 1e-3
    assert verify(out) == []
    n = merged.sql("SELECT count(*) FROM tokens").fetchall()[0][0]
    assert n == sum(len(s.pos) for s in logitstore.open(a))
    sel = make_selection(out, where="n_tokens > 5")
    assert 0 < len(sel.seq_ids) <= len(merged)
    summary = train(TrainConfig(cache=str(out), student=str(student_config), output=str(tmp_path / "run"),
                                max_steps=3, batch_size=4, max_length=32, quiet=True, holdout=0.25))
    assert math.isfinite(summary["eval_kl"]) and math.isfinite(summary["eval_bpb"])
