"""What SQL a user's text may do: a predicate is one expression, a query reads, and DuckDB's file access is confined.

Three guards, used by ``logitstore select`` and ``logitstore sql`` (``logitstore.subset``,
``tools.cli.store``):

- ``check_expression(text, flag)``: ``select --where`` and ``--weight`` paste their text into a query,
  so it must be exactly one SQL expression. It is parsed on its own as ``SELECT (text)`` by DuckDB's
  parser (``json_serialize_sql``), and refused unless that is one statement with one select item and
  nothing else (no ``FROM``, ``WHERE``, ``UNION``, ``LIMIT``, no second statement after a ``;``), and
  unless no table function appears anywhere in it (``read_text(...)``, ``read_csv(...)``: an expression
  over the views reads no file). Subqueries over the views are expressions and are allowed.
- ``check_statements(text, allowed, what)``: every statement of ``text`` must be of a type in
  ``allowed`` (``duckdb.extract_statements``): ``select --query`` takes ``SELECT_ONLY``; ``logitstore sql``
  takes ``SQL_STATEMENTS``, queries and statements on in-memory objects, never ``COPY``, ``EXPORT``,
  ``ATTACH``, ``INSTALL``/``LOAD``, ``PRAGMA`` or ``CALL``, the statements that write files or change the
  engine. So ``sql`` never writes a file, inside the cache or anywhere else.
- ``confine(con, paths)``: after the views are built, DuckDB may touch only ``paths`` (the cache's
  directory, and what the user names with ``sql --allow-path``): ``allowed_directories`` /
  ``allowed_paths``, then ``enable_external_access = false`` (no other file, no network, no extension)
  and ``lock_configuration = true`` (no statement can undo it). Reading ``/etc/passwd`` with
  ``read_text`` fails with DuckDB's permission error, which the command line reports in one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import duckdb

from logitstore import remote
from logitstore.errors import InvalidInputError

SELECT_ONLY = frozenset({"SELECT"})
#: what ``logitstore sql`` runs: queries (SELECT, WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN), SET VARIABLE (the
#: configuration itself is locked) and statements on in-memory tables, views and macros
SQL_STATEMENTS = frozenset({"SELECT", "EXPLAIN", "SET", "CREATE", "INSERT", "UPDATE", "DELETE", "DROP", "ALTER",
                            "TRANSACTION"})


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def check_statements(text: str, allowed: frozenset[str], what: str) -> None:
    """Refuse ``text`` unless it parses and each of its statements is of a type in ``allowed``."""
    try:
        statements = duckdb.extract_statements(text)
    except duckdb.Error as exc:
        raise InvalidInputError(f"{what}: cannot be parsed ({_one_line(exc)})") from None
    except ValueError:  # a statement type this binding has no name for: not one of ours either
        raise InvalidInputError(f"{what}: holds a statement of a kind that is not allowed here; allowed: "
                                f"{', '.join(sorted(allowed))}") from None
    if not statements:
        raise InvalidInputError(f"{what}: no SQL statement given")
    for st in statements:
        kind = str(st.type).rsplit(".", 1)[-1]
        if kind not in allowed:
            raise InvalidInputError(
                f"{what}: a {kind} statement ({st.query.strip()[:60]!r}) is not allowed here; allowed: "
                f"{', '.join(sorted(allowed))}" + ("" if allowed == SELECT_ONLY else
                                                   " (it reads the cache; write results with --format csv/json)"))


def check_expression(text: str, flag: str) -> str:
    """``text`` when it is exactly one SQL expression that calls no table function (see the module docstring);
    else ``InvalidInputError`` naming ``flag``."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError(f"{flag} {text!r}: give one SQL expression over the sequences view")
    con = duckdb.connect()
    try:
        doc = json.loads(con.execute("SELECT json_serialize_sql(?)", [f"SELECT (\n{text}\n)"]).fetchone()[0])
    finally:
        con.close()
    why = None
    if doc.get("error"):
        why = f"it does not parse as one expression ({' '.join(str(doc.get('error_message', '')).split())})"
    elif len(doc["statements"]) != 1:
        why = "it holds more than one statement"
    else:
        node = doc["statements"][0]["node"]
        if node.get("type") != "SELECT_NODE" or len(node.get("select_list", [])) != 1 \
                or (node.get("from_table") or {}).get("type") != "EMPTY" or node.get("modifiers") \
                or (node.get("cte_map") or {}).get("map") or node.get("where_clause") is not None \
                or node.get("group_expressions") or node.get("having") is not None or node.get("qualify") is not None:
            why = "it is more than one expression (a FROM, WHERE, UNION, ORDER BY, LIMIT ... outside any subquery)"
        elif _table_functions(node):
            why = (f"it calls the table function {_table_functions(node)[0]}(...), which reads files; a predicate "
                   "is over the views sequences and tokens (and the tables manifest, exactness, selection)")
    if why:
        raise InvalidInputError(f"{flag} {text[:120]!r}: {why}; give one SQL expression over the sequences view, "
                                "e.g. \"mean_entropy < 1.5 AND correct\"")
    return text


def _table_functions(node: Any) -> list[str]:
    """The names of the table functions anywhere in a parsed statement (DuckDB's serialised tree)."""
    found: list[str] = []
    if isinstance(node, dict):
        if node.get("type") == "TABLE_FUNCTION":
            found.append(str((node.get("function") or {}).get("function_name", "?")))
        for v in node.values():
            found += _table_functions(v)
    elif isinstance(node, list):
        for v in node:
            found += _table_functions(v)
    return found


def _quoted_list(paths: Iterable[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def confine(con: duckdb.DuckDBPyConnection, paths: Iterable[str | os.PathLike]) -> duckdb.DuckDBPyConnection:
    """Let ``con`` touch only ``paths`` (directories and files; each as given and resolved, so a symlinked
    spelling works too), then lock its configuration (see the module docstring)."""
    dirs, files = [], []
    for p in paths:
        if remote.is_remote(p):  # an object-store cache: its prefix, as DuckDB names its objects
            dirs.append(str(p).rstrip("/") + "/")
            continue
        for form in dict.fromkeys((os.path.abspath(p), str(Path(p).resolve()))):
            (dirs if Path(form).is_dir() else files).append(form)
    if dirs:
        con.execute(f"SET allowed_directories = {_quoted_list(dirs)}")
    if files:
        con.execute(f"SET allowed_paths = {_quoted_list(files)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def allow_paths(paths: Iterable[str]) -> list[str]:
    """The ``--allow-path`` arguments, each an existing file or directory (else ``InvalidInputError``)."""
    out = []
    for p in paths:
        if not os.path.exists(p):
            raise InvalidInputError(f"--allow-path {p}: no such file or directory; name a file or directory the "
                                    "query reads (e.g. a `logitstore score` directory)")
        out.append(p)
    return out
