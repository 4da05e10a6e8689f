"""The transformers backend against model(input_ids).logits -> float64 log-softmax, and padding invariance."""

from pathlib import Path

import numpy as np
import pytest

from builders.backends import get_backend
from builders.backends.hf import TeacherLoadError
from logitstore.errors import InvalidInputError
from logitstore.rules import MassTopK, TopK
from tests.builders.conftest import reference_logprobs
from tests.conftest import FP32_ATOL


def sequences(tokenizer):
    texts = ["The quick brown fox jumps over the lazy dog.",
             "Knowledge distillation trains a small student on a large teacher's distribution.",
             "12 + 30 = 42", "Hi"]
    return [np.asarray(tokenizer(t)["input_ids"], np.int32) for t in texts]


def check_against_reference(scored, seq, pos, ref, k):
    top = np.argsort(-ref, axis=-1)[:, :k]
    ref_top = np.take_along_axis(ref, top, -1)
    rows = pos - 1
    np.testing.assert_allclose(scored.logprobs, ref_top[rows], atol=1e-4)
    for i, r in enumerate(rows):  # same id sets except near-ties at the boundary
        diff = set(top[r]) ^ set(scored.ids[i])
        assert all(abs(ref[r, t] - ref_top[r, -1]) < 1e-4 for t in diff), (i, diff)
    p = np.exp(ref[rows])
    np.testing.assert_allclose(scored.entropy, -(p * ref[rows]).sum(-1), atol=1e-3)
    np.testing.assert_allclose(scored.label_logprob, ref[rows, seq[pos]], atol=1e-4)
    np.testing.assert_allclose(scored.tail_mass, 1 - np.exp(ref_top[rows]).sum(-1), atol=1e-4)


def test_tiny_teacher_matches_reference_batched_and_alone(tiny_teacher):
    backend = get_backend("transformers")(str(tiny_teacher))
    seqs = sequences(backend.tokenizer)
    positions = [np.arange(1, len(s)) for s in seqs]
    positions[1] = positions[1][::3]  # a subset of positions, as for prompt/response records
    batched = backend.score(seqs, positions, TopK(16))
    for s, pos, got in zip(seqs, positions, batched):
        check_against_reference(got, s, pos, reference_logprobs(tiny_teacher, s), 16)
        alone = backend.score([s], [pos], TopK(16))[0]
        np.testing.assert_allclose(got.logprobs, alone.logprobs, atol=1e-4)  # padding changes nothing
        np.testing.assert_allclose(got.entropy, alone.entropy, atol=1e-4)


def test_mass_rule_and_chunking_through_the_backend(tiny_teacher):
    small = get_backend("transformers")(str(tiny_teacher), extract_mb=1)  # forces many small chunks
    big = get_backend("transformers")(str(tiny_teacher))
    assert small.chunk_rows < 10 < big.chunk_rows
    seqs = sequences(big.tokenizer)
    pos = [np.arange(1, len(s)) for s in seqs]
    for a, b in zip(small.score(seqs, pos, MassTopK(0.8, 32)), big.score(seqs, pos, MassTopK(0.8, 32))):
        np.testing.assert_array_equal(a.n_entries, b.n_entries)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)


def test_teacher_errors(tmp_path):
    with pytest.raises(TeacherLoadError, match="config.json"):
        get_backend("transformers")(str(tmp_path))
    with pytest.raises(TeacherLoadError, match="gguf"):
        get_backend("transformers")(str(tmp_path / "missing.gguf"))
    with pytest.raises(InvalidInputError, match="available: transformers"):
        get_backend("nope")


@pytest.mark.teacher
def test_embedded_teacher_matches_reference():
    from builders.embedded import TEACHER_ID, prepare_embedded_teacher

    path = prepare_embedded_teacher()
    backend = get_backend("transformers")(str(path))
    ident = backend.describe()  # caches name the embedded teacher by its id, not by a local cache path
    assert ident["id"] == TEACHER_ID and ident["path"] == str(path.resolve())
    assert ident["revision"].startswith("sha256-") and "model.safetensors" in ident["hashed"]
    seqs = sequences(backend.tokenizer)[:3]
    pos = [np.arange(1, len(s)) for s in seqs]
    for s, p, got in zip(seqs, pos, backend.score(seqs, pos, TopK(32))):
        check_against_reference(got, s, p, reference_logprobs(path, s), 32)


