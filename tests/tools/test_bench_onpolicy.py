"""tools/bench_onpolicy.py's teacher-initialised student (``--student-layers``): the teacher cut to some of its
layers, checked against a plain layer-by-layer forward of the uncut model."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_pruned_teacher_is_the_chosen_layers_of_the_teacher(tmp_path, embedded_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from tools.bench_onpolicy import pruned_teacher

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=7,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    full = LlamaForCausalLM(cfg).eval()
    src = tmp_path / "teacher"
    full.save_pretrained(src)
    embedded_tokenizer.save_pretrained(src)

    out = pruned_teacher(src, 3, tmp_path / "student")
    cut = AutoModelForCausalLM.from_pretrained(out).eval()
    assert cut.config.num_hidden_layers == 3
    assert (out / "tokenizer.json").is_file()

    # reference: the uncut model run through layers 0, 3 and 6 only (evenly spaced, first and last kept)
    ids = torch.randint(0, 49152, (2, 9))
    with torch.no_grad():
        h = full.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        rope = full.model.rotary_emb(h, pos)
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
        for i in (0, 3, 6):
            h = full.model.layers[i](h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
            h = h[0] if isinstance(h, tuple) else h
        want = full.lm_head(full.model.norm(h))
        got = cut(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit, match="holds a student of 3 layers"):
        pruned_teacher(src, 4, out)  # the workdir's student is not silently reused for another layer count
    assert pruned_teacher(src, 3, out) == out


def test_pruned_teacher_refuses_a_layer_count_outside_the_teacher(tmp_path, embedded_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tools.bench_onpolicy import pruned_teacher

    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "teacher")
    for n in (1, 4):
        with pytest.raises(SystemExit, match="the teacher has 3 layers"):
            pruned_teacher(tmp_path / "teacher", n, tmp_path / f"student-{n}")
        assert not (tmp_path / f"student-{n}").exists()
