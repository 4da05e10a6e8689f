"""A cache made of parts: sub-caches written independently, gathered by one manifest.

Distributed builds (``builders.ray_build``) give each worker its own block of the
input and its own ``CacheWriter`` on ``CACHE/parts/block-NNNNNN/``: a complete cache
directory with its own manifest, build lock and resume. No two workers ever write the
same file, and a killed worker leaves its part resumable like any other cache.

``commit_parts`` then writes the top-level ``CACHE/manifest.json`` listing the parts'
committed shards, in block order, under paths relative to ``CACHE``
(``parts/block-000003/shards/shard-00000.parquet``), so readers, ``verify``, SQL and the
trainer see one ordinary cache (FORMAT.md, "Parts"). The parts must agree on everything
that gives their numbers a meaning (vocabulary, rule, codec, teacher, tokenizer,
temperature, exactness, id map); a disagreement is refused, never merged. The id map, shared
by construction (the writers are given the same token counts), is copied to the top level.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from logitstore import format as F
from logitstore.errors import CacheExistsError, InvalidInputError
from logitstore.lock import LOCK_NAME, read_lock
from logitstore.manifest import Manifest, atomic_write_bytes, load_manifest, now, require_current_version, save_manifest
from logitstore.ownership import check_output_dir, remove_own_files, rmdir_if_empty

PARTS_DIR = "parts"
#: what every part of one cache must agree on
SHARED_KEYS = ("vocab_size", "rule", "codec", "teacher", "tokenizer", "temperature", "exactness")


def part_name(block: int) -> str:
    """The directory name of block ``block``'s part, relative to the cache."""
    return f"{PARTS_DIR}/block-{block:06d}"


def part_manifests(cache: str | Path) -> dict[int, Manifest]:
    """The manifests of the parts under ``cache`` that have one, by block number."""
    root = Path(cache) / PARTS_DIR
    out: dict[int, Manifest] = {}
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if d.name.startswith("block-") and (d / F.MANIFEST_NAME).is_file():
            out[int(d.name[len("block-"):])] = load_manifest(d)
    return out


def committed_seq_ids(cache: str | Path, parts: dict[int, Manifest]) -> set[str]:
    """Every seq_id in the committed shards of ``parts``."""
    ids: set[str] = set()
    for block, m in parts.items():
        for s in m.shards:
            ids.update(pq.read_table(Path(cache) / part_name(block) / s.file, columns=["seq_id"]).column(0).to_pylist())
    return ids


def commit_parts(cache: str | Path, *, build: dict[str, Any], duplicates_skipped: int = 0,
                 complete: bool) -> Manifest:
    """Write ``cache``'s manifest over the committed shards of all its parts (see the module docstring).

    The caller holds ``cache``'s build lock. ``complete`` marks the build finished; an earlier call
    with ``complete=False`` gives readers the parts committed so far.
    """
    cache = Path(cache)
    parts = part_manifests(cache)
    parts = {b: m for b, m in parts.items() if m.shards}
    if not parts:
        raise InvalidInputError(f"{cache}: no part has committed shards; nothing to gather")
    first_block = min(parts)
    first = parts[first_block]
    for block, m in parts.items():
        require_current_version(m, cache / part_name(block), "gather")
        diffs = [k for k in SHARED_KEYS if getattr(m, k) != getattr(first, k)]
        if (m.id_map or {}).get("sha256") != (first.id_map or {}).get("sha256"):
            diffs.append("id_map")
        if diffs:
            raise InvalidInputError(f"{cache}: {part_name(block)} disagrees with {part_name(first_block)} on "
                                    f"{', '.join(diffs)}; the parts cannot form one cache")
    old = load_manifest(cache) if (cache / F.MANIFEST_NAME).is_file() else None
    shards = [dataclasses.replace(s, file=f"{part_name(b)}/{s.file}") for b in sorted(parts) for s in parts[b].shards]
    id_map = None
    if first.id_map:
        src = cache / part_name(first_block) / first.id_map["file"]
        data = src.read_bytes()
        if hashlib.sha256(data).hexdigest() != first.id_map["sha256"]:
            raise InvalidInputError(f"{src}: its checksum differs from its part's manifest")
        top = cache / F.ID_MAP_NAME
        if not top.is_file() or hashlib.sha256(top.read_bytes()).hexdigest() != first.id_map["sha256"]:
            atomic_write_bytes(top, data)
        id_map = {**first.id_map, "file": F.ID_MAP_NAME}
    m = Manifest(format_version=first.format_version, vocab_size=first.vocab_size, rule=first.rule, codec=first.codec,
                 teacher=first.teacher,
                 tokenizer=first.tokenizer, temperature=first.temperature, exactness=first.exactness,
                 build=dict(build), shards=shards, id_map=id_map, duplicates_skipped=duplicates_skipped,
                 complete=complete, created_at=old.created_at if old else now(), created_by=first.created_by)
    save_manifest(cache, m)
    return m


def is_part_dir(d: Path) -> bool:
    """``d`` is a part of a distributed build: ``block-NNNNNN``, a cache directory of ours (logitstore.ownership)."""
    if not (d.is_dir() and re.match(r"^block-\d{6,}$", d.name)):
        return False
    try:
        check_output_dir(d)
    except CacheExistsError:
        return False
    return True


def remove_parts(cache: str | Path) -> None:
    """Delete the parts' own files (a failed first build that committed nothing): in each ``block-NNNNNN`` part
    what its writer wrote (``ownership.remove_own_files``) and its lock, then the directories left empty. A file
    logitstore does not write stays, and so does the directory holding it."""
    root = Path(cache) / PARTS_DIR
    if not root.is_dir():
        return
    for d in sorted(root.iterdir()):
        if is_part_dir(d):
            remove_own_files(d)
            if read_lock(d) is not None:
                (d / LOCK_NAME).unlink(missing_ok=True)
            rmdir_if_empty(d)
    rmdir_if_empty(root)
