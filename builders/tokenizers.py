"""Tokenizer identity: a fingerprint that says whether two tokenizers map text to the same ids.

Caches record it in their manifest; trainers and multi-teacher comparisons refuse
to mix caches and models whose fingerprints differ.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from logitstore.errors import InvalidInputError


class TokenizerMismatchError(InvalidInputError):
    """A model's tokenizer or vocabulary does not match the one a cache was built with."""


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


def check_tokenizer(tokenizer: Any, who: str, cache, *, error: type[Exception] = TokenizerMismatchError) -> None:
    """Refuse ``tokenizer`` (of ``who``, e.g. "student DIR") when ``cache``'s manifest records another
    fingerprint: the cached token ids would mean other tokens to it. A cache that records none is not
    judged here (callers decide whether that is acceptable)."""
    rec = cache.manifest.tokenizer or {}
    want, got = rec.get("fingerprint"), tokenizer_fingerprint(tokenizer)
    if want and got != want:
        raise error(f"{who} has tokenizer fingerprint {got} ({getattr(tokenizer, 'name_or_path', '?')}), the cache "
                    f"{cache.path} has {want} ({rec.get('name', '?')}): cached token ids would mean other tokens "
                    "to it; use a model with the teacher's tokenizer")
