"""The cache manifest: ``manifest.json``, the description and commit record of a cache.

The manifest is the only thing that makes a shard part of a cache: a shard file
exists under its final name before the manifest lists it, but readers and
``verify`` trust only what the last committed manifest says. It is always
written to a temporary name, fsynced and renamed over the old one, so a crash
leaves either the old or the new manifest, never a torn one.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from logitstore.errors import CacheNotFoundError, CorruptCacheError, FormatVersionError
from logitstore.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    POLICY_FIELDS,
    READABLE_VERSIONS,
    UNION_NAME,
    version_for,
)
from logitstore.jsonfile import read_json

#: The manifest key holding the sha256 of everything else in it (FORMAT.md, "Manifest"); from format version 2.
CHECKSUM_KEY = "checksum"

#: The words for a field's exactness, and what each says about its numbers (FORMAT.md, "Exactness").
EXACTNESS_MEANING = {
    "exact": "the teacher's own number, stored in float32",
    "quantised": "exact up to the codec's stated error bound",
    "estimate": "an estimate, not the teacher's number",
    "bound": "a one-sided bound: entropy an upper bound (vLLM: the known top entries plus the rest of the mass "
             "spread uniformly over the other ids; a merged cache: sum_i w_i H_i + H(w)), and the sequences view's "
             "mean_entropy inherits it; the entries of a merged cache lower bounds of the mixture's logprobs (exact "
             "where every teacher stored the id)",
    "absent": "not stored",
}
#: Allowed words for a field's exactness.
EXACTNESS_WORDS = tuple(EXACTNESS_MEANING)


@dataclasses.dataclass
class ShardInfo:
    file: str  # relative to the cache directory, POSIX separators
    sequences: int
    positions: int
    targets: int
    entries: int
    bytes: int
    sha256: str


@dataclasses.dataclass
class Manifest:
    vocab_size: int
    rule: dict[str, Any]
    codec: dict[str, Any]
    teacher: dict[str, Any] = dataclasses.field(default_factory=dict)
    tokenizer: dict[str, Any] = dataclasses.field(default_factory=dict)
    temperature: float = 1.0
    exactness: dict[str, str] = dataclasses.field(default_factory=dict)
    build: dict[str, Any] = dataclasses.field(default_factory=dict)
    shards: list[ShardInfo] = dataclasses.field(default_factory=list)
    id_map: dict[str, Any] | None = None  # {"file": ..., "sha256": ..., "size": V}
    duplicates_skipped: int = 0
    complete: bool = False
    created_at: str = ""
    updated_at: str = ""
    created_by: str = ""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    # -- totals, derived from the shard list (never stored twice)
    @property
    def sequences(self) -> int:
        return sum(s.sequences for s in self.shards)

    @property
    def positions(self) -> int:
        return sum(s.positions for s in self.shards)

    @property
    def entries(self) -> int:
        return sum(s.entries for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def has_policy(self) -> bool:
        """The responses were sampled from another model (``build --responses-from``): the shards hold the policy's
        per-position fields, which the exactness record lists (FORMAT.md)."""
        return all(name in self.exactness for name in POLICY_FIELDS)

    def shard_numbers(self) -> list[int]:
        """The number each shard was written under (its self-description's ``shard``): its index among the
        listed shards of its own directory. One directory (``shards/``) gives 0, 1, 2, ...; a cache gathered
        from parts (``logitstore.parts``) numbers each part's shards from 0."""
        seen: dict[str, int] = {}
        out = []
        for s in self.shards:
            d = str(PurePosixPath(s.file).parent)
            out.append(seen.get(d, 0))
            seen[d] = out[-1] + 1
        return out

    def totals_problem(self) -> str | None:
        """What is wrong with the stored ``totals`` (derived from the shard list, so a shard entry dropped or
        edited alone shows here), or None."""
        stored = getattr(self, "stored_totals", None)
        derived = {k: v for k, v in self.to_dict()["totals"].items() if k != "bytes"}  # sizes: checked per shard
        if stored is None or (isinstance(stored, dict) and {k: stored.get(k) for k in derived} == derived):
            return None
        return f"'totals' {stored!r:.200} disagree with the shard list (the manifest was edited or damaged)"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["totals"] = {
            "sequences": self.sequences,
            "positions": self.positions,
            "targets": sum(s.targets for s in self.shards),
            "entries": self.entries,
            "bytes": self.bytes,
        }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        if d.get("format") != FORMAT_NAME:
            raise CorruptCacheError(f"{where}: 'format' is {d.get('format')!r}, expected {FORMAT_NAME!r}")
        version = d.get("format_version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise FormatVersionError(
                f"{where}: format_version {version!r} is not readable by this logitstore "
                f"(reads {', '.join(map(str, READABLE_VERSIONS))}); "
                + ("upgrade logitstore" if isinstance(version, int) and version > FORMAT_VERSION
                   else "rebuild the cache")
            )
        _check_checksum(d, version, where)
        totals = d.get("totals")
        if totals is None and version >= 2:
            raise CorruptCacheError(f"{where}: 'totals' is missing; a format_version {version} manifest always has "
                                    "it (the manifest was edited or damaged)")
        d = {k: v for k, v in d.items() if k not in ("totals", CHECKSUM_KEY)}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        missing = names - set(d)  # the writer writes every key: a missing one (say "shards") is damage
        if unknown or missing:
            raise CorruptCacheError(f"{where}: unknown keys {sorted(unknown)} / missing keys {sorted(missing)}")
        try:
            d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
            m = cls(**d)
        except TypeError as exc:
            raise CorruptCacheError(f"{where}: malformed shard entry: {exc}") from exc
        _check_types(m, where)
        m.stored_totals = totals  # checked by readers (``totals_problem``); verify reports it with the rest
        paths = [("shard", s.file) for s in m.shards] + ([("id_map", m.id_map["file"])] if m.id_map else [])
        for what, file in paths:
            if not _inside(file):
                raise CorruptCacheError(f"{where}: {what} path {file!r} points outside the cache directory")
        return m


def manifest_checksum(d: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of every key of the manifest ``d`` but ``checksum``: keys sorted at every
    level, separators ``,`` and ``:`` without spaces, non-ASCII characters escaped (Python's ``json.dumps(body,
    sort_keys=True, separators=(",", ":"))``), encoded as UTF-8."""
    body = {k: v for k, v in d.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _check_checksum(d: dict[str, Any], version: int, where: str) -> None:
    """Refuse a manifest whose content is not what logitstore wrote: a checksum that does not match, or none in a
    format that always has one (version 1 manifests have none and are read as they are)."""
    stored = d.get(CHECKSUM_KEY)
    if stored is None and version == 1:
        return
    if stored is None:
        raise CorruptCacheError(f"{where}: no '{CHECKSUM_KEY}' key, which every format_version {version} manifest "
                                "has: the manifest was edited or damaged; restore it from a copy or rebuild the cache")
    if stored != manifest_checksum(d):
        raise CorruptCacheError(f"{where}: its '{CHECKSUM_KEY}' does not match its content: the manifest was edited "
                                "or damaged (only logitstore writes it); restore it from a copy or rebuild the cache")


def _is_int(x: object, lo: int = 0, hi: int = 2**63 - 1) -> bool:
    return type(x) is int and lo <= x <= hi


def _check_types(m: Manifest, where: str) -> None:
    """Every value a reader computes with has its type and range (an edited manifest fails here, by name)."""
    from logitstore.codec import Codec
    from logitstore.errors import LogitstoreError
    from logitstore.rules import rule_from_dict

    def bad(key: str, value: object, want: str) -> CorruptCacheError:
        return CorruptCacheError(f"{where}: {key} is {value!r:.80}, expected {want}")

    if not _is_int(m.vocab_size, 1, 2**31 - 1):
        raise bad("vocab_size", m.vocab_size, "an integer in [1, 2**31)")
    for key in ("rule", "codec", "teacher", "tokenizer", "exactness", "build"):
        if not isinstance(getattr(m, key), dict):
            raise bad(key, getattr(m, key), "a JSON object")
    try:
        rule_from_dict(m.rule)
        Codec.from_dict(m.codec)
    except (LogitstoreError, TypeError, ValueError, KeyError) as exc:
        raise CorruptCacheError(f"{where}: rule {m.rule!r:.80} / codec {m.codec!r:.120} is malformed ({exc})") from exc
    if m.format_version < 3 <= version_for(m.rule):  # systematic draws in an older manifest: no writer makes it
        raise bad("format_version", m.format_version, f"3 or later for rule {m.rule}")
    if sum(name in m.exactness for name in POLICY_FIELDS) == 1:
        raise bad("exactness", m.exactness, f"both or neither of {', '.join(POLICY_FIELDS)}")
    if type(m.complete) is not bool:
        raise bad("complete", m.complete, "true or false")
    if not _is_int(m.duplicates_skipped):
        raise bad("duplicates_skipped", m.duplicates_skipped, "a non-negative integer")
    if type(m.temperature) not in (int, float):
        raise bad("temperature", m.temperature, "a number")
    if m.id_map is not None and not (isinstance(m.id_map, dict) and isinstance(m.id_map.get("file"), str)
                                     and isinstance(m.id_map.get("sha256"), str)):
        raise bad("id_map", m.id_map, 'null or {"file", "sha256", "size"}')
    for i, s in enumerate(m.shards):
        for key in ("sequences", "positions", "targets", "entries", "bytes"):
            if not _is_int(getattr(s, key)):
                raise bad(f"shards[{i}].{key}", getattr(s, key), "a non-negative integer")
        if not isinstance(s.sha256, str) or len(s.sha256) != 64:
            raise bad(f"shards[{i}].sha256", s.sha256, "64 hex digits")
        if not isinstance(s.file, str):
            raise bad(f"shards[{i}].file", s.file, "a relative path")


def _inside(file: object) -> bool:
    """A relative POSIX path that stays inside the cache directory (no absolute path, no '..', no backslash
    or drive that another platform would read as one)."""
    if not isinstance(file, str) or not file or "\\" in file or "\x00" in file:
        return False
    p = PurePosixPath(file)
    return bool(p.parts) and not p.is_absolute() and ".." not in p.parts and ":" not in p.parts[0]


def require_current_version(m: Manifest, path: str | os.PathLike, doing: str = "resume") -> None:
    """Refuse to add to a cache of another format version than the one this logitstore writes for its rule
    (``format.version_for``): its new shards would describe themselves as another version than the manifest
    (readers refuse such a mix)."""
    want = version_for(m.rule)
    if m.format_version != want:
        raise FormatVersionError(
            f"cannot {doing} {path}: it is a format_version {m.format_version} cache and this logitstore writes "
            f"version {want} for its rule; finish it with the logitstore that started it, or rebuild it into a new "
            "directory (it stays readable as it is)")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def not_a_cache(path: str | os.PathLike) -> str:
    """Why ``path`` cannot be opened as a cache, in one phrase; for a union of caches (a distill run), which
    commands take it whole and where its member caches are."""
    if (Path(path) / UNION_NAME).is_file():
        return (f"{path}: a union of caches (a distill run: {UNION_NAME}), not one cache; sql, info and verify take it "
                f"whole, other commands one member: {Path(path) / 'round-001' / 'cache'}, ... (`logitstore info "
                f"{path}` lists them)")
    return f"{path}: not a logitstore cache (no {MANIFEST_NAME})"


def load_manifest(cache_dir: str | os.PathLike) -> Manifest:
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CacheNotFoundError(not_a_cache(cache_dir))
    d = read_json(path, CorruptCacheError)
    if not isinstance(d, dict):
        raise CorruptCacheError(f"{path}: expected a JSON object")
    return Manifest.from_dict(d, where=str(path))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, I/O error: the old file stays, and no temporary file is left
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_manifest(cache_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Write ``manifest`` atomically, with its ``checksum`` as the last key (computed over the document as it
    will be read back, so that reading it gives the same checksum)."""
    manifest.updated_at = now()
    d = json.loads(json.dumps(manifest.to_dict()))
    d[CHECKSUM_KEY] = manifest_checksum(d)
    atomic_write_bytes(Path(cache_dir) / MANIFEST_NAME, json.dumps(d, indent=1).encode("utf-8"))
