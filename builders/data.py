"""Input data for a build: records (``builders.inputs``) turned into token sequences with a loss mask.

``builders.inputs.iter_records`` streams the records of a file (forms: ``ALLOWED_FORMS``).
``load_examples`` tokenises each record
into an ``Example`` of one of three kinds, chosen by the fields present, in this order:

- ``messages``: a chat rendered with the tokenizer's chat template. An assistant turn's targets
  are its content and the template's end-of-turn marker (ChatML's ``<|im_end|>``), so the
  student learns to stop: the tokens between the render before the turn *with* the generation
  prompt and the render through the turn, less whitespace after the marker (ChatML's ``\\n``,
  never generated since decoding stops at the marker). The turn header is context.
- ``prompt`` + ``response``: BOS (if the tokenizer adds one), then the prompt's tokens and the response's
  (no chat template): the joint text's tokens after the prompt's where the boundary falls between two
  tokens, else the response tokenised on its own (``Encoder.pair``), so the boundary is exact; the
  response tokens are the targets.
- ``text``: every token after the first is a target.

Bad records raise ``BadRecordError`` or are counted by reason in a ``SkipReport``; sequences
over ``max_length`` are truncated or skipped. ``data_fingerprint`` lets a resume refuse other data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import jinja2
import numpy as np

from builders.inputs import BadRecordError, DataFormatError, iter_records
from logitstore.errors import InvalidInputError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
ON_LONG, ON_BAD = ("truncate", "skip"), ("error", "skip")  # the values of load_examples' on_long and on_bad
MAX_REPORT_EXAMPLES = 20  # messages a SkipReport keeps for the summary


@dataclasses.dataclass
class Example:
    """One tokenised record. ``loss_mask[t]``: token ``t`` (predicted from ``input_ids[:t]``) is a target."""

    record: int  # 0-based index in the input: jsonl line (every line counted), json element, or row
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]; loss_mask[0] is False
    prompt_len: int  # tokens before the first target (0 for text); generation samples after this prefix
    answer: str | None  # the record's reference answer, as a string (non-strings JSON-encoded)
    kind: str  # "text" | "messages" | "prompt_response"


@dataclasses.dataclass(frozen=True)
class Fields:
    """Names of the record fields."""

    text: str = "text"
    messages: str = "messages"
    prompt: str = "prompt"
    response: str = "response"
    answer: str = "answer"


@dataclasses.dataclass
class SkipReport:
    """What was skipped or truncated and why: reason -> count, and the first messages (``file:line: reason``)."""

    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < MAX_REPORT_EXAMPLES:
            self.examples.append(message)
        logger.debug("%s", message)

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": list(self.examples)}


# ---------------------------------------------------------------- tokenising


class Encoder:
    """The tokenizer calls ``load_examples`` needs: plain encoding, BOS, chat rendering, end-of-turn markers."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        bos = getattr(tokenizer, "bos_token_id", None)
        added = tokenizer("a")["input_ids"][:1] != tokenizer("a", add_special_tokens=False)["input_ids"][:1]
        self.bos = [bos] if bos is not None and added and tokenizer("a")["input_ids"][:1] == [bos] else []
        self.special = set(getattr(tokenizer, "all_special_ids", None) or [])
        self.special |= {int(i) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                         if getattr(t, "special", False)}

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def pair(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """The tokens of a prompt and of its response: the joint text's tokens split after the prompt's own, where the
        joint tokens start with them (the boundary falls between two tokens), else each encoded on its own, so the
        boundary is exact either way. Joint first, since a tokenizer that puts a space before every text it encodes
        (SentencePiece's dummy prefix) would put one before the response too, which the text does not have."""
        p_ids, r_ids, joint = self.encode([prompt, response, prompt + response])
        if prompt and joint[:len(p_ids)] == p_ids and len(joint) > len(p_ids):
            return p_ids, joint[len(p_ids):]
        return p_ids, r_ids

    def turn_end(self, ids: list[int], a: int, b: int) -> int:
        """End of an assistant turn's targets in ``ids[a:b]``: through the last special token (the end-of-turn
        marker) when only whitespace tokens follow it, else the whole span."""
        k = b
        while k > a and ids[k - 1] not in self.special and not self.tok.decode([ids[k - 1]]).strip():
            k -= 1
        return k if k > a and ids[k - 1] in self.special else b


def load_examples(path: str | os.PathLike, tokenizer: Any, *, fields: Fields = Fields(), max_length: int | None = None,
                  on_long: str = "truncate", on_bad: str = "error",
                  report: SkipReport | None = None) -> Iterator[Example]:
    """The ``Example`` of each usable record of ``path`` (kinds and masks: see the module docstring).

    ``max_length`` caps the tokens of a whole sequence: ``on_long="truncate"`` keeps the
    first ``max_length`` (counted ``truncated``; ``too_long`` and skipped when no target is
    left), ``"skip"`` drops the record (``too_long``). ``on_bad="error"`` raises
    ``BadRecordError`` at the first bad record; ``"skip"`` counts it in ``report`` under its
    reason. An input with no records at all raises ``DataFormatError`` in both modes.
    Options and the path are checked at call time; records are read as the iterator runs.
    """
    for name, value, allowed in (("on_long", on_long, ON_LONG), ("on_bad", on_bad, ON_BAD)):
        if value not in allowed:
            raise InvalidInputError(f"{name}={value!r} is not one of {allowed}")
    if max_length is not None and (type(max_length) is not int or max_length < 2):
        raise InvalidInputError(f"max_length={max_length!r} must be None or an integer >= 2: a sequence needs "
                                "a token to predict from and one to predict")
    for name, value in dataclasses.asdict(fields).items():
        if not isinstance(value, str) or not value:
            raise InvalidInputError(f"field name {name}={value!r} must be a non-empty string")
    report = report if report is not None else SkipReport()
    return _examples(iter_records(path), path, Encoder(tokenizer), fields, max_length, on_long, on_bad, report)


def _examples(records, path, enc: Encoder, fields: Fields, max_length: int | None, on_long: str, on_bad: str,
              report: SkipReport) -> Iterator[Example]:
    n_read = 0
    for record, loc, raw in records:
        n_read += 1
        try:
            if isinstance(raw, BadRecordError):
                raise raw
            ex = _example(record, loc, raw, enc, fields)
        except BadRecordError as exc:
            if on_bad == "error":
                raise
            report.add(exc.reason, str(exc))
            continue
        T = len(ex.input_ids)
        if max_length is not None and T > max_length:
            if on_long == "skip" or not ex.loss_mask[:max_length].any():
                why = "" if on_long == "skip" else "; no target token is within the first max_length"
                report.add("too_long", f"{loc}: too_long ({T} tokens > max_length={max_length}{why}), skipped")
                continue
            report.add("truncated", f"{loc}: truncated ({T} tokens > max_length={max_length})")
            ex = dataclasses.replace(ex, input_ids=ex.input_ids[:max_length], loss_mask=ex.loss_mask[:max_length],
                                     prompt_len=min(ex.prompt_len, max_length))
        yield ex
    if n_read == 0:
        raise DataFormatError(f"no records in {path}: the input is empty or holds only blank lines")
    if report.counts:
        logger.info("%s: %s", path, ", ".join(f"{k}={v}" for k, v in sorted(report.counts.items())))


def bad_record(loc: str, reason: str, what: str, field: str | None = None) -> BadRecordError:
    """A ``BadRecordError`` at ``loc`` for ``reason``, naming the field when there is one."""
    return BadRecordError(f"{loc}: field {field!r}: {what}" if field else f"{loc}: {what}",
                          location=loc, reason=reason, field=field)


def _string(raw: dict, name: str, loc: str, kind: str) -> str:
    if not isinstance(raw[name], str):
        raise bad_record(loc, "wrong_type", f"must be a string, got {type(raw[name]).__name__} ({raw[name]!r:.60}); "
                   f"a {kind} record is tokenised from text", name)
    return _unicode(raw[name], loc, name)


def _unicode(text: str, loc: str, field: str, what: str = "") -> str:
    """``text`` if it is valid Unicode; a lone surrogate (JSON ``"\\ud800"``), which no tokenizer takes, is a bad
    record (reason ``invalid_utf8``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_record(loc, "invalid_utf8", f"{what}holds {text[exc.start]!r} at character {exc.start + 1}, a lone "
                   "surrogate that is not valid Unicode text", field) from None
    return text


def _example(record: int, loc: str, raw: Any, enc: Encoder, fields: Fields) -> Example:
    if not isinstance(raw, dict):
        raise bad_record(loc, "not_object", f"the record is a {type(raw).__name__} ({raw!r:.60}), not an object with a "
                   f"{fields.text!r}, {fields.messages!r} or {fields.prompt!r}+{fields.response!r} field")
    has = {name: raw.get(name) is not None for name in dataclasses.asdict(fields).values()}
    answer = answer_of(raw, fields)
    if has[fields.messages]:
        kind = "messages"
        ids, mask = _chat(raw[fields.messages], loc, enc, fields.messages)
    elif has[fields.prompt] and has[fields.response]:
        kind = "prompt_response"
        prompt, response = (_string(raw, f, loc, "prompt+response") for f in (fields.prompt, fields.response))
        if not response.strip():
            raise bad_record(loc, "empty_response", "is empty; a prompt+response record trains on its response",
                       fields.response)
        p_ids, r_ids = enc.pair(prompt, response)
        ids = enc.bos + p_ids + r_ids
        mask = np.arange(len(ids)) >= len(ids) - len(r_ids)
    elif has[fields.text]:
        kind = "text"
        text = _string(raw, fields.text, loc, "text")
        if not text.strip():
            raise bad_record(loc, "empty_text", "is empty; a text record needs text to train on", fields.text)
        ids = enc.bos + enc.encode([text])[0]
        mask = np.ones(len(ids), bool)
    else:
        raise bad_record(loc, "no_known_field", f"the record has none of the fields {fields.messages!r}, "
                   f"{fields.prompt!r} and {fields.response!r}, or {fields.text!r}; its fields: "
                   f"{', '.join(map(repr, list(raw)[:10])) or 'none'} (rename them with the field options)")
    mask[:1] = False
    if not mask.any():
        raise bad_record(loc, "too_short", f"the record tokenises to {len(ids)} token(s) with no target after the "
                   "first; a training sequence needs a token to predict from and one to predict")
    return Example(record=record, input_ids=np.asarray(ids, np.int32), loss_mask=mask,
                   prompt_len=0 if kind == "text" else int(np.argmax(mask)), answer=answer, kind=kind)


def answer_of(raw: dict, fields: Fields) -> str | None:
    """The record's reference answer as text (other JSON values JSON-encoded: 42 -> "42", true -> "true")."""
    answer = raw.get(fields.answer)
    return answer if answer is None or isinstance(answer, str) else json.dumps(answer, ensure_ascii=False, default=str)


def clean_messages(messages: Any, loc: str, field: str) -> list[dict]:
    """A chat field checked: a list of objects with string role (one of ROLES) and content; keys whose value is
    None are dropped (Parquet structs fill absent keys with None)."""
    if not isinstance(messages, list):
        raise bad_record(loc, "wrong_type", f"must be a list of {{'role', 'content'}} objects, got "
                   f"{type(messages).__name__} ({messages!r:.60})", field)
    clean = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise bad_record(loc, "wrong_type", f"message {j} must be an object with string 'role' and 'content', got "
                       f"{m!r:.60}", field)
        if m["role"] not in ROLES:
            raise bad_record(loc, "unknown_role", f"message {j} has role {m['role']!r}; allowed roles: {ROLES}", field)
        _unicode(m["content"], loc, field, f"message {j} ")
        clean.append({k: v for k, v in m.items() if v is not None})
    return clean


def require_chat_template(enc: Encoder, loc: str, field: str) -> None:
    if not getattr(enc.tok, "chat_template", None):
        raise DataFormatError(f"{loc}: a {field!r} record needs a tokenizer with a chat template, and "
                              f"{getattr(enc.tok, 'name_or_path', '') or type(enc.tok).__name__} has none")


def _chat(messages: Any, loc: str, enc: Encoder, field: str) -> tuple[list[int], np.ndarray]:
    """Token ids of the rendered chat and the mask of its assistant turns (see the module docstring)."""
    clean = clean_messages(messages, loc, field)
    turns = [j for j, m in enumerate(clean) if m["role"] == "assistant"]
    if not turns:
        raise bad_record(loc, "no_assistant", "the chat has no assistant turn, so nothing to train on", field)
    if turns[0] == 0:
        raise bad_record(loc, "assistant_first", "message 0 is an assistant turn: with nothing before it, the chat "
                   "template cannot render the prompt that locates its tokens; begin with a system or user "
                   "message", field)
    require_chat_template(enc, loc, field)
    try:  # the whole chat; then per assistant turn j: the chat before j with the generation prompt, and through j
        renders = [(clean, False)] + [r for j in turns for r in ((clean[:j], True), (clean[:j + 1], False))]
        texts = [enc.tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g) for m, g in renders]
    except jinja2.TemplateError as exc:
        raise bad_record(loc, "template_error", f"the chat template refused the conversation: {exc}", field) from exc
    full, *parts = enc.encode(texts)
    mask = np.zeros(len(full), bool)
    for n, j in enumerate(turns):
        for text, ids in zip(texts[1 + 2 * n:3 + 2 * n], parts[2 * n:2 * n + 2]):
            if not texts[0].startswith(text) or full[:len(ids)] != ids:
                raise bad_record(loc, "template_mismatch", f"the chat template's render up to message {j} is not a "
                           "token prefix of the whole conversation's render, so the assistant tokens cannot be located "
                           "exactly", field)
        a, b = len(parts[2 * n]), len(parts[2 * n + 1])
        mask[a:enc.turn_end(full, a, b)] = True
    return full, mask
