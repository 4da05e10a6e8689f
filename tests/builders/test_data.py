"""Tests of builders.data: every input form, the three record kinds and their loss masks, bad records, lengths.

References are independent of the code under test: plain tokenizer calls on the record's own
strings, the chat template's own text rendering (``apply_chat_template(tokenize=False)``), and
``hashlib`` over the file bytes. The real tokenizer is the embedded teacher's (SmolLM2, ChatML).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from builders.data import MAX_REPORT_EXAMPLES, Example, Fields, SkipReport, load_examples
from builders.inputs import BadRecordError, DataFormatError, data_fingerprint, iter_records
from logitstore.errors import LogitstoreError

HEADER, END = "<|im_start|>assistant\n", "<|im_end|>"  # the ChatML markers of SmolLM2's template

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42."},
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "content": "84, since 42 * 2 = 84.\nDone."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome. Ünïcödé ✓ 你好"},
]
RECORDS = [
    {"text": "The quick brown fox jumps over the lazy dog.", "answer": "fox"},
    {"prompt": "Question: what is 2 + 2?\nAnswer:", "response": " 4, because two and two make four.", "answer": "4"},
    {"messages": CHAT, "answer": "84"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},  # default system
    {"text": "Héllo wörld — naïve café 你好 ✓"},
]


@pytest.fixture(scope="session")
def tok():
    """SmolLM2's tokenizer (its first preparation dequantises the teacher once, ~30 s; later loads take < 1 s)."""
    from transformers import AutoTokenizer

    from builders.embedded import prepare_embedded_teacher

    return AutoTokenizer.from_pretrained(prepare_embedded_teacher())


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_zst(path, records):
    """Two zstd frames (as concatenated or appended files have), read as one stream."""
    lines = [(json.dumps(r) + "\n").encode() for r in records]
    c = zstandard.ZstdCompressor()
    path.write_bytes(c.compress(b"".join(lines[:2])) + c.compress(b"".join(lines[2:])))
    return path


def rows(records):
    """The records with every column present (None where absent), as tables and datasets hold them."""
    keys = sorted({k for r in records for k in r})
    return [{k: r.get(k) for k in keys} for r in records]


def save_dataset(path, records, split=None, other_splits=()):
    import datasets

    ds = datasets.Dataset.from_list(rows(records))
    if split is not None:
        ds = datasets.DatasetDict({split: ds, **{s: ds.select([0]) for s in other_splits}})
    ds.save_to_disk(str(path))
    return path


def write_json(path, doc):
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path


def write_parquet(path, records, row_group_size=None):
    pq.write_table(pa.Table.from_pylist(rows(records)), path, row_group_size=row_group_size)
    return path


WRITERS = {  # form -> (folder, records) -> path
    "jsonl": lambda d, r: write_jsonl(d / "data.jsonl", r),
    "jsonl.gz": lambda d, r: write_jsonl(d / "data.jsonl.gz", r, gzip.open),
    "jsonl.zst": lambda d, r: write_zst(d / "data.jsonl.zst", r),
    "json-list": lambda d, r: write_json(d / "data.json", r),
    "json-data": lambda d, r: write_json(d / "data.json", {"data": r}),
    "parquet": lambda d, r: write_parquet(d / "data.parquet", r, row_group_size=2),  # several row groups
    "dataset": lambda d, r: save_dataset(d / "ds", r),
    "datasetdict": lambda d, r: save_dataset(d / "dd", r, "train", ("test",)),
}


def assert_same(got: list[Example], want: list[Example]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.record, g.prompt_len, g.answer, g.kind) == (w.record, w.prompt_len, w.answer, w.kind)
        assert g.input_ids.dtype == np.int32 and g.loss_mask.dtype == bool
        np.testing.assert_array_equal(g.input_ids, w.input_ids)
        np.testing.assert_array_equal(g.loss_mask, w.loss_mask)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


# ---------------------------------------------------------------- the three kinds, against references


