"""Unions: several caches queried as one, each row labelled with its member's values (the rounds of a distill run).

A union is a small JSON file (FORMAT.md, "Unions")::

    {"format": "logitstore-union", "version": 1, "labels": ["round"],
     "members": [{"cache": "round-001/cache", "labels": {"round": 1}}, ...]}

``cache`` paths are relative to the union file's directory (a run directory moves as a whole).
A *directory* holding ``union.json`` (and no ``manifest.json``) stands for its union, so
``logitstore sql RUN "..."`` works on a ``logitstore distill`` run. ``connect`` opens every member
(``logitstore.reader.Cache``: checked as any cache) and puts its views into one DuckDB connection
under a prefix (``logitstore.views.connect(..., prefix=...)``); then

- ``sequences`` and ``tokens`` are ``UNION ALL BY NAME`` of the members' views, with the label
  columns first (``round``), so ``SELECT round, avg(correct::INT) FROM sequences GROUP BY round``;
- ``manifest`` and ``exactness`` are the members' tables with the label columns first;
- ``members`` has one row per member: its labels, ``cache`` (the resolved path) and its
  ``sequences`` and ``positions`` counts.

Members are caches, not selections; they need not share a teacher or a rule (each view has the same
columns for every cache of this format version). A member's own views stay reachable as
``m<i>_sequences``, ``m<i>_tokens`` (``i`` from 0, in member order).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import duckdb

from logitstore.errors import InvalidInputError
from logitstore.format import MANIFEST_NAME, UNION_NAME
from logitstore.manifest import atomic_write_bytes
from logitstore.reader import Cache
from logitstore.views import connect as connect_views

UNION_FORMAT = "logitstore-union"
UNION_VERSION = 1


@dataclasses.dataclass
class Member:
    cache: str  # as written: relative to the union file's directory, or absolute
    labels: dict[str, Any]


@dataclasses.dataclass
class Union:
    labels: list[str]
    members: list[Member]


def union_file(path: str | os.PathLike) -> Path | None:
    """The union file ``path`` names (the file itself, or ``DIR/union.json`` of a directory that is not a cache),
    or None when ``path`` is no union."""
    p = Path(path)
    if p.is_dir() and not (p / MANIFEST_NAME).is_file() and (p / UNION_NAME).is_file():
        p = p / UNION_NAME
    if not p.is_file():
        return None
    with open(p, "rb") as f:
        head = f.read(256)
    return p if UNION_FORMAT.encode() in head else None


def is_union(path: str | os.PathLike) -> bool:
    return union_file(path) is not None


def load_union(path: str | os.PathLike) -> Union:
    p = union_file(path)
    if p is None:
        raise InvalidInputError(f"{path}: not a union file (nor a directory with {UNION_NAME})")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{p}: not a readable union file ({exc})") from exc
    if not isinstance(d, dict) or d.get("format") != UNION_FORMAT or d.get("version") != UNION_VERSION:
        raise InvalidInputError(f"{p}: format {d.get('format')!r} version {d.get('version')!r}; this logitstore "
                                f"reads {UNION_FORMAT!r} version {UNION_VERSION}")
    labels, members = d.get("labels"), d.get("members")
    if not (isinstance(labels, list) and all(isinstance(x, str) and x.isidentifier() for x in labels)
            and isinstance(members, list)):
        raise InvalidInputError(f"{p}: 'labels' must be a list of column names and 'members' a list")
    out = []
    for i, m in enumerate(members):
        if not (isinstance(m, dict) and isinstance(m.get("cache"), str) and isinstance(m.get("labels"), dict)
                and sorted(m["labels"]) == sorted(labels)
                and all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in m["labels"].values())):
            want = "{" + f'"cache": PATH, "labels": {{{", ".join(labels)}}}' + "}"
            raise InvalidInputError(f"{p}: members[{i}] must be {want} with a number or a string for each label")
        out.append(Member(cache=m["cache"], labels=dict(m["labels"])))
    return Union(labels=list(labels), members=out)


def save_union(path: str | os.PathLike, union: Union) -> Path:
    """Write ``union`` to ``path`` (a file, or a directory: ``DIR/union.json``) atomically. Member paths are given as
    any path is (absolute, or relative to the working directory) and stored relative to the file's directory where
    they lie inside it."""
    p = Path(path)
    if p.is_dir():
        p = p / UNION_NAME
    base = p.parent.resolve()
    members = []
    for m in union.members:
        c = Path(m.cache)
        try:
            rel = c.resolve().relative_to(base).as_posix()
        except ValueError:
            rel = str(c.resolve())
        members.append({"cache": rel, "labels": m.labels})
    d = {"format": UNION_FORMAT, "version": UNION_VERSION, "labels": union.labels, "members": members}
    atomic_write_bytes(p, json.dumps(d, indent=1).encode("utf-8"))
    return p


def member_paths(path: str | os.PathLike) -> list[Path]:
    """The union file's directory and every member cache's resolved directory (what a confined connection over the
    union may read)."""
    file = union_file(path)
    u = load_union(path)
    return [file.parent.resolve()] + [(file.parent / m.cache).resolve() for m in u.members]


def _literal(v: Any) -> str:
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    return f"{v}::BIGINT" if isinstance(v, int) else f"{float(v)!r}::DOUBLE"


def connect(path: str | os.PathLike, con: duckdb.DuckDBPyConnection | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection over the union at ``path`` (see the module docstring)."""
    file = union_file(path)
    u = load_union(path)
    if not u.members:
        raise InvalidInputError(f"{file}: the union has no member cache yet")
    con = con or duckdb.connect()
    parts: dict[str, list[str]] = {"sequences": [], "tokens": [], "manifest": [], "exactness": []}
    rows = []
    for i, m in enumerate(u.members):
        c = Path(m.cache)
        cache = Cache(c if c.is_absolute() else file.parent / c)
        if cache.selection is not None:
            raise InvalidInputError(f"{file}: member {m.cache} is a selection; a union's members are caches")
        connect_views(cache, con, prefix=f"m{i}_")
        lab = ", ".join(f'{_literal(m.labels[k])} AS "{k}"' for k in u.labels)
        for view in parts:
            parts[view].append(f"SELECT {lab + ', ' if lab else ''}* FROM m{i}_{view}")
        rows.append([m.labels[k] for k in u.labels] + [str(cache.path), len(cache), cache.num_positions])
    for view, selects in parts.items():
        con.execute(f"CREATE OR REPLACE VIEW {view} AS " + " UNION ALL BY NAME ".join(selects))
    types = [("VARCHAR" if any(isinstance(m.labels[k], str) for m in u.members) else "DOUBLE"
              if any(isinstance(m.labels[k], float) for m in u.members) else "BIGINT") for k in u.labels]
    con.execute("CREATE OR REPLACE TABLE members (" + ", ".join(
        [f'"{k}" {t}' for k, t in zip(u.labels, types)] + ["cache VARCHAR", "sequences BIGINT", "positions BIGINT"])
        + ")")
    con.executemany(f"INSERT INTO members VALUES ({', '.join('?' * (len(u.labels) + 3))})", rows)
    return con
