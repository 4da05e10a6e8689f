"""Verifiers on known right and wrong answers; generation mode: reproducible, temperature-1 values, resume."""

import json
import sys

import numpy as np
import pytest

import logitstore
from builders.verifiers import get_verifier
from logitstore.errors import InvalidInputError
from logitstore.verify import verify
from tests.builders.conftest import reference_logprobs
from tools.cli import main


@pytest.mark.parametrize("spec,response,answer,want", [
    ("exact", " 42 ", "42", True),
    ("exact", "42.", "42", False),
    ("exact", "anything", None, None),
    ("last-number", "12 + 30 = 42.", "42", True),
    ("last-number", "12 + 30 = 32, which is the result of 32.", "42", False),
    ("last-number", "The total is 1,000 apples", "1000", True),
    ("last-number", "It is -3.50", "-3.5", True),
    ("last-number", "no digits at all", "7", False),
    ("last-number", "x", None, None),
    (r"regex:answer is (\w+)", "so the answer is Paris.", "Paris", True),
    (r"regex:answer is (\w+)", "so the answer is Rome.", "Paris", False),
    ("regex:^Yes", "Yes, it is.", None, True),
    ("regex:^Yes", "No.", None, False),
])
def test_builtin_verifiers(spec, response, answer, want):
    assert get_verifier(spec)(response, answer) == want


def test_user_verifier_by_import_path_and_bad_specs(tmp_path, monkeypatch):
    (tmp_path / "myverify.py").write_text("def check(response, answer):\n    return answer in response\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = get_verifier("myverify:check")
    assert f("the answer: 42", "42") is True and f("nope", "42") is False
    for bad in ("nosuchmodule:f", "myverify:missing", "regex:(", "justaname"):
        with pytest.raises(InvalidInputError):
            get_verifier(bad)
    sys.modules.pop("myverify", None)


def write_prompts(path):
    rows = [{"messages": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4"},
            {"prompt": "Count: one two", "answer": "three"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def build(teacher, data, out, *extra):
    return main(["build", str(teacher), str(data), "-o", str(out), "--top-k", "8", "--values", "fp32", "-q",
                 "--generate", "2", "--max-new-tokens", "6", "--temperature", "0.7", "--verifier", "exact", *extra])


def content(path):
    return {s.seq_id: (s.record, s.sample, s.correct, s.input_ids.tolist(), s.pos.tolist(), s.logprobs.tolist())
            for s in logitstore.open(path)}


def test_generation_is_reproducible_and_caches_temperature_one_values(tiny_teacher, tmp_path):
    data = tmp_path / "p.jsonl"
    write_prompts(data)
    assert build(tiny_teacher, data, tmp_path / "a") == 0
    assert build(tiny_teacher, data, tmp_path / "b") == 0
    assert build(tiny_teacher, data, tmp_path / "c", "--seed", "1") == 0
    a, b, c = content(tmp_path / "a"), content(tmp_path / "b"), content(tmp_path / "c")
    assert a == b and a != c  # same seed, same samples; another seed, other samples
    cache = logitstore.open(tmp_path / "a")
    assert verify(tmp_path / "a") == []
    assert sorted((s.record, s.sample) for s in cache) == [(r, j) for r in range(3) for j in range(2)]
    assert cache.manifest.build["generation"]["n"] == 2
    for seq in cache:
        # a random tiny teacher does not say "4" or "three"; record 2 has no answer, so no verdict (NULL)
        assert seq.correct is (None if seq.record == 2 else False)
        assert seq.pos[-1] == seq.n_tokens - 1 and seq.pos.size == seq.n_positions <= 6
        assert np.all(np.diff(seq.pos) == 1)  # the response tokens, contiguous, to the end
        ref = reference_logprobs(tiny_teacher, seq.input_ids)[seq.pos - 1]  # temperature 1, not 0.7
        np.testing.assert_allclose(seq.logprobs, np.sort(ref, -1)[:, ::-1][:, :8], atol=1e-4)


def test_resuming_a_finished_generation_build_adds_nothing(tiny_teacher, tmp_path):
    data = tmp_path / "p.jsonl"
    write_prompts(data)
    out = tmp_path / "a"
    assert build(tiny_teacher, data, out) == 0
    before = content(out)
    assert build(tiny_teacher, data, out, "--resume") == 0
    assert content(out) == before and logitstore.open(out).manifest.duplicates_skipped == 0
    assert build(tiny_teacher, data, out, "--resume", "--seed", "3") == 2  # another seed: refused


def test_generation_flag_errors(tiny_teacher, tmp_path):
    data = tmp_path / "p.jsonl"
    write_prompts(data)
    base = ["build", str(tiny_teacher), str(data), "-o", str(tmp_path / "x"), "--top-k", "4", "-q"]
    assert main(base + ["--verifier", "exact"]) == 2  # a verifier without --generate
    assert main(base + ["--generate", "2", "--temperature", "0"]) == 2  # greedy twice is the same sample


def test_generation_counts_prompts_that_do_not_fit(tiny_teacher, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "one two"}) + "\n" +
                    json.dumps({"prompt": " ".join(["word"] * 40)}) + "\n")
    out = tmp_path / "g"
    assert main(["build", str(tiny_teacher), str(data), "-o", str(out), "--top-k", "4", "-q", "--generate", "2",
                 "--max-new-tokens", "4", "--max-length", "12"]) == 0
    cache = logitstore.open(out)
    assert {s.record for s in cache} == {0}
    assert cache.manifest.build["skipped"]["counts"] == {"too_long": 1}


def test_generation_checks_chats_and_answers_like_scoring(tmp_path):
    """Prompts go through the same chat validation and answer encoding as scored records."""
    from builders.data import BadRecordError, Fields, answer_of
    from builders.generate import load_prompts

    class Tok:  # enough of a tokenizer for the validation path
        bos_token_id = None
        chat_template = "x"
        all_special_ids = []
        added_tokens_decoder = {}

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [[1]] * len(text) if isinstance(text, list) else [1]}

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(BadRecordError, match="robot"):
        list(load_prompts(data, Tok()))
    assert answer_of({"answer": True}, Fields()) == "true" and answer_of({"answer": 42}, Fields()) == "42"
