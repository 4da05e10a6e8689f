"""``build --generate N --responses-from POLICY``: the policy samples, the teacher scores, the policy's own values
are stored; everything checked against plain references (transformers' own ``generate`` and full-vocabulary
forwards of each model), and the refusals leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

import logitstore
from builders.generate import prompt_seed
from logitstore.verify import verify
from tests.builders.conftest import reference_logprobs
from tests.conftest import FP32_ATOL
from tools.cli import main

N, NEW = 2, 6


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory, embedded_tokenizer):
    """A 1-layer random Llama with the teacher's tokenizer: a stand-in for a student."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                         tie_word_embeddings=True))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30)  # sharper than the default init
    path = tmp_path_factory.mktemp("policy") / "student"
    model.save_pretrained(path)
    embedded_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    rows = [{"messages": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4"},
            {"prompt": "Count: one two", "answer": "three"},
            {"messages": [{"role": "user", "content": "Name a colour."}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(teacher, data, out, *extra):
    return main(["build", str(teacher), str(data), "-o", str(out), "--top-k", "8", "--values", "fp32", "-q",
                 "--generate", str(N), "--max-new-tokens", str(NEW), "--verifier", "exact", *extra])


@pytest.fixture(scope="module")
def built(tiny_teacher, tiny_policy, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "cache"
    assert build(tiny_teacher, prompts, out, "--responses-from", str(tiny_policy)) == 0
    return out


def reference_samples(policy_dir, prompt: np.ndarray, seed: int) -> list[list[int]]:
    """transformers' own sampler on the policy, seeded as generation mode documents (one seed per prompt)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    ids = torch.tensor(np.array(prompt), dtype=torch.long)[None]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                         num_return_sequences=N, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=2)
    eos = model.generation_config.eos_token_id
    res = []
    for row in out[:, ids.shape[1]:].tolist():
        stop = next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
        res.append(row[:stop])
    return res


def test_the_policys_samples_reproduce_for_a_seed(built, tiny_teacher, tiny_policy, prompts, tmp_path):
    cache = logitstore.open(built)
    by_record: dict[int, dict[int, list[int]]] = {}
    for s in cache:
        by_record.setdefault(int(s.record), {})[int(s.sample)] = s.input_ids[s.pos[0]:].tolist()
    assert sorted(by_record) == [0, 1, 2]
    for rec, samples in by_record.items():
        seq = next(s for s in cache if s.record == rec)
        want = reference_samples(tiny_policy, seq.input_ids[:seq.pos[0]], prompt_seed(0, rec))
        assert [samples[j] for j in sorted(samples)] == want
    # the same seed again: the same cache content; another seed: other samples; the teacher's own: other samples
    assert build(tiny_teacher, prompts, tmp_path / "again", "--responses-from", str(tiny_policy)) == 0
    assert build(tiny_teacher, prompts, tmp_path / "seed1", "--responses-from", str(tiny_policy), "--seed", "1") == 0
    assert build(tiny_teacher, prompts, tmp_path / "teacher") == 0
    ids = {name: sorted(s.input_ids.tolist() for s in logitstore.open(p)) for name, p in
           (("a", built), ("again", tmp_path / "again"), ("seed1", tmp_path / "seed1"),
            ("teacher", tmp_path / "teacher"))}
    assert ids["a"] == ids["again"] and ids["a"] != ids["seed1"] and ids["a"] != ids["teacher"]


def test_teacher_and_policy_values_equal_plain_full_vocabulary_forwards(built, tiny_teacher, tiny_policy):
    cache = logitstore.open(built)
    assert verify(built) == []
    assert cache.policy and cache.manifest.exactness["policy_logprob"] == "exact"
    assert cache.manifest.exactness["policy_entropy"] == "exact"
    for seq in cache:
        assert seq.loss_mask.all() and np.all(np.diff(seq.pos) == 1) and seq.pos[-1] == seq.n_tokens - 1
        rows = seq.pos - 1
        t = reference_logprobs(tiny_teacher, seq.input_ids)[rows]
        p = reference_logprobs(tiny_policy, seq.input_ids)[rows]
        np.testing.assert_allclose(seq.label_logprob, t[np.arange(len(rows)), seq.labels], atol=FP32_ATOL)
        np.testing.assert_allclose(seq.entropy, -(np.exp(t) * t).sum(-1), atol=10 * FP32_ATOL)
        top = np.sort(t, axis=1)[:, ::-1][:, :8]
        np.testing.assert_allclose(seq.logprobs, top, atol=FP32_ATOL)
        np.testing.assert_allclose(seq.policy_logprob, p[np.arange(len(rows)), seq.labels], atol=FP32_ATOL)
        np.testing.assert_allclose(seq.policy_entropy, -(np.exp(p) * p).sum(-1), atol=10 * FP32_ATOL)


def content_hash(model_dir) -> str:
    """FORMAT.md: sha256 over the sorted (file name, file sha256) pairs of the config, weights and tokenizer files."""
    names = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors",
                                                                                       ".jinja", ".txt"))
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + hashlib.sha256((model_dir / name).read_bytes()).hexdigest().encode() + b"\n")
    return "sha256-" + h.hexdigest()[:16]


def test_the_manifest_records_the_policy_and_the_sampling(built, tiny_policy):
    m = logitstore.open(built).manifest
    pol = m.build["policy"]
    assert pol["id"] == str(tiny_policy.resolve()) and pol["revision"] == content_hash(tiny_policy)
    assert pol["round"] is None and pol["backend"] == "transformers" and pol["dtype"] == "fp32"
    assert m.build["policy_options"]["device"] == "cpu"
    assert m.build["generation"] == {"n": N, "max_new_tokens": NEW, "temperature": 1.0, "top_p": 1.0,
                                     "verifier": "exact"}
    assert set(m.build["timings_s"]) == {"generate", "policy_score", "teacher_score"}
    assert all(v > 0 for v in m.build["timings_s"].values())


def test_a_plain_build_records_no_policy(tiny_teacher, prompts, tmp_path):
    assert build(tiny_teacher, prompts, tmp_path / "c") == 0
    m = logitstore.open(tmp_path / "c").manifest
    assert m.build["policy"] is None and not m.has_policy and m.build["timings_s"]["policy_score"] == 0


def test_a_resume_with_another_policy_is_refused(built, tiny_teacher, prompts, tmp_path, tiny_policy):
    other = tmp_path / "other"
    shutil.copytree(tiny_policy, other)
    st = other / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-4] + b"\0\0\0\0")  # other weights, same size and name
    shutil.copytree(built, tmp_path / "c")
    assert build(tiny_teacher, prompts, tmp_path / "c", "--resume", "--responses-from", str(other)) == 2


@pytest.fixture()
def other_tokenizer_policy(tiny_policy, tmp_path, embedded_tokenizer):
    """The tiny policy with one more token in its tokenizer: another fingerprint."""
    d = tmp_path / "other-tok"
    shutil.copytree(tiny_policy, d)
    tok = embedded_tokenizer.__class__.from_pretrained(tiny_policy)
    tok.add_tokens(["<logitstore_extra>"])
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("case", ["tokenizer", "missing", "not_a_model", "no_generate"])
def test_bad_policies_are_refused_with_one_line_and_nothing_written(case, tiny_teacher, prompts, tmp_path, capsys,
                                                                    request):
    out = tmp_path / "out"
    if case == "tokenizer":
        extra = ["--responses-from", str(request.getfixturevalue("other_tokenizer_policy"))]
        want = "tokenizer fingerprint"
    elif case == "missing":
        extra, want = ["--responses-from", str(tmp_path / "nope")], "no such directory"
    elif case == "not_a_model":
        (tmp_path / "empty").mkdir()
        extra, want = ["--responses-from", str(tmp_path / "empty")], "not a model directory"
    if case == "no_generate":
        code = main(["build", str(tiny_teacher), str(prompts), "-o", str(out), "--top-k", "8", "-q",
                     "--responses-from", str(tmp_path)])
        want = "give --generate N"
    else:
        code = build(tiny_teacher, prompts, out, *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and want in err, err
    assert err.startswith("logitstore build: --responses-from")
    assert not out.exists()
