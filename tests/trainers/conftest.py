"""Fixtures of the trainer tests: a cache built by the tiny teacher over real English text, and student configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def english_lines(n: int) -> list[str]:
    """``n`` lines of English prose from the standard library's docstrings (ships with Python)."""
    import collections
    import json as _json
    import pathlib
    import textwrap

    text = " ".join(" ".join((m.__doc__ or "").split()) for m in (collections, _json, pathlib, textwrap, pytest))
    words = text.split()
    lines, i = [], 0
    while len(lines) < n:
        size = 12 + (len(lines) * 7) % 30
        chunk = words[i:i + size] or words[:size]
        lines.append(" ".join(chunk))
        i = (i + size) % max(1, len(words) - 40)
    return lines


def write_student_config(path: Path, *, vocab: int = 49152, hidden: int = 32, layers: int = 1) -> Path:
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg.to_json_file(str(path))
    return path


@pytest.fixture(scope="session")
def text_cache(tmp_path_factory, tiny_teacher) -> Path:
    """A top-16 cache of 48 English lines scored by the tiny teacher (several shards and row groups)."""
    from builders.config import BuildConfig
    from builders.driver import build
    from logitstore import TopK

    d = tmp_path_factory.mktemp("traincache")
    data = d / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in english_lines(48)))
    out = d / "cache"
    build(str(tiny_teacher), data, out, BuildConfig(rule=TopK(16), max_length=48, shard_mb=0.05,
                                                    row_group_positions=200), progress=False)
    return out


@pytest.fixture(scope="session")
def student_config(tmp_path_factory) -> Path:
    return write_student_config(tmp_path_factory.mktemp("student") / "config.json")