def test_text_every_token_after_the_first_is_a_target(tok, tmp_path):
    exs = list(load_examples(write_jsonl(tmp_path / "t.jsonl", [RECORDS[0], RECORDS[4]]), tok))
    for ex, rec in zip(exs, [RECORDS[0], RECORDS[4]]):
        ref = tok(rec["text"])["input_ids"]
        assert ex.kind == "text" and ex.prompt_len == 0 and ex.answer == rec.get("answer")
        np.testing.assert_array_equal(ex.input_ids, ref)
        np.testing.assert_array_equal(ex.loss_mask, [False] + [True] * (len(ref) - 1))
        assert tok.decode(ex.input_ids) == rec["text"]


@pytest.mark.parametrize("prompt,response", [
    (RECORDS[1]["prompt"], RECORDS[1]["response"]),
    ("The answer is fort", "y-two"),  # tokenised jointly, the boundary would fall inside a token
    ("", "Just a response."),
])
def test_prompt_response_targets_are_exactly_the_response_tokens(tok, tmp_path, prompt, response):
    ex, = load_examples(write_jsonl(tmp_path / "pr.jsonl", [{"prompt": prompt, "response": response}]), tok)
    p_ref = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ref = tok(response, add_special_tokens=False)["input_ids"]
    assert ex.kind == "prompt_response" and ex.answer is None
    np.testing.assert_array_equal(ex.input_ids, p_ref + r_ref)
    np.testing.assert_array_equal(ex.input_ids[ex.loss_mask], r_ref if p_ref else r_ref[1:])
    assert tok.decode(ex.input_ids[len(p_ref):]) == response and tok.decode(ex.input_ids) == prompt + response
    assert ex.prompt_len == max(len(p_ref), 1) and ex.loss_mask[ex.prompt_len]


@pytest.mark.parametrize("messages", [CHAT, RECORDS[3]["messages"], CHAT[1:3] + [dict(CHAT[4], content="")]],
                         ids=["system-3-turns", "default-system", "empty-reply"])
def test_chat_targets_are_assistant_contents_and_end_of_turn(tok, tmp_path, messages):
    """Targets decode to each assistant content + <|im_end|>, at the place the template's own text puts it."""
    ex, = load_examples(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]), tok)
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert ex.kind == "messages" and tok.decode(ex.input_ids) == rendered
    want, at = [], 0
    for m in messages:
        if m["role"] == "assistant":
            at = rendered.index(HEADER + m["content"] + END, at) + len(HEADER)
            want.append((at, m["content"] + END))
    spans = runs(ex.loss_mask)
    assert len(spans) == len(want)
    for (a, b), (char_at, text) in zip(spans, want):
        assert tok.decode(ex.input_ids[a:b]) == text
        assert tok.decode(ex.input_ids[:a]) == rendered[:char_at]  # the header and everything before is context
    assert ex.prompt_len == spans[0][0]
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prefix = tok.apply_chat_template(messages[:first], tokenize=False, add_generation_prompt=True)
    assert ex.prompt_len == len(tok(prefix, add_special_tokens=False)["input_ids"])  # generation starts here


def test_kind_precedence_and_answers(tok, tmp_path):
    recs = [
        {"messages": RECORDS[3]["messages"], "text": "ignored", "prompt": "p", "response": "r", "answer": 42},
        {"prompt": "Say hi.", "response": " Hi there.", "text": "ignored", "answer": ["a", "b"]},
        {"text": "Hello there, world.", "prompt": "p", "answer": {"x": 1.5}},  # prompt without response: text
        {"text": "Hello there, world.", "answer": None, "response": None},
    ]
    exs = list(load_examples(write_jsonl(tmp_path / "k.jsonl", recs), tok))
    assert [e.kind for e in exs] == ["messages", "prompt_response", "text", "text"]
    assert [e.answer for e in exs] == ["42", '["a", "b"]', '{"x": 1.5}', None]


def test_bos_is_prepended_when_the_tokenizer_adds_one(tmp_path):
    """A word-level tokenizer whose post-processor adds <s>: prompt+response and text start with it."""
    t = tiny_tokenizer()
    assert t("two plus two")["input_ids"][0] == 1
    path = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "what is two plus two", "response": "four"},
                                              {"text": "hello world"}])
    pr, text = load_examples(path, t)
    np.testing.assert_array_equal(pr.input_ids, t("what is two plus two four")["input_ids"])
    assert pr.input_ids[0] == 1 and pr.prompt_len == 6
    np.testing.assert_array_equal(pr.loss_mask, [False] * 6 + [True])
    np.testing.assert_array_equal(text.input_ids, [1] + t("hello world", add_special_tokens=False)["input_ids"])
    np.testing.assert_array_equal(text.loss_mask, [False, True, True])


