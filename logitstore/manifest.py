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
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from logitstore.errors import CacheNotFoundError, CorruptCacheError, FormatVersionError
from logitstore.format import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, READABLE_VERSIONS

#: Allowed words for a field's exactness (see FORMAT.md, "Exactness").
EXACTNESS_WORDS = ("exact", "quantised", "estimate", "bound", "absent")


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
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> "Manifest":
        if d.get("format") != FORMAT_NAME:
            raise CorruptCacheError(f"{where}: 'format' is {d.get('format')!r}, expected {FORMAT_NAME!r}")
        version = d.get("format_version")
        if version not in READABLE_VERSIONS:
            raise FormatVersionError(
                f"{where}: format_version {version!r} is not readable by this logitstore "
                f"(reads {', '.join(map(str, READABLE_VERSIONS))}); "
                + ("upgrade logitstore" if isinstance(version, int) and version > FORMAT_VERSION else "rebuild the cache")
            )
        d = {k: v for k, v in d.items() if k != "totals"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING} - set(d)
        if unknown or missing:
            raise CorruptCacheError(f"{where}: unknown keys {sorted(unknown)} / missing keys {sorted(missing)}")
        try:
            d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
            m = cls(**d)
        except TypeError as exc:
            raise CorruptCacheError(f"{where}: malformed shard entry: {exc}") from exc
        for s in m.shards:
            p = PurePosixPath(s.file)
            if p.is_absolute() or ".." in p.parts:
                raise CorruptCacheError(f"{where}: shard path {s.file!r} points outside the cache directory")
        return m


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def load_manifest(cache_dir: str | os.PathLike) -> Manifest:
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CacheNotFoundError(f"{cache_dir}: not a logitstore cache (no {MANIFEST_NAME})")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCacheError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(d, dict):
        raise CorruptCacheError(f"{path}: expected a JSON object")
    return Manifest.from_dict(d, where=str(path))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
    manifest.updated_at = now()
    data = json.dumps(manifest.to_dict(), indent=1, sort_keys=False).encode("utf-8")
    atomic_write_bytes(Path(cache_dir) / MANIFEST_NAME, data)