@pytest.mark.teacher
def test_a_gguf_teacher_scores_like_its_safetensors_copy():
    from builders.embedded import embedded_gguf_path, prepare_embedded_teacher

    gguf = get_backend("transformers")(str(embedded_gguf_path()))
    plain = get_backend("transformers")(str(prepare_embedded_teacher()))
    assert gguf.describe()["revision"] != plain.describe()["revision"]  # identities differ: a resume would refuse
    seq = sequences(plain.tokenizer)[:2]
    pos = [np.arange(1, len(s)) for s in seq]
    for a, b in zip(gguf.score(seq, pos, TopK(8)), plain.score(seq, pos, TopK(8))):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=FP32_ATOL)


def test_bf16_scores_close_to_fp32_and_is_another_identity(tiny_teacher, tmp_path):
    bf16 = get_backend("transformers")(str(tiny_teacher), dtype="bf16")
    assert bf16.describe()["dtype"] == "bf16"
    seq = sequences(bf16.tokenizer)[:2]
    pos = [np.arange(1, len(s)) for s in seq]
    for s, p, got in zip(seq, pos, bf16.score(seq, pos, TopK(8))):
        ref = reference_logprobs(tiny_teacher, s)[p - 1]
        assert np.isfinite(got.logprobs).all() and got.logprobs.dtype == np.float32
        # bf16 keeps 8 mantissa bits: errors scale with the logit's size (2^-7 relative, plus a little)
        np.testing.assert_allclose(got.label_logprob, ref[np.arange(len(p)), s[p]], rtol=2**-7, atol=0.05)
    from tools.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a short text to score twice"}\n')
    out = tmp_path / "c"
    assert main(["build", str(tiny_teacher), str(data), "-o", str(out), "--top-k", "4", "-q"]) == 0
    assert main(["build", str(tiny_teacher), str(data), "-o", str(out), "--top-k", "4", "-q", "--resume",
                 "--dtype", "bf16"]) == 2


def test_granite_logits_scaling_is_applied(tmp_path, embedded_tokenizer):
    """Granite divides its logits by config.logits_scaling; the cached values must be the model's own."""
    import torch
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(1)
    cfg = GraniteConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, logits_scaling=8.0, tie_word_embeddings=False)
    model = GraniteForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    model.save_pretrained(tmp_path / "g")
    embedded_tokenizer.save_pretrained(tmp_path / "g")
    backend = get_backend("transformers")(str(tmp_path / "g"))
    seq = sequences(backend.tokenizer)[:2]
    pos = [np.arange(1, len(s)) for s in seq]
    for s, p, got in zip(seq, pos, backend.score(seq, pos, TopK(8))):
        check_against_reference(got, s, p, reference_logprobs(tmp_path / "g", s), 8)


def test_an_unknown_logit_transform_is_refused(tiny_teacher, monkeypatch):
    """A model whose logits differ from lm_head(hidden) in an unknown way is refused at load, not mis-stored."""
    from transformers import LlamaForCausalLM

    real = LlamaForCausalLM.forward

    def doubled(self, *a, **kw):
        out = real(self, *a, **kw)
        out.logits = out.logits * 2
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", doubled)
    with pytest.raises(TeacherLoadError, match="does not reproduce"):
        get_backend("transformers")(str(tiny_teacher))


def test_a_model_dir_without_a_tokenizer_is_a_clean_error(tmp_path, tiny_teacher):
    import shutil

    shutil.copytree(tiny_teacher, tmp_path / "m")
    for f in (tmp_path / "m").iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            f.unlink()
    with pytest.raises(TeacherLoadError):
        get_backend("transformers")(str(tmp_path / "m"))


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
def test_cuda_matches_cpu(tiny_teacher):
    cpu = get_backend("transformers")(str(tiny_teacher))
    gpu = get_backend("transformers")(str(tiny_teacher), device="cuda")
    seq = sequences(cpu.tokenizer)
    pos = [np.arange(1, len(s)) for s in seq]
    for a, b in zip(cpu.score(seq, pos, MassTopK(0.9, 16)), gpu.score(seq, pos, MassTopK(0.9, 16))):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-3)


def test_racing_preparations_of_the_embedded_teacher_keep_one_complete_copy(tmp_path):
    """Processes preparing the teacher at once (test workers, parallel jobs) each write a copy; the first rename
    wins, a later one keeps it and drops its own, and an incomplete copy left by hand is replaced."""
    from builders.embedded import install_copy

    def copy(name: str, marker: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in ("model.safetensors", "config.json"):
            (d / f).write_text(marker)
        return d

    out = tmp_path / "teacher"
    assert install_copy(copy("tmp-1", "first"), out)
    assert not install_copy(copy("tmp-2", "second"), out)  # the other process got there first
    assert (out / "model.safetensors").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]  # no copy left behind
    (out / "model.safetensors").unlink()  # incomplete now
    assert install_copy(copy("tmp-3", "third"), out)
    assert (out / "config.json").read_text() == "third" and (out / "model.safetensors").is_file()