def tiny_tokenizer(chat_template=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "user assistant system end hello world what is two plus two four the answer yes no".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tk = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tk.chat_template = chat_template
    return tk


def sentencepiece_like():
    """A SentencePiece-style tokenizer (Llama 2, Mistral): spaces as "▁", a "▁" put before every encoded text (the
    dummy prefix), byte fallback, <s> added in front."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", *"aehinorstuw4.:?", "▁t", "▁th",
              "▁the", "an", "er"]
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("a", "n"), ("e", "r")]
    t = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, byte_fallback=True, unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("prompt,response", [("Q: what is two plus two?", " four."), ("the answer is", " 4"),
                                             ("the answer is ", "4")])
def test_prompt_response_of_a_tokenizer_with_a_dummy_prefix(tmp_path, prompt, response):
    """A tokenizer that puts "▁" before every text it encodes would put one before a response encoded on its own,
    a space the record does not have: the sequence is the joint text's tokens, the targets those after the
    prompt's."""
    t = sentencepiece_like()
    alone = t(response, add_special_tokens=False)["input_ids"]
    assert t.convert_ids_to_tokens(alone)[0].startswith("▁")  # what encoding the response on its own gives
    ex, = load_examples(write_jsonl(tmp_path / "pr.jsonl", [{"prompt": prompt, "response": response}]), t)
    joint = t(prompt + response)["input_ids"]
    p_ref = t(prompt)["input_ids"]
    np.testing.assert_array_equal(ex.input_ids, joint)
    np.testing.assert_array_equal(ex.loss_mask, np.arange(len(joint)) >= len(p_ref))
    assert t.decode(ex.input_ids, skip_special_tokens=True) == prompt + response


def test_chat_end_marker_on_a_word_level_tokenizer(tmp_path):
    """Another tokenizer family and template: the end-of-turn marker is the special </s>, nothing after it."""
    template = ("{% for m in messages %}{{ m.role }} {{ m.content }} </s> {% endfor %}"
                "{% if add_generation_prompt %}assistant {% endif %}")
    t = tiny_tokenizer(template)
    chat = [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"},
            {"role": "user", "content": "yes"}, {"role": "assistant", "content": "the answer is four"}]
    ex, = load_examples(write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}]), t)

    def enc(s):
        return t(s, add_special_tokens=False)["input_ids"]

    np.testing.assert_array_equal(ex.input_ids, enc(t.apply_chat_template(chat, tokenize=False)))
    assert [ex.input_ids[a:b].tolist() for a, b in runs(ex.loss_mask)] == [enc("four </s>"),
                                                                          enc("the answer is four </s>")]


@pytest.mark.parametrize("marker", ["<|im_end|>", ""])
def test_whitespace_after_the_turn_is_a_target_only_without_a_special_marker(tok, tmp_path, marker):
    """'{role}:{content}MARKER\\n': with a special marker the targets stop at it (the newline is never generated);
    with none, nothing tells where the turn ends, so the whole turn, newline included, is the target."""
    chat = copy.copy(tok)
    chat.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}" + marker + "\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes, quite sure."}]
    ex, = load_examples(write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]), chat)
    assert tok.decode(ex.input_ids) == chat.apply_chat_template(msgs, tokenize=False)
    tail = marker or "\n"
    assert [tok.decode(ex.input_ids[a:b]) for a, b in runs(ex.loss_mask)] == [" It is 4." + tail,
                                                                           " Yes, quite sure." + tail]


# ---------------------------------------------------------------- forms and fields


@pytest.mark.parametrize("form", list(WRITERS))
def test_every_form_gives_the_same_examples(tok, tmp_path, form):
    want = list(load_examples(write_jsonl(tmp_path / "ref.jsonl", RECORDS), tok))
    assert [e.record for e in want] == list(range(len(RECORDS)))
    (tmp_path / form).mkdir()
    assert_same(list(load_examples(WRITERS[form](tmp_path / form, RECORDS), tok)), want)


