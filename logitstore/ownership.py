"""What is logitstore's own on disk: a directory is written into, and a file deleted, only when it is ours.

A command that writes where a user points it (``build -o CACHE``, ``train -o OUT``, ``export -o``, ``diff -o``,
``score -o``) may find something there already. It takes it for its own only when it says so:

- a cache directory is ours when it holds our manifest (a ``manifest.json`` whose ``format`` is
  ``"logitstore"``), or our lock (a ``build.lock`` that reads as a lock record) and nothing else but
  what a writer creates before its first commit (``shards/`` holding only our own file names; a
  distributed build's ``parts/`` and ``.inputs/``). Anything else that is not empty is refused with
  one line (``CacheExistsError``), and so is a path that names a file;
- inside a cache of ours only files with our own names are ever deleted: an uncommitted
  ``shard-NNNNNN.parquet`` or a ``.shard-NNNNNN.parquet.tmp`` in ``shards/`` (``own_shard_name``).
  A foreign file is left where it is, and ``verify`` reports it.

``check_output_dir`` applies the first rule, ``stray_shard_files`` the second; the training run
directory (``trainers.rundir``) and the other outputs follow the same rules with their own names.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from logitstore import format as F
from logitstore.errors import CacheExistsError
from logitstore.lock import LOCK_NAME, read_lock

#: a committed shard's file name, and the temporary name it is written under (FORMAT.md, "Writing and committing")
_SHARD = re.compile(r"^shard-\d{6,}\.parquet$")
_SHARD_TMP = re.compile(r"^\.shard-\d{6,}\.parquet\.tmp$")
_LISTED = 8  # entries named in a refusal


def own_shard_name(name: str) -> bool:
    """A file name a cache writer gives a shard (committed or in progress)."""
    return bool(_SHARD.match(name) or _SHARD_TMP.match(name))


def is_our_manifest(path: str | os.PathLike) -> bool:
    """``path`` (a file) is a logitstore manifest: a JSON object whose ``format`` is ``"logitstore"``. Damaged or
    edited ones count as ours (the reader refuses them with their own message); another tool's file does not."""
    p = Path(path)
    try:
        head = p.read_bytes()[:1 << 20]
    except OSError:
        return False
    if b'"format"' not in head or f'"{F.FORMAT_NAME}"'.encode() not in head:
        return False
    try:
        d = json.loads(head)
    except (RecursionError, ValueError):  # truncated or damaged, with our format name in it: ours, damaged
        return True
    return isinstance(d, dict) and d.get("format") == F.FORMAT_NAME


def describe_entries(names: list[str]) -> str:
    """Some of a directory's entry ``names``, for a message."""
    shown = ", ".join(sorted(names)[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def refuse_file(path: Path, what: str) -> None:
    """``CacheExistsError`` when ``path`` exists and is not a directory (``what``: "a cache", "a training run")."""
    if path.exists() and not path.is_dir():
        raise CacheExistsError(f"{path} is a file, not a directory, and {what} is a directory; choose a new output "
                               "path (logitstore never overwrites a file it did not write)")


def own_shard_file(p: Path) -> bool:
    """``p`` is a shard file of ours (committed or in progress), by its name."""
    return p.is_file() and own_shard_name(p.name)


def check_output_dir(path: str | os.PathLike, *,
                     before_commit: dict[str, Callable[[Path], bool]] | None = None) -> bool:
    """Whether ``path`` holds a cache of ours (True: it has our manifest; whether to continue it is the caller's
    decision), or may become one (False: it is new, empty, or ours from before a first commit: our lock, and
    nothing else but the directories of ``before_commit``, each holding only entries its predicate calls ours;
    default ``{"shards": own_shard_file}``). Raises ``CacheExistsError`` for a file or a foreign directory."""
    path = Path(path)
    before_commit = {F.SHARD_DIR: own_shard_file} if before_commit is None else before_commit
    refuse_file(path, "a cache")
    if not path.exists():
        return False
    manifest = path / F.MANIFEST_NAME
    if manifest.exists():
        if not (manifest.is_file() and is_our_manifest(manifest)):
            raise CacheExistsError(f"{path} holds a {F.MANIFEST_NAME} that is not a logitstore manifest: it is not a "
                                   "cache, and logitstore never writes into a directory it did not create; choose a "
                                   "new output path")
        return True
    entries = sorted(path.iterdir())

    def ours(p: Path) -> bool:
        own = before_commit.get(p.name)
        return p.name == LOCK_NAME or (own is not None and p.is_dir() and all(own(q) for q in p.iterdir()))

    if entries and (read_lock(path) is None or not all(ours(p) for p in entries)):
        raise CacheExistsError(
            f"{path} exists, is not empty and is not a logitstore cache (it holds "
            f"{describe_entries([p.name for p in entries])}); choose a new output path: logitstore writes only into "
            "a new or empty directory or one of its own caches, and never deletes a file it did not write")
    return False


def stray_shard_files(shard_dir: Path, listed: set[str]) -> tuple[list[Path], list[Path]]:
    """The files in ``shard_dir`` that the manifest does not list (``listed``: file names): (ours, to delete: an
    interrupted shard or its temporary file; foreign, to leave in place)."""
    ours, foreign = [], []
    if not shard_dir.is_dir():
        return ours, foreign
    for p in sorted(shard_dir.iterdir()):
        if p.name in listed:
            continue
        (ours if p.is_file() and own_shard_name(p.name) else foreign).append(p)
    return ours, foreign


def remove_own_files(cache: Path) -> None:
    """Delete the files a cache writer writes in ``cache`` (the manifest, the id map, their temporary files and
    the shards in ``shards/``), then ``shards/`` if it is left empty; anything else (and the lock) stays."""
    for name in (F.MANIFEST_NAME, f".{F.MANIFEST_NAME}.tmp", F.ID_MAP_NAME, f".{F.ID_MAP_NAME}.tmp"):
        p = cache / name
        if p.is_file():
            p.unlink()
    shard_dir = cache / F.SHARD_DIR
    for p in stray_shard_files(shard_dir, set())[0]:
        p.unlink(missing_ok=True)
    rmdir_if_empty(shard_dir)


def rmdir_if_empty(path: Path) -> None:
    """Remove the directory ``path`` if it is empty; otherwise (or if it is gone) leave it."""
    try:
        path.rmdir()
    except OSError:  # not empty (a foreign file, another writer's lock appeared meanwhile) or already gone: leave it
        pass
