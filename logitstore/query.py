"""SQL over a cache with DuckDB: ``connect(CACHE)`` opens a cache (or a selection) and returns a DuckDB
connection with its views ``sequences`` and ``tokens``, the ``manifest`` and ``exactness`` tables and the
macros; ``logitstore.views`` defines them (see its docstring for every column and macro). A union file, or a
directory holding one (a ``logitstore distill`` run), gives the same views over all its member caches with
their label columns (``round``) first (``logitstore.union``).

    con = logitstore.query.connect("cache")
    con.sql("SELECT avg(mean_entropy) FROM sequences WHERE correct").fetchall()

``Cache.sql(query)`` is the same on an already open cache.
"""

from __future__ import annotations

import os

import duckdb

from logitstore import union
from logitstore.reader import Cache
from logitstore.views import MACROS, SEQUENCE_VIEW_COLUMNS
from logitstore.views import connect as connect_views

__all__ = ["MACROS", "SEQUENCE_VIEW_COLUMNS", "connect"]


def connect(cache: Cache | str | os.PathLike, con: duckdb.DuckDBPyConnection | None = None
            ) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views, the tables and the macros of ``cache`` (a path, a selection file, a
    union file or a directory holding one, or an open ``Cache``)."""
    if not isinstance(cache, Cache) and union.is_union(cache):
        return union.connect(cache, con)
    return connect_views(cache if isinstance(cache, Cache) else Cache(cache), con)