def test_custom_field_names(tok, tmp_path):
    rename = {"text": "body", "messages": "conv", "prompt": "question", "response": "reply", "answer": "gold"}
    names = Fields(**rename)
    renamed = [{rename[k]: v for k, v in r.items()} for r in RECORDS]
    want = list(load_examples(write_jsonl(tmp_path / "a.jsonl", RECORDS), tok))
    assert_same(list(load_examples(write_jsonl(tmp_path / "b.jsonl", renamed), tok, fields=names)), want)
    with pytest.raises(BadRecordError, match="c.jsonl:1: field 'body': must be a string"):
        list(load_examples(write_jsonl(tmp_path / "c.jsonl", [{"body": 3}]), tok, fields=names))
    with pytest.raises(BadRecordError, match="none of the fields 'conv', 'question' and 'reply', or 'body'"):
        list(load_examples(write_jsonl(tmp_path / "d.jsonl", [{"text": "default name"}]), tok, fields=names))


def test_blank_lines_are_ignored_and_lines_keep_their_index(tok, tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_bytes(b"\n" + b'{"text": "Hello there, world."}\r\n' + b"  \t\n\n" + b'{"text": "Second one here."}')
    report = SkipReport()
    assert [(i, loc) for i, loc, _ in iter_records(path)] == [(1, "blank.jsonl:2"), (4, "blank.jsonl:5")]
    assert [e.record for e in load_examples(path, tok, report=report, on_bad="skip")] == [1, 4]
    assert report.counts == {} and report.examples == []


def test_dataset_dict_split_choice(tok, tmp_path):
    only = save_dataset(tmp_path / "only", RECORDS[:1], "validation")
    assert [loc for _, loc, _ in iter_records(only)] == ["only[validation] row 0"]
    train = save_dataset(tmp_path / "train", RECORDS[:2], "train", ("test",))
    assert [loc for _, loc, _ in iter_records(train)] == ["train[train] row 0", "train[train] row 1"]
    two = save_dataset(tmp_path / "two", RECORDS[:1], "a", ("b",))
    with pytest.raises(DataFormatError, match=r"\['a', 'b'\].*'train'"):
        iter_records(two)


# ---------------------------------------------------------------- bad records

GOOD = b'{"text": "A good record comes first."}'
ASSISTANT = {"role": "assistant", "content": "ok"}
BAD = [  # (the line, its reason, the field the message must name)
    (b'{"text": "unterminated"', "invalid_json", None),
    (b'{"text": "caf\xe9 in latin-1"}', "invalid_utf8", None),
    (b'["a", "list"]', "not_object", None),
    (b'"a string"', "not_object", None),
    (b'{"title": "x", "body": "y"}', "no_known_field", None),
    (b'{"prompt": "a prompt without its response"}', "no_known_field", None),
    (b'{"text": 42}', "wrong_type", "text"),
    (b'{"prompt": ["q"], "response": "r"}', "wrong_type", "prompt"),
    (b'{"prompt": "q", "response": 7}', "wrong_type", "response"),
    (b'{"messages": "hi"}', "wrong_type", "messages"),
    (b'{"messages": ["hi"]}', "wrong_type", "messages"),
    (b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "wrong_type", "messages"),
    (b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}', "wrong_type",
     "messages"),
    (json.dumps({"messages": [{"role": "narrator", "content": "x"}, ASSISTANT]}).encode(), "unknown_role",
     "messages"),
    (b'{"text": ""}', "empty_text", "text"),
    (b'{"text": " \\n\\t "}', "empty_text", "text"),
    (b'{"prompt": "q", "response": ""}', "empty_response", "response"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "no_assistant", "messages"),
    (b'{"messages": []}', "no_assistant", "messages"),
    (json.dumps({"messages": [ASSISTANT, {"role": "user", "content": "hi"}]}).encode(), "assistant_first",
     "messages"),
    (b'{"text": "Hello"}', "too_short", None),  # one token: nothing to predict
    (b'{"prompt": "", "response": "Hello"}', "too_short", None),
]


