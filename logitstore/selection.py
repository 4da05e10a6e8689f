"""Selections: a named subset of a cache's sequences, without copying shard data (the file and its checks).

A selection is a small JSON file::

    {"format": "logitstore-selection", "version": 1, "cache": "<path of the cache>",
     "cache_fingerprint": "<sha256 of the cache's committed state>", "query": "<the SQL>",
     "seed": ..., "fraction": ..., "limit": ..., "created_at": ..., "count": N,
     "seq_ids": [...], "weights": [...] or null}

``logitstore.open(SELECTION)`` (and so ``sql``, ``info`` and the trainer) reads the
cache it names, checks that the cache is still the one the selection was made from
(same fingerprint: same format, rule, codec, id map and shard checksums) and
restricts every read to the selected sequences. ``cache`` is stored relative to the
selection file when that is possible, so a cache directory and its selections can be
moved together. ``logitstore.subset`` makes selections with SQL and materialises them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from logitstore.errors import InvalidInputError, LogitstoreError
from logitstore.jsonfile import read_json
from logitstore.manifest import Manifest, atomic_write_bytes, now

SELECTION_FORMAT = "logitstore-selection"
SELECTION_VERSION = 1


class SelectionMismatchError(LogitstoreError, ValueError):
    """The selection was made from another cache, or from this cache before it changed."""


def cache_fingerprint(m: Manifest) -> str:
    """sha256 of what makes a cache's content: format, vocab, rule, codec, id map and shard checksums."""
    d = {"format_version": m.format_version, "vocab_size": m.vocab_size, "rule": m.rule, "codec": m.codec,
         "id_map": (m.id_map or {}).get("sha256"), "shards": [s.sha256 for s in m.shards]}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class Selection:
    cache: str
    cache_fingerprint: str
    seq_ids: list[str]
    weights: list[float] | None = None
    query: str = ""
    seed: int | None = None
    fraction: float | None = None
    limit: int | None = None
    created_at: str = ""

    def cache_path(self, selection_file: Path) -> Path:
        p = Path(self.cache)
        return p if p.is_absolute() else (selection_file.parent / p).resolve()

    def weight_map(self) -> dict[str, float] | None:
        return None if self.weights is None else dict(zip(self.seq_ids, self.weights))


def is_selection_file(path: str | os.PathLike) -> bool:
    """``path`` looks like a selection (its first bytes name the selection format): how ``open`` tells one from a
    cache directory; ``load_selection`` then checks it fully."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        head = f.read(256)
    return SELECTION_FORMAT.encode() in head


def is_our_selection(path: str | os.PathLike) -> bool:
    """``path`` is a selection file written by logitstore (a JSON object whose ``format`` is the selection format,
    however its content was edited since): the only kind of file ``select --force`` replaces."""
    if not is_selection_file(path):
        return False
    try:
        d = read_json(path, InvalidInputError)
    except InvalidInputError:
        return False
    return isinstance(d, dict) and d.get("format") == SELECTION_FORMAT


def load_selection(path: str | os.PathLike) -> Selection:
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{p}: not a readable selection file ({exc})") from exc
    if not isinstance(d, dict) or d.get("format") != SELECTION_FORMAT:
        raise InvalidInputError(f"{p}: not a logitstore selection (format {d.get('format')!r})")
    if d.get("version") != SELECTION_VERSION:
        raise InvalidInputError(f"{p}: selection version {d.get('version')!r}; this logitstore reads "
                                f"{SELECTION_VERSION}")
    fields = {f.name for f in dataclasses.fields(Selection)}
    try:
        sel = Selection(**{k: v for k, v in d.items() if k in fields})
    except TypeError as exc:
        raise InvalidInputError(f"{p}: malformed selection ({exc})") from exc
    if sel.weights is not None and len(sel.weights) != len(sel.seq_ids):
        raise InvalidInputError(f"{p}: {len(sel.weights)} weights for {len(sel.seq_ids)} seq ids")
    return sel


def save_selection(path: str | os.PathLike, sel: Selection) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cache = Path(sel.cache).resolve()
    try:
        rel = os.path.relpath(cache, p.parent.resolve())
    except ValueError:  # another drive on Windows
        rel = str(cache)
    d: dict[str, Any] = {"format": SELECTION_FORMAT, "version": SELECTION_VERSION, "cache": rel,
                         "cache_fingerprint": sel.cache_fingerprint, "query": sel.query, "seed": sel.seed,
                         "fraction": sel.fraction, "limit": sel.limit, "created_at": sel.created_at or now(),
                         "count": len(sel.seq_ids), "seq_ids": sel.seq_ids, "weights": sel.weights}
    atomic_write_bytes(p, json.dumps(d).encode("utf-8"))


def check_fingerprint(sel: Selection, manifest: Manifest, selection_file: Path | str, cache_dir: Path) -> None:
    got = cache_fingerprint(manifest)
    if got != sel.cache_fingerprint:
        raise SelectionMismatchError(
            f"{selection_file} was made from another cache (fingerprint {sel.cache_fingerprint[:12]}), and "
            f"{cache_dir} now has fingerprint {got[:12]}: it was rebuilt, resumed or is a different cache; "
            "make the selection again")


def in_fraction(seq_id: str, seed: int, fraction: float) -> bool:
    """A deterministic coin per (seed, seq_id): the same sequences for the same seed, in any order."""
    h = hashlib.blake2b(f"{seed}/{seq_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2**64
