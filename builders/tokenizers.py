"""Tokenizer identity: a fingerprint that says whether two tokenizers map text to the same ids.

Caches record it in their manifest; trainers and multi-teacher comparisons refuse
to mix caches and models whose fingerprints differ.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (first 16 hex chars) of the token -> id table and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted((str(k), str(v)) for k, v in (tokenizer.special_tokens_map or {}).items())
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def tokenizer_record(tokenizer: Any) -> dict[str, Any]:
    """What a manifest records about a tokenizer."""
    return {
        "name": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
    }