@pytest.mark.parametrize("line,reason,field", BAD, ids=[f"{r}-{i}" for i, (_, r, _) in enumerate(BAD)])
def test_bad_record_raises_or_is_counted(tok, tmp_path, line, reason, field):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD + b"\n\n" + line + b"\n")  # the bad record is on line 3
    it = load_examples(path, tok)
    assert next(it).record == 0
    with pytest.raises(BadRecordError) as info:
        next(it)
    err = info.value
    assert isinstance(err, LogitstoreError) and isinstance(err, ValueError)
    assert (err.reason, err.location, err.field) == (reason, "bad.jsonl:3", field)
    assert str(err).startswith("bad.jsonl:3: ") and (field is None or f"field '{field}'" in str(err))
    report = SkipReport()
    assert [e.record for e in load_examples(path, tok, on_bad="skip", report=report)] == [0]
    assert report.counts == {reason: 1} and report.examples == [str(err)]


def test_template_errors_are_bad_records(tok, tmp_path):
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [chat])
    refusing = copy.copy(tok)
    refusing.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(BadRecordError, match="c.jsonl:1: field 'messages': .*roles must alternate") as info:
        list(load_examples(path, refusing))
    assert info.value.reason == "template_error"
    last_differs = copy.copy(tok)  # renders the last message differently, so prefixes are not prefixes
    last_differs.chat_template = "{% for m in messages %}{% if loop.last %}>{% endif %}{{ m.content }}\n{% endfor %}"
    with pytest.raises(BadRecordError, match="not a token prefix") as info:
        list(load_examples(path, last_differs))
    assert info.value.reason == "template_mismatch"
    with pytest.raises(DataFormatError, match="needs a tokenizer with a chat template"):  # not skippable
        list(load_examples(path, tiny_tokenizer(), on_bad="skip"))


@pytest.mark.parametrize("form,location", [("json", "bad.json[1]"), ("parquet", "bad.parquet row 1"),
                                           ("dataset", "bad row 1")])
def test_bad_records_in_other_forms_name_element_or_row(tok, tmp_path, form, location):
    recs = [{"text": "A good record comes first."}, {"text": ""}]
    path = {"json": lambda: write_json(tmp_path / "bad.json", recs),
            "parquet": lambda: write_parquet(tmp_path / "bad.parquet", recs),
            "dataset": lambda: save_dataset(tmp_path / "bad", recs)}[form]()
    with pytest.raises(BadRecordError, match=f"^{re.escape(location)}: field 'text': "):
        list(load_examples(path, tok))
    report = SkipReport()
    assert len(list(load_examples(path, tok, on_bad="skip", report=report))) == 1
    assert report.counts == {"empty_text": 1}


