"""Generation mode: N responses are sampled per prompt, each then scored and verified.

The sampler is the teacher, or another model (``--responses-from POLICY``: ``builders.policy``);
either is a backend (``builders.backends.base.Backend``) whose ``generate`` is called per prompt.

Prompts come from the same inputs as scoring: a ``prompt`` field (with or without a
``response``, which is ignored here) or a chat, whose trailing assistant turns are
dropped and which is rendered with the template's generation prompt. Each prompt is
sampled with its own seed, derived from the build seed and the record index, so a
sample does not depend on batching and a resumed build regenerates exactly what it
skipped. A sampled sequence becomes an ``Example`` whose targets are the response
tokens (through the end-of-sequence token when one was produced); the driver scores it
like any other, so the cached distributions are the raw temperature-1 logits whatever
the sampling temperature.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from builders.data import (
    BadRecordError,
    DataFormatError,
    Encoder,
    Example,
    Fields,
    SkipReport,
    answer_of,
    bad_record,
    clean_messages,
    iter_records,
    require_chat_template,
)
from builders.verifiers import get_verifier
from logitstore.errors import InvalidInputError


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    n: int
    """responses sampled per prompt"""
    max_new_tokens: int = 256
    temperature: float = 1.0
    """sampling temperature; 0 means greedy (then n must be 1)"""
    top_p: float = 1.0
    verifier: str | None = None
    """exact, last-number, regex:PATTERN or package.module:function"""

    def __post_init__(self):
        if not (1 <= self.n <= 65535):
            raise InvalidInputError(f"--generate {self.n}: must be between 1 and 65535")
        if self.max_new_tokens < 1:
            raise InvalidInputError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if self.temperature < 0 or (self.temperature == 0 and self.n > 1):
            raise InvalidInputError(f"--temperature {self.temperature}: must be > 0, or 0 (greedy) with --generate 1")
        if not (0 < self.top_p <= 1):
            raise InvalidInputError(f"--top-p {self.top_p}: must be in (0, 1]")


def prompt_seed(seed: int, record: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{record}".encode(), digest_size=4).digest(), "little")


def load_prompts(path: str | os.PathLike, tokenizer: Any, *, fields: Fields = Fields(), on_bad: str = "error",
                 report: SkipReport | None = None) -> Iterator[tuple[int, np.ndarray, str | None]]:
    """(record, prompt token ids, reference answer) for every record that has a prompt."""
    enc, report = Encoder(tokenizer), report if report is not None else SkipReport()
    n_read = 0
    for record, loc, raw in iter_records(path):
        n_read += 1
        try:
            if isinstance(raw, BadRecordError):
                raise raw
            yield record, np.asarray(_prompt_ids(raw, loc, enc, fields), np.int32), answer_of(raw, fields)
        except BadRecordError as exc:
            if on_bad == "error":
                raise
            report.add(exc.reason, str(exc))
    if n_read == 0:
        raise DataFormatError(f"no records in {path}: the input is empty or holds only blank lines")


def _prompt_ids(raw: Any, loc: str, enc: Encoder, fields: Fields) -> list[int]:
    if not isinstance(raw, dict):
        raise bad_record(loc, "not_object", f"the record is a {type(raw).__name__}, not an object")
    if raw.get(fields.messages) is not None:
        msgs = clean_messages(raw[fields.messages], loc, fields.messages)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        if not msgs:
            raise bad_record(loc, "no_prompt", "holds no message before its assistant turns", fields.messages)
        require_chat_template(enc, loc, fields.messages)
        return enc.encode([enc.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)])[0]
    prompt = raw.get(fields.prompt)
    if prompt is None:
        raise bad_record(loc, "no_prompt", f"generation needs a {fields.prompt!r} or {fields.messages!r} field")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_record(loc, "wrong_type", "must be a non-empty string", fields.prompt)
    return enc.bos + enc.encode([prompt])[0]


def sampled_examples(backend: Any, prompts: Iterator[tuple[int, np.ndarray, str | None]], cfg: GenerationConfig, *,
                     seed: int, skip: dict[int, int] | None = None, max_length: int | None = None,
                     report: SkipReport | None = None, timings: dict[str, float] | None = None
                     ) -> Iterator[tuple[Example, int, bool | None]]:
    """(example, sample index, verdict) for every response the sampler ``backend`` gives; prompts with all
    ``cfg.n`` samples in ``skip`` (record -> committed samples) are not sampled again. Prompts that leave no
    room under ``max_length`` and empty responses are counted in ``report``; ``timings["generate"]`` (when
    given) accumulates the seconds spent in ``backend.generate``."""
    verify = get_verifier(cfg.verifier) if cfg.verifier else None
    report = report if report is not None else SkipReport()
    for record, prompt, answer in prompts:
        if skip and skip.get(record, 0) >= cfg.n:
            continue
        new = cfg.max_new_tokens if max_length is None else min(cfg.max_new_tokens, max_length - len(prompt))
        if new < 1:
            report.add("too_long", f"record {record}: the prompt's {len(prompt)} tokens leave no room for a "
                                   f"response under max_length={max_length}; skipped")
            continue
        t0 = time.perf_counter()
        responses = backend.generate(prompt, n=cfg.n, max_new_tokens=new, temperature=cfg.temperature,
                                     top_p=cfg.top_p, seed=prompt_seed(seed, record))
        if timings is not None:
            timings["generate"] = timings.get("generate", 0.0) + time.perf_counter() - t0
        for j, resp in enumerate(responses):
            if len(resp) == 0:
                report.add("empty_response", f"record {record} sample {j}: the sampler produced no token; skipped")
                continue
            ids = np.concatenate([prompt, resp]).astype(np.int32)
            mask = np.zeros(len(ids), bool)
            mask[len(prompt):] = True
            verdict = None
            if verify is not None:
                text = backend.tokenizer.decode(resp, skip_special_tokens=True)
                verdict = verify(text, answer)
            yield Example(record=record, input_ids=ids, loss_mask=mask, prompt_len=len(prompt), answer=answer,
                          kind="generated"), j, verdict
