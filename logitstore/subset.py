"""Making selections with SQL, and turning a selection into a standalone cache.

``make_selection(CACHE, where=...)`` runs a predicate (or a whole query) over the ``sequences``
view and returns a ``logitstore.selection.Selection`` of the seq ids it picks, optionally
weighted, thinned to a seeded fraction and limited; ``materialize`` writes the selected
sequences as a new cache of their own (values re-encoded exactly, aggregates carried over).
"""

from __future__ import annotations

import os

import duckdb

from logitstore.codec import Codec
from logitstore.errors import InvalidInputError
from logitstore.manifest import Manifest, now
from logitstore.query import connect
from logitstore.reader import Cache
from logitstore.rules import rule_from_dict
from logitstore.selection import Selection, cache_fingerprint, in_fraction
from logitstore.sqlguard import SELECT_ONLY, check_expression, check_statements
from logitstore.writer import CacheWriter


def make_selection(cache_path: str | os.PathLike, *, where: str | None = None, query: str | None = None,
                   weight: str | None = None, fraction: float | None = None, seed: int = 0,
                   limit: int | None = None, allow_paths: tuple[str, ...] = ()) -> Selection:
    """Run ``query`` (SQL returning ``seq_id`` and optionally ``weight``), or ``SELECT seq_id[, weight]
    FROM sequences WHERE where``, then keep a seeded ``fraction`` and at most ``limit`` rows, in query order.
    ``where`` and ``weight`` are one expression each, ``query`` one SELECT (``logitstore.sqlguard``); the query
    reads the cache and the files or directories in ``allow_paths`` only."""
    if (where is None) == (query is None):
        raise InvalidInputError("give exactly one of --where PREDICATE and --query SQL")
    if fraction is not None and not (0 < fraction <= 1):
        raise InvalidInputError(f"--fraction {fraction}: must be in (0, 1]")
    if limit is not None and limit < 0:
        raise InvalidInputError(f"--limit {limit}: must be >= 0")
    cache = Cache(cache_path)
    if cache.selection is not None:
        raise InvalidInputError(f"{cache_path} is a selection; select from its cache {cache.path} instead")
    if query is None:  # each text pasted into the query is one expression (logitstore.sqlguard), nothing more
        check_expression(where, "--where")
        if weight:
            check_expression(weight, "--weight")
        w = f", ((\n{weight}\n))::DOUBLE AS weight" if weight else ""  # on their own lines: a -- comment ends there
        query = f"SELECT seq_id{w} FROM sequences WHERE (\n{where}\n)"
    elif weight:
        raise InvalidInputError("--weight goes with --where; with --query, return a 'weight' column instead")
    else:
        check_statements(query, SELECT_ONLY, "--query")
    con = connect(cache, confine_to=allow_paths)
    try:
        rel = con.sql(query)
        cols = rel.columns
        rows = rel.fetchall()
    except duckdb.Error as exc:
        hint = " (a selection query reads only the cache and the paths given with --allow-path)" \
            if isinstance(exc, duckdb.PermissionException) else ""
        raise InvalidInputError(f"selection query failed: {' '.join(str(exc).split())}{hint}") from None
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
    return Selection(cache=cache.location, cache_fingerprint=cache_fingerprint(cache.manifest), seq_ids=ids,
                     weights=weights if i_w is not None else None, query=query, seed=seed if fraction else None,
                     fraction=fraction, limit=limit, created_at=now())


def materialize(source, out: str | os.PathLike, *, provenance: dict | None = None) -> Manifest:
    """Write the sequences of ``source`` (a cache, a selection file or a ``Selection``) as a new standalone
    cache at ``out``.

    Values are re-encoded from their decoded form with the same rule and codec, which
    reproduces them exactly (qdelta values decode to exact multiples of the step).
    """
    src = Cache(source)
    m = src.manifest
    build = {"materialized_from": str(src.path.resolve()), "query": src.selection.query if src.selection else None,
             **(provenance or {}), "source_build": m.build}
    with CacheWriter(out, vocab_size=m.vocab_size, rule=rule_from_dict(m.rule), codec=Codec.from_dict(m.codec),
                     teacher=m.teacher, tokenizer=m.tokenizer, build=build, exactness=m.exactness,
                     temperature=m.temperature, policy=m.has_policy) as w:
        for s in src:
            w.add(s.record_of())
    return w.manifest
