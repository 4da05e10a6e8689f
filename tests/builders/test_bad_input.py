"""Bad input to ``logitstore build``, case by case (the table in RELIABILITY.md): under ``--on-bad error`` one
line naming file, line and field, exit 2 and nothing left behind; under ``--on-bad skip`` a count per reason in
the manifest and in the printed summary. Duplicate records are written once and counted, the same way whether
or not the build was interrupted. A second teacher whose tokenizer or vocabulary differs is refused.

The per-record cases of ``builders.data`` are tested in ``test_data.py`` (``BAD``); here they go through the
command line, plus the decoder limits and lone surrogates that were found uncaught. Most builds use a fake
backend registered for the test (the real tokenizer, deterministic made-up scores, no model), so that each
case costs no teacher load; one build runs the real tiny teacher over all the cases at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import logitstore
from builders import backends
from builders.backends.base import Scored
from builders.data import BadRecordError, SkipReport, load_examples
from logitstore.identity import tokenizer_record
from logitstore.verify import verify
from tools.cli import main

GOOD = b'{"text": "A good record comes first."}'
LONG = json.dumps({"text": "one more plain sentence of text, " * 30}).encode()
CHAT = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})

#: (case, the line, skip reason, field the message names, words the message must hold)
CASES = [
    ("invalid JSON", b'{"text": "unterminated"', "invalid_json", None, "not valid JSON"),
    ("JSON nested too deeply", b"[" * 50_000 + b"]" * 50_000, "invalid_json", None, "nested too deeply"),
    ("integer past the decoder's limit", b'{"text": "a b", "answer": 1' + b"0" * 5000 + b"}", "invalid_json", None,
     "4300 digits"),
    ("non-UTF-8 bytes", b'{"text": "caf\xe9 in latin-1"}', "invalid_utf8", None, "not valid UTF-8"),
    ("lone surrogate in text", b'{"text": "abc \\ud800 def"}', "invalid_utf8", "text", "lone surrogate"),
    ("lone surrogate in a message", json.dumps({"messages": [{"role": "user", "content": "hi \udc80"},
                                                              {"role": "assistant", "content": "ok"}]}).encode(),
     "invalid_utf8", "messages", "lone surrogate"),
    ("not an object", b'["a", "list"]', "not_object", None, "not an object"),
    ("missing fields", b'{"title": "x", "body": "y"}', "no_known_field", None, "none of the fields"),
    ("mistyped field", b'{"text": 42}', "wrong_type", "text", "must be a string"),
    ("mistyped message", b'{"messages": [{"role": "user", "content": 5}]}', "wrong_type", "messages",
     "must be an object with string"),
    ("empty text", b'{"text": " \\n "}', "empty_text", "text", "is empty"),
    ("empty response", b'{"prompt": "q", "response": ""}', "empty_response", "response", "is empty"),
    ("nothing to predict", b'{"text": "Hello"}', "too_short", None, "no target"),
    ("unknown role", json.dumps({"messages": [{"role": "narrator", "content": "x"},
                                              {"role": "assistant", "content": "y"}]}).encode(),
     "unknown_role", "messages", "allowed roles"),
    ("no assistant turn", b'{"messages": [{"role": "user", "content": "hi"}]}', "no_assistant", "messages",
     "no assistant turn"),
]


# ---------------------------------------------------------------- a backend without a model


class FakeBackend:
    """The real tokenizer of the teacher directory, and made-up but valid scores: the label and the next ids with
    fixed logprobs. Records what it scored."""

    exactness: dict = {}
    vocab_size = 49152
    max_positions = None  # no context limit of its own
    scored: list = []  # seq token tuples, over the life of the test
    fail_after: int | None = None  # raise after this many score calls (a crash mid-build)
    _tokenizers: dict = {}

    def __init__(self, teacher, **options):
        from transformers import AutoTokenizer

        if teacher not in self._tokenizers:
            self._tokenizers[teacher] = AutoTokenizer.from_pretrained(teacher)
        self.tokenizer = self._tokenizers[teacher]
        self.teacher = teacher

    def describe(self):
        return {"id": "fake", "revision": "0", "dtype": "fp32"}

    def options(self):
        return {}

    def tokenizer_record(self):
        return tokenizer_record(self.tokenizer)

    def score(self, input_ids, positions, rule, generator=None):
        if FakeBackend.fail_after is not None and len(FakeBackend.scored) >= FakeBackend.fail_after:
            raise RuntimeError("the teacher crashed")
        out = []
        lp = np.array([-0.5, -1.5, -2.5, -3.5], np.float32)[:rule.k]
        for ids, pos in zip(input_ids, positions):
            FakeBackend.scored.append(tuple(int(t) for t in ids))
            labels = np.asarray(ids, np.int64)[pos]
            entries = (labels[:, None] + np.arange(lp.size)[None, :]) % self.vocab_size
            n = len(pos)
            out.append(Scored(ids=entries.astype(np.int32), logprobs=np.tile(lp, (n, 1)),
                              n_entries=np.full(n, lp.size, np.int32), label_logprob=np.full(n, lp[0], np.float32),
                              entropy=np.full(n, 2.0, np.float32),
                              tail_mass=np.full(n, 1 - np.exp(lp.astype(np.float64)).sum(), np.float32),
                              argmax=entries[:, 0].astype(np.int32)))
        return out


class OtherTokenizerBackend(FakeBackend):
    def tokenizer_record(self):
        return {**super().tokenizer_record(), "fingerprint": "0123456789abcdef"}


class OtherVocabBackend(FakeBackend):
    vocab_size = 49152 + 64


@pytest.fixture
def fake(monkeypatch):
    for name, cls in (("fake", "FakeBackend"), ("fake-other-tokenizer", "OtherTokenizerBackend"),
                      ("fake-other-vocab", "OtherVocabBackend")):
        monkeypatch.setitem(backends.REGISTRY, name, f"tests.builders.test_bad_input:{cls}")
    FakeBackend.scored, FakeBackend.fail_after = [], None
    yield FakeBackend
    FakeBackend.fail_after = None


def _build(teacher, data, out, *extra, backend="fake"):
    return main(["build", str(teacher), str(data), "-o", str(out), "--top-k", "4", "-q", "--backend", backend,
                 *map(str, extra)])


# ---------------------------------------------------------------- each case, under both policies


@pytest.mark.parametrize("line,reason,field,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_mode_names_file_line_and_field(tiny_teacher, embedded_tokenizer, tmp_path, capsys, fake, line, reason,
                                              field, words):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(GOOD + b"\n\n" + line + b"\n")  # the bad record is on line 3
    out = tmp_path / "c"
    capsys.readouterr()
    assert _build(tiny_teacher, data, out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("logitstore build: bad.jsonl:3: ") and words in err, err
    assert field is None or f"field '{field}'" in err
    assert not out.exists()  # a failed first build leaves nothing behind
    report = SkipReport()  # and the same record under skip: counted under its reason, the good one kept
    assert [e.record for e in load_examples(data, embedded_tokenizer, on_bad="skip", report=report)] == [0]
    assert report.counts == {reason: 1}


@pytest.mark.parametrize("name,content,words", [
    ("empty.jsonl", b"", "no records in"),
    ("blank.jsonl", b"\n \n\t\n", "no records in"),
    ("latin1.json", b'[{"text": "caf\xe9"}]', "not valid UTF-8"),
    ("deep.json", b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
])
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_unusable_files_fail_in_both_modes(tiny_teacher, tmp_path, capsys, fake, name, content, words, policy):
    (tmp_path / name).write_bytes(content)
    capsys.readouterr()
    assert _build(tiny_teacher, tmp_path / name, tmp_path / "c", "--on-bad", policy) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("logitstore build: ") and name in err and words in err, err
    assert not (tmp_path / "c").exists()


def test_surrogates_and_decoder_limits_are_bad_records_at_the_data_level(embedded_tokenizer, tmp_path):
    """The cases that used to escape as TypeError / RecursionError / ValueError, through ``load_examples``."""
    for case, line, reason, field, words in CASES[1:6]:
        path = tmp_path / "bad.jsonl"
        path.write_bytes(GOOD + b"\n" + line + b"\n")
        with pytest.raises(BadRecordError) as info:
            list(load_examples(path, embedded_tokenizer))
        assert (info.value.reason, info.value.location, info.value.field) == (reason, "bad.jsonl:2", field), case
        assert words in str(info.value) and "\n" not in str(info.value)


def test_skip_mode_counts_every_case_in_the_manifest_and_the_summary(tiny_teacher, tmp_path, capsys):
    """One real build (the tiny teacher) over all the cases, a too-long record, a duplicate and good records."""
    lines = [GOOD, b""] + [c[1] for c in CASES] + [LONG, GOOD, CHAT.encode(),
                                                     b'{"prompt": "Q: what is cached?", "response": " Sparse logits."}']
    data = tmp_path / "all.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "c"
    capsys.readouterr()
    assert main(["build", str(tiny_teacher), str(data), "-o", str(out), "--top-k", "4", "-q", "--on-bad", "skip",
                 "--max-length", "64", "--on-long", "skip"]) == 0
    summary = capsys.readouterr().out
    want = {}
    for c in CASES:
        want[c[2]] = want.get(c[2], 0) + 1
    want["too_long"] = 1
    m = logitstore.open(out).manifest
    assert m.build["skipped"]["counts"] == want
    assert m.duplicates_skipped == 1
    assert m.sequences == 3
    records = sorted(logitstore.open(out).scalars(["record"]).column(0).to_pylist())
    assert records == [0, len(lines) - 2, len(lines) - 1]  # the first GOOD, the chat and the prompt+response
    assert "skipped or changed: " + ", ".join(f"{k} {v}" for k, v in sorted(want.items())) in summary
    assert "duplicates: 1 " in summary
    assert verify(out) == []


# ---------------------------------------------------------------- duplicates


def _records_with_duplicates(path: Path, n_unique: int, n_dup: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    words = "teacher student cache token logit entropy shard manifest parquet query".split()
    unique = [json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(5, 30))))}) for _ in range(n_unique)]
    lines = list(unique)
    for i in rng.choice(n_unique, n_dup):  # a copy of an earlier record, placed after it
        at = int(rng.integers(i + 1, len(lines) + 1))
        lines.insert(at, unique[i])
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def test_duplicates_are_scored_once_and_counted_the_same_after_a_crash(tiny_teacher, tmp_path, fake):
    data = tmp_path / "d.jsonl"
    _records_with_duplicates(data, 60, 15)
    small = ["--token-budget", "256", "--shard-mb", "0.002", "--row-group-positions", "40"]
    assert _build(tiny_teacher, data, tmp_path / "full", *small) == 0
    full = logitstore.open(tmp_path / "full")
    assert full.manifest.duplicates_skipped == 15 and len(full) == 60
    assert len(fake.scored) == len(set(fake.scored)) == 60  # no record was scored twice
    fake.scored, fake.fail_after = [], 40  # crash after 40 sequences were scored
    with pytest.raises(RuntimeError, match="crashed"):
        _build(tiny_teacher, data, tmp_path / "c", *small)
    partial = logitstore.open(tmp_path / "c")
    assert 0 < len(partial) < 60
    fake.scored, fake.fail_after = [], None
    assert _build(tiny_teacher, data, tmp_path / "c", *small, "--resume") == 0
    assert len(fake.scored) == len(set(fake.scored)) == 60 - len(partial)  # the rest, each once
    resumed = logitstore.open(tmp_path / "c")
    assert resumed.manifest.duplicates_skipped == 15
    assert sorted(resumed.scalars(["seq_id"]).column(0).to_pylist()) == \
        sorted(full.scalars(["seq_id"]).column(0).to_pylist())
    assert verify(tmp_path / "c") == []


def test_a_cache_started_before_a_setting_existed_resumes_at_its_default(tiny_teacher, tmp_path, capsys, fake):
    """A build record written before a sub-setting existed (here ``fields.answer``) resumes where the new command
    keeps that setting at its default, and is refused where it does not."""
    from logitstore.manifest import CHECKSUM_KEY, manifest_checksum

    data, out = tmp_path / "d.jsonl", tmp_path / "c"
    _records_with_duplicates(data, 30, 0)
    small = ["--token-budget", "256", "--shard-mb", "0.002", "--row-group-positions", "40"]
    fake.fail_after = 20
    with pytest.raises(RuntimeError, match="crashed"):
        _build(tiny_teacher, data, out, *small)
    fake.fail_after = None
    assert 0 < len(logitstore.open(out)) < 30
    m = json.loads((out / "manifest.json").read_text())
    del m["build"]["fields"]["answer"]  # as a logitstore from before the answer field wrote it
    m[CHECKSUM_KEY] = manifest_checksum(m)
    (out / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert _build(tiny_teacher, data, out, *small, "--resume", "--answer-field", "solution") == 2
    assert "build fields: cache has" in capsys.readouterr().err
    assert _build(tiny_teacher, data, out, *small, "--resume") == 0
    assert len(logitstore.open(out)) == 30 and verify(out) == []


# ---------------------------------------------------------------- a second teacher with another tokenizer or vocabulary


@pytest.mark.parametrize("backend,field", [("fake-other-tokenizer", "tokenizer"), ("fake-other-vocab", "vocab_size")])
def test_resume_with_a_teacher_of_another_tokenizer_or_vocabulary_is_refused(tiny_teacher, tmp_path, capsys, fake,
                                                                            backend, field):
    data = tmp_path / "d.jsonl"
    _records_with_duplicates(data, 5, 0)
    out = tmp_path / "c"
    assert _build(tiny_teacher, data, out) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _build(tiny_teacher, data, out, "--resume", backend=backend) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"logitstore build: cannot resume {out}: {field}: cache has ")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_diff_refuses_caches_of_different_tokenizers(tmp_path, capsys):
    from tests.conftest import make_sequences, write_cache

    rng = np.random.default_rng(2)
    refs = make_sequences(rng, 3, vocab=50, rule=logitstore.TopK(4), min_tokens=3, max_tokens=8)
    for name, fp in (("a", "aaaaaaaaaaaaaaaa"), ("b", "bbbbbbbbbbbbbbbb")):
        write_cache(tmp_path / name, refs, vocab=50, rule=logitstore.TopK(4), tokenizer={"fingerprint": fp})
    capsys.readouterr()
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "d"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "different tokenizers" in err and "aaaaaaaaaaaaaaaa" in err and "bbbbbbbbbbbbbbbb" in err