def test_report_keeps_the_first_messages_and_serialises(tok, tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_bytes(b"".join(b'{"text": %d}\n' % i for i in range(MAX_REPORT_EXAMPLES + 5)) + b"{oops\n")
    report = SkipReport()
    assert list(load_examples(path, tok, on_bad="skip", report=report)) == []  # all bad: no error under skip
    assert report.counts == {"wrong_type": MAX_REPORT_EXAMPLES + 5, "invalid_json": 1}
    assert len(report.examples) == MAX_REPORT_EXAMPLES and report.examples[0].startswith("many.jsonl:1: ")
    assert json.loads(json.dumps(report.to_dict())) == {"counts": report.counts, "examples": report.examples}


# ---------------------------------------------------------------- lengths


def test_max_length_truncates_or_skips_and_never_errors(tok, tmp_path):
    recs = [{"text": "One more sentence of plain text. " * 10}, {"prompt": "Read this carefully. " * 12 + "2+2?",
                                                                    "response": " 4"}, {"messages": CHAT}]
    path = write_jsonl(tmp_path / "long.jsonl", recs)
    full = list(load_examples(path, tok))
    L = 40  # cuts the text, leaves no target of the prompt+response, cuts the chat after its first target
    assert len(full[0].input_ids) > L and full[1].prompt_len >= L and full[2].prompt_len < L < len(full[2].input_ids)
    report = SkipReport()
    got = list(load_examples(path, tok, max_length=L, report=report))  # on_bad="error": still no error
    assert [e.record for e in got] == [0, 2]
    for g, f in zip(got, [full[0], full[2]]):
        np.testing.assert_array_equal(g.input_ids, f.input_ids[:L])
        np.testing.assert_array_equal(g.loss_mask, f.loss_mask[:L])
        assert g.prompt_len == min(f.prompt_len, L)
    assert report.counts == {"truncated": 2, "too_long": 1}
    assert any(m.startswith("long.jsonl:2: too_long") for m in report.examples)
    report = SkipReport()
    assert list(load_examples(path, tok, max_length=L, on_long="skip", report=report)) == []
    assert report.counts == {"too_long": 3}
    exact = max(len(e.input_ids) for e in full)
    report = SkipReport()
    assert_same(list(load_examples(path, tok, max_length=exact, report=report)), full)
    assert report.counts == {}


# ---------------------------------------------------------------- whole-input errors and options


def test_missing_and_unsupported_inputs(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl") as info:
        load_examples(tmp_path / "nope.jsonl", tok)
    assert isinstance(info.value, LogitstoreError)
    with pytest.raises(FileNotFoundError):
        data_fingerprint(tmp_path / "nope.jsonl")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(DataFormatError, match=r"data\.csv.*\.jsonl, \.jsonl\.gz, \.jsonl\.zst, \.json"):
        load_examples(tmp_path / "data.csv", tok)
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataFormatError, match="not a saved dataset"):
        iter_records(tmp_path / "dir")


@pytest.mark.parametrize("name,content,match", [
    ("empty.jsonl", b"", "no records in"),
    ("blank.jsonl", b"\n  \n\n", "no records in"),
    ("empty.json", b"[]", "no records in"),
    ("bad.json", b'[{"text": "a"},\n {"text": }]', r"bad\.json:2:\d+: the file is not valid JSON"),
    ("scalar.json", b"3", "must be a list of records"),
    ("nodata.json", b'{"rows": []}', "without a 'data' list"),
    ("broken.jsonl.gz", b"this is not gzip", "cannot read the jsonl.gz stream"),
    ("broken.jsonl.zst", b"this is not zstd", "cannot read the jsonl.zst stream"),
    ("broken.parquet", b"PAR1 not really", "not a readable Parquet file"),
])
def test_unreadable_or_empty_inputs_fail_in_both_modes(tok, tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    for on_bad in ("error", "skip"):
        with pytest.raises(DataFormatError, match=match):
            list(load_examples(tmp_path / name, tok, on_bad=on_bad))


@pytest.mark.parametrize("kwargs,match", [
    ({"on_long": "cut"}, "on_long='cut' is not one of"),
    ({"on_bad": "warn"}, "on_bad='warn' is not one of"),
    ({"max_length": 1}, "max_length=1 must be"),
    ({"max_length": True}, "max_length=True must be"),
    ({"max_length": 8.0}, "max_length=8.0 must be"),
    ({"fields": Fields(text="")}, "field name text=''"),
])
def test_options_are_checked_at_call_time(tok, tmp_path, kwargs, match):
    path = write_jsonl(tmp_path / "ok.jsonl", RECORDS[:1])
    with pytest.raises(LogitstoreError, match=match) as info:
        load_examples(path, tok, **kwargs)
    assert isinstance(info.value, ValueError)


def test_fingerprint_is_the_bytes_hash_and_follows_every_byte(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    data = path.read_bytes()
    assert data_fingerprint(path) == hashlib.sha256(data).hexdigest()[:16]
    (tmp_path / "b.jsonl").write_bytes(data)
    assert data_fingerprint(tmp_path / "b.jsonl") == data_fingerprint(path)  # the name does not matter
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    (tmp_path / "b.jsonl").write_bytes(bytes(flipped))
    assert data_fingerprint(tmp_path / "b.jsonl") != data_fingerprint(path)


def test_fingerprint_of_a_saved_dataset(tmp_path):
    ds = save_dataset(tmp_path / "ds", RECORDS)
    shutil.copytree(ds, tmp_path / "copy")
    assert data_fingerprint(tmp_path / "copy") == data_fingerprint(ds)
    arrow = min((tmp_path / "copy").rglob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[-20] ^= 1
    arrow.write_bytes(bytes(data))
    assert data_fingerprint(tmp_path / "copy") != data_fingerprint(ds)
