"""SQL over a cache with DuckDB: ``connect(CACHE)`` opens a cache (or a selection) and returns a DuckDB
connection with its views ``sequences`` and ``tokens``, the ``manifest`` and ``exactness`` tables and the
macros; ``logitstore.views`` defines them (see its docstring for every column and macro). A union file, or a
directory holding one (a ``logitstore distill`` run), gives the same views over all its member caches with
their label columns (``round``) first (``logitstore.union``).

    con = logitstore.query.connect("cache")
    con.sql("SELECT avg(mean_entropy) FROM sequences WHERE correct").fetchall()

``Cache.sql(query)`` is the same on an already open cache. Both are the caller's own connection, with DuckDB's
usual file access; ``connect(..., confine_to=[...])`` confines it as ``logitstore sql`` does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import duckdb

from logitstore import union
from logitstore.reader import Cache
from logitstore.sqlguard import confine
from logitstore.views import MACROS, SEQUENCE_VIEW_COLUMNS
from logitstore.views import connect as connect_views

__all__ = ["MACROS", "SEQUENCE_VIEW_COLUMNS", "connect"]


def connect(cache: Cache | str | os.PathLike, con: duckdb.DuckDBPyConnection | None = None, *,
            confine_to: Iterable[str | os.PathLike] | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views, the tables and the macros of ``cache`` (a path, a selection file, a
    union file or a directory holding one, or an open ``Cache``). With ``confine_to`` (what ``select`` and
    ``logitstore sql`` run user text on), its file access is confined to the cache's directory (a union's: its
    directory and every member's) and those paths, and its configuration locked
    (``logitstore.sqlguard.confine``)."""
    if not isinstance(cache, Cache) and union.is_union(cache):
        con = union.connect(cache, con)
        own = union.member_paths(cache)
    else:
        cache = cache if isinstance(cache, Cache) else Cache(cache)
        con = connect_views(cache, con)
        own = [cache.path] if cache.url is None else [cache.path, cache.url]
    return con if confine_to is None else confine(con, [*own, *confine_to])
