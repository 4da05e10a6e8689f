"""Selections: a named subset of a cache's sequences, without copying shard data.

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
moved together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from logitstore.errors import InvalidInputError, LogitstoreError
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
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        head = f.read(256)
    return SELECTION_FORMAT.encode() in head


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


def make_selection(cache_path: str | os.PathLike, *, where: str | None = None, query: str | None = None,
                   weight: str | None = None, fraction: float | None = None, seed: int = 0,
                   limit: int | None = None) -> Selection:
    """Run ``query`` (SQL returning ``seq_id`` and optionally ``weight``), or ``SELECT seq_id[, weight]
    FROM sequences WHERE where``, then keep a seeded ``fraction`` and at most ``limit`` rows, in query order."""
    import duckdb

    from logitstore.query import connect
    from logitstore.reader import Cache

    if (where is None) == (query is None):
        raise InvalidInputError("give exactly one of --where PREDICATE and --query SQL")
    if fraction is not None and not (0 < fraction <= 1):
        raise InvalidInputError(f"--fraction {fraction}: must be in (0, 1]")
    if limit is not None and limit < 0:
        raise InvalidInputError(f"--limit {limit}: must be >= 0")
    cache = Cache(cache_path)
    if cache.selection is not None:
        raise InvalidInputError(f"{cache_path} is a selection; select from its cache {cache.path} instead")
    if query is None:
        query = f"SELECT seq_id{f', ({weight})::DOUBLE AS weight' if weight else ''} FROM sequences WHERE {where}"
    elif weight:
        raise InvalidInputError("--weight goes with --where; with --query, return a 'weight' column instead")
    con = connect(cache)
    try:
        rel = con.sql(query)
        cols = rel.columns
        rows = rel.fetchall()
    except duckdb.Error as exc:
        raise InvalidInputError(f"selection query failed: {' '.join(str(exc).split())}") from None
    if "seq_id" not in cols:
        raise InvalidInputError(f"the selection query must return a seq_id column; it returned {cols}")
    i_id, i_w = cols.index("seq_id"), cols.index("weight") if "weight" in cols else None
    ids, weights, seen = [], [], set()
    for r in rows:
        if limit is not None and len(ids) >= limit:
            break
        sid = r[i_id]
        if not isinstance(sid, str) or sid not in cache.index:
            raise InvalidInputError(f"the selection query returned seq_id {sid!r}, which is not in {cache_path}")
        if sid in seen or (fraction is not None and not in_fraction(sid, seed, fraction)):
            continue
        seen.add(sid)
        ids.append(sid)
        if i_w is not None:
            w = r[i_w]
            if w is None or not (w >= 0):
                raise InvalidInputError(f"weight {w!r} of {sid}: weights must be non-negative numbers")
            weights.append(float(w))
    return Selection(cache=str(cache.path), cache_fingerprint=cache_fingerprint(cache.manifest), seq_ids=ids,
                     weights=weights if i_w is not None else None, query=query, seed=seed if fraction else None,
                     fraction=fraction, limit=limit, created_at=now())


def materialize(source, out: str | os.PathLike, *, provenance: dict | None = None) -> Manifest:
    """Write the sequences of ``source`` (a cache, a selection file or a ``Selection``) as a new standalone
    cache at ``out``.

    Values are re-encoded from their decoded form with the same rule and codec, which
    reproduces them exactly (qdelta values decode to exact multiples of the step).
    """
    from logitstore.codec import Codec
    from logitstore.reader import Cache
    from logitstore.rules import rule_from_dict
    from logitstore.writer import CacheWriter

    src = Cache(source)
    m = src.manifest
    build = {"materialized_from": str(src.path.resolve()), "query": src.selection.query if src.selection else None,
             **(provenance or {}), "source_build": m.build}
    with CacheWriter(out, vocab_size=m.vocab_size, rule=rule_from_dict(m.rule), codec=Codec.from_dict(m.codec),
                     teacher=m.teacher, tokenizer=m.tokenizer, build=build, exactness=m.exactness,
                     temperature=m.temperature) as w:
        for s in src:
            k = max(1, int(s.n_entries.max(initial=1)))
            w.add(input_ids=s.input_ids, positions=s.pos, ids=s.ids[:, :k].clip(min=0),
                  logprobs=None if s.logprobs is None else s.logprobs[:, :k], n_entries=s.n_entries,
                  counts=None if s.counts is None else s.counts[:, :k], label_logprob=s.label_logprob,
                  entropy=s.entropy, tail_mass=s.tail_mass, loss_mask=s.loss_mask, seq_id=s.seq_id,
                  record=int(s.record), sample=int(s.sample), correct=s.correct,
                  aggregates={"mean_entropy": s.mean_entropy, "teacher_nll": s.teacher_nll,
                              "token_accuracy": s.token_accuracy})
    return w.manifest
