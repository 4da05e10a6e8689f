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
import logging
import math
import os
from pathlib import Path
from typing import Any

from logitstore.errors import InvalidInputError, LogitstoreError
from logitstore.jsonfile import read_json
from logitstore.manifest import Manifest, atomic_write_bytes, now
from logitstore.remote import is_remote

logger = logging.getLogger(__name__)

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
    """The selection in the file ``path``, every value checked (``check_values``), each problem one line."""
    p = Path(path)
    d = read_json(p, InvalidInputError, what="selection")
    if not isinstance(d, dict) or d.get("format") != SELECTION_FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise InvalidInputError(f"{p}: not a logitstore selection (format {got!r:.60})")
    if d.get("version") != SELECTION_VERSION:
        raise InvalidInputError(f"{p}: selection version {d.get('version')!r:.60}; this logitstore reads "
                                f"{SELECTION_VERSION}")
    fields = {f.name for f in dataclasses.fields(Selection)}
    missing = sorted({"cache", "cache_fingerprint", "seq_ids"} - set(d))
    if missing:
        raise InvalidInputError(f"{p}: malformed selection (missing {', '.join(missing)})")
    sel = Selection(**{k: v for k, v in d.items() if k in fields})
    check_values(sel, p)
    return sel


def check_values(sel: Selection, where: str | os.PathLike) -> None:
    """Refuse a selection (a hand-edited file, say) whose values a reader cannot use as they are: ids that are not
    unique strings, weights that are not one finite non-negative number per id, or weights that are all zero."""
    bad = lambda msg: InvalidInputError(f"{where}: {msg}")  # noqa: E731
    if not isinstance(sel.cache, str) or not isinstance(sel.cache_fingerprint, str):
        raise bad(f"'cache' {sel.cache!r:.60} and 'cache_fingerprint' {sel.cache_fingerprint!r:.60} must be strings")
    if not isinstance(sel.seq_ids, list):
        raise bad(f"'seq_ids' is {type(sel.seq_ids).__name__}, expected a list of seq id strings")
    for i, sid in enumerate(sel.seq_ids):
        if not isinstance(sid, str) or not sid:
            raise bad(f"seq_ids[{i}] is {sid!r:.40} ({type(sid).__name__}); a seq id is a non-empty string (the "
                      "cache's seq_id column)")
    if len(set(sel.seq_ids)) != len(sel.seq_ids):
        seen: set[str] = set()
        dup = next(s for s in sel.seq_ids if s in seen or seen.add(s))
        raise bad(f"seq id {dup!r} is listed twice; each sequence appears once in a selection")
    if sel.weights is None:
        return
    if not isinstance(sel.weights, list) or len(sel.weights) != len(sel.seq_ids):
        n = len(sel.weights) if isinstance(sel.weights, list) else type(sel.weights).__name__
        raise bad(f"{n} weights for {len(sel.seq_ids)} seq ids; give one weight per seq id, or null")
    for i, w in enumerate(sel.weights):
        if type(w) not in (int, float) or not math.isfinite(w) or w < 0:
            raise bad(f"weights[{i}] (of {sel.seq_ids[i]}) is {w!r:.40}; a weight is a finite number >= 0")
    if sel.weights and not any(sel.weights):
        raise bad("every weight is 0, so nothing would be trained on; drop the sequences instead, or the weights")


def check_known(sel: Selection, known, where: str | os.PathLike, cache_dir: Path, *,
                allow_missing: bool = False) -> Selection:
    """``sel`` restricted to the seq ids in ``known`` (the cache's index). Ids it does not hold are an error (the
    file was edited, or made from another cache) unless ``allow_missing``, which logs how many are left out; a
    selection none of whose ids is in the cache is always an error."""
    missing = [s for s in sel.seq_ids if s not in known]
    if not missing:
        return sel
    n = len(sel.seq_ids)
    if len(missing) == n:
        raise SelectionMismatchError(f"{where}: none of its {n} seq ids is in the cache {cache_dir} (first: "
                                     f"{missing[0]!r:.40}); it was made from another cache or edited")
    if not allow_missing:
        raise SelectionMismatchError(
            f"{where}: {len(missing)} of its {n} seq ids are not in the cache {cache_dir} (first: {missing[0]!r:.40}); "
            f"it was edited or made from another cache; pass --allow-missing to use the {n - len(missing)} that are")
    logger.warning("%s: %d of %d seq ids are not in %s; using the %d that are (--allow-missing)", where, len(missing),
                   n, cache_dir, n - len(missing))
    gone = set(missing)
    keep = [i for i, s in enumerate(sel.seq_ids) if s not in gone]
    return dataclasses.replace(sel, seq_ids=[sel.seq_ids[i] for i in keep],
                               weights=None if sel.weights is None else [sel.weights[i] for i in keep])


def save_selection(path: str | os.PathLike, sel: Selection) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(str(sel.cache)):  # a cache in an object store: its URL as it is
        rel = str(sel.cache)
    else:
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
