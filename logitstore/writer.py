"""``CacheWriter``: appends sequences with their sparse teacher distributions to a cache.

A context manager. Sequences are buffered and written as Parquet row groups into
the shard in progress (a hidden ``.tmp`` file); when the shard passes
``shard_bytes`` it is fsynced, renamed to its final name, and the manifest is
rewritten atomically to list it. A crash therefore loses at most the shard in
progress and never exposes a half-written one; ``resume=True`` reopens a cache,
drops anything the manifest does not list, and continues after the last
committed shard (``committed_ids`` tells a builder what to skip).

A writer holds the cache's build lock (``logitstore.lock``) from ``open`` to
``close``/``abort``, so a second writer is refused with ``CacheLockedError``
naming the holder, and the lock of a killed writer is taken over. An I/O error
(disk full) raises ``CacheWriteError`` and leaves the last committed manifest in
place: the cache stays readable and resumable. A writer that created the
directory and fails before its first commit removes it again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitstore import codec as C
from logitstore import format as F
from logitstore import remote
from logitstore.contract import Contract, as_numpy, check_rule_and_codec
from logitstore.encode import encode_rows, shard_writer
from logitstore.errors import CacheExistsError, CacheWriteError, InvalidInputError, LogitstoreError
from logitstore.idmap import read_id_map, write_id_map
from logitstore.lock import BuildLock
from logitstore.manifest import (
    EXACTNESS_WORDS,
    Manifest,
    ShardInfo,
    fsync_dir,
    load_manifest,
    now,
    require_current_version,
    save_manifest,
)
from logitstore.ownership import check_output_dir, remove_own_files, rmdir_if_empty, stray_shard_files
from logitstore.records import SequenceRecord
from logitstore.rules import Rule, TopKTail
from logitstore.settings import fill_defaults
from logitstore.version import __version__

logger = logging.getLogger(__name__)



def sequence_id(input_ids: np.ndarray, extra: bytes | str = b"") -> str:
    """Content hash of a token sequence (blake2b-64 of the int32 ids, plus ``extra``), 16 hex chars."""
    h = hashlib.blake2b(np.ascontiguousarray(input_ids, dtype="<i4").tobytes(), digest_size=8)
    h.update(extra.encode() if isinstance(extra, str) else extra)
    return h.hexdigest()


def default_seq_id(input_ids: np.ndarray, sample: int = 0) -> str:
    """The id ``CacheWriter.add`` gives a sequence when none is passed: its tokens, and its sample index if > 0."""
    return sequence_id(input_ids, f"/{sample}" if sample else b"")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class CacheWriter:
    """Write a cache. See the module docstring; all arguments are keyword-only but ``path``."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        vocab_size: int,
        rule: Rule,
        codec: C.Codec = C.Codec(),
        teacher: dict[str, Any] | None = None,
        tokenizer: dict[str, Any] | None = None,
        build: dict[str, Any] | None = None,
        exactness: dict[str, str] | None = None,
        temperature: float = 1.0,
        shard_bytes: int = 256 << 20,
        row_group_positions: int = 65536,
        resume: bool = False,
        resume_build_keys: tuple[str, ...] = (),
        resume_defaults: dict[str, dict[str, Any]] | None = None,
        id_counts: np.ndarray | None = None,
        policy: bool = False,
        lock: bool = True,
    ):
        if not (1 <= vocab_size <= 2**31 - 1):
            raise InvalidInputError(f"vocab_size={vocab_size} must be in [1, 2**31)")
        if shard_bytes < 1:
            raise InvalidInputError(f"shard_bytes={shard_bytes} must be positive")
        if row_group_positions < 1:
            raise InvalidInputError(f"row_group_positions={row_group_positions} must be positive")
        # an object-store URL: shards are staged in a local directory and uploaded whole (``logitstore.remote``)
        self.target = remote.RemoteTarget(path, lock=lock) if remote.is_remote(path) else None
        if not lock and self.target is None:
            raise InvalidInputError("lock=False (--no-lock) is for object stores without conditional creates; a "
                                    "local cache always takes its build lock")
        self.location = self.target.url if self.target is not None else str(path)
        self.path = self.target.staging if self.target is not None else Path(path)
        self.rule, self.codec = rule, codec
        self.vocab_size = int(vocab_size)
        self.shard_bytes, self.row_group_positions = int(shard_bytes), int(row_group_positions)
        check_rule_and_codec(rule, codec)
        values = {"fp32": "exact", "none": "absent"}.get(codec.values, "quantised")
        scalars = "exact" if codec.scalars == "fp32" else "quantised"
        ex = {"topk_logprobs": values, "label_logprob": scalars, "entropy": scalars, "tail_mass": scalars}
        if isinstance(rule, TopKTail):
            ex["tail_logprobs"] = values
        if rule.tempered:
            ex["proposal_log_norm"] = scalars
        if policy:  # responses sampled from another model: its per-position fields (SequenceRecord.policy_*)
            ex.update({name: scalars for name in F.POLICY_FIELDS})
        for key, word in (exactness or {}).items():
            if key not in ex or word not in EXACTNESS_WORDS:
                raise InvalidInputError(
                    f"exactness {key}={word!r}: fields are {sorted(ex)}, words are {EXACTNESS_WORDS}")
            ex[key] = word
        self._new_manifest = Manifest(
            vocab_size=self.vocab_size, rule=rule.to_dict(), codec=codec.to_dict(), teacher=dict(teacher or {}),
            tokenizer=dict(tokenizer or {}), temperature=float(temperature), exactness=ex, build=dict(build or {}),
            format_version=F.version_for(rule.to_dict()),
        )
        self.resume = resume
        self.resume_build_keys = tuple(resume_build_keys)  # build arguments a resume must match, besides identity
        self.resume_defaults = dict(resume_defaults or {})  # their sub-settings' defaults (logitstore.settings)
        # token frequencies the ranked id map is built from (default: the first row group's entries); writers of
        # the parts of one cache (``logitstore.parts``) pass the same counts, so the parts share one id map
        self.id_counts = None if id_counts is None else np.asarray(id_counts, np.int64).ravel()
        self.policy = bool(policy)
        self._contract = Contract(rule, codec, self.vocab_size, policy=self.policy)
        self.schema = F.shard_schema(rule=rule.name, value_codec=codec.values, id_codec=codec.ids,
                                     scalar_dtype=codec.scalars, tempered=rule.tempered, policy=self.policy)
        self.manifest: Manifest | None = None
        self.committed_ids: set[str] = set()
        self._seen: set[str] = set()
        self._buf: list[dict[str, Any]] = []
        self._buf_positions = 0
        self._pq: pq.ParquetWriter | None = None
        self._shard_tmp: Path | None = None
        self._shard_stats = [0, 0, 0, 0]  # sequences, positions, targets, entries
        self._code_of: np.ndarray | None = None  # token id -> code (ranked ids)
        self._lock: BuildLock | None = None
        self._created = False  # this writer created the directory (removed again if nothing gets committed)

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> CacheWriter:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def open(self) -> None:
        if self.target is not None:
            self.target.refuse_foreign()  # ours, or refused: nothing of a user's is touched
            self.target.lock.acquire()  # the lock object (conditional create), before looking at the manifest
            self._lock = self.target.lock
        else:
            check_output_dir(self.path)  # ours, or refused: nothing of a user's is touched
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = BuildLock(self.path)
            try:
                self._lock.acquire()  # before looking at the manifest: a build in progress is reported as such
            except BaseException:
                self._lock = None
                if self._created:
                    rmdir_if_empty(self.path)
                raise
        try:
            if self.target is not None:  # a fresh staging directory with the remote manifest and id map, if any
                self.target.prepare()
                self._created = not (self.path / F.MANIFEST_NAME).is_file()
            self._open_locked()
        except BaseException as exc:
            self._release(remove_created=True)
            if _is_io_error(exc):
                raise self._write_error(exc, "opening the cache") from exc
            raise

    def _save(self) -> None:
        """Commit the manifest: write it atomically, and for an object store upload it as one object."""
        save_manifest(self.path, self.manifest)
        if self.target is not None:
            self.target.upload(self.path / F.MANIFEST_NAME, F.MANIFEST_NAME)

    def _open_locked(self) -> None:
        shard_dir = self.path / F.SHARD_DIR
        has_manifest = (self.path / F.MANIFEST_NAME).is_file()
        if has_manifest and not self.resume:
            raise CacheExistsError(f"{self.path} already holds a cache; pass resume=True (--resume) to continue it")
        shard_dir.mkdir(parents=True, exist_ok=True)
        if has_manifest:
            self.manifest = load_manifest(self.path)
            self._check_resume_compatible(self.manifest)
            if self.manifest.id_map:
                self._code_of = C.invert_id_map(read_id_map(self.path, self.manifest))
            self.committed_ids = self._read_committed_ids()
            self._seen = set(self.committed_ids)
        else:
            self.manifest = self._new_manifest
            self.manifest.created_at = now()
            self.manifest.created_by = f"logitstore {__version__}"
        if self.target is not None:
            self.target.remove_strays({s.file for s in self.manifest.shards})
        # a shard file of ours that the manifest does not list is an interrupted write: drop it; leave anything else
        ours, foreign = stray_shard_files(shard_dir, {Path(s.file).name for s in self.manifest.shards})
        for p in ours:
            logger.warning("removing %s (not committed in the manifest)", p)
            p.unlink()
        for p in foreign:
            logger.warning("leaving %s in place: not a file logitstore writes (verify reports it)", p)
        if not self.manifest.id_map:
            for p in (self.path / F.ID_MAP_NAME, self.path / f".{F.ID_MAP_NAME}.tmp"):
                p.unlink(missing_ok=True)
        self.manifest.complete = False
        self._save()

    def close(self) -> Manifest:
        """Write what is buffered, commit the last shard, mark the cache complete and release the lock."""
        try:
            self._flush()
            self._commit_shard()
            self.manifest.complete = True
            self._save()
        except BaseException as exc:
            self.abort()
            if _is_io_error(exc):
                raise self._write_error(exc, "closing the cache") from exc
            raise
        self._release(remove_created=False)
        return self.manifest

    def abort(self) -> None:
        """Drop the shard in progress and release the lock; the cache stays at its last commit (resumable).
        A cache directory this writer created and committed nothing to is removed."""
        if self._pq is not None:
            try:
                self._pq.close()
            except (OSError, pa.ArrowException) as exc:  # the shard is dropped anyway; the first error is raised
                logger.warning("closing the interrupted shard %s failed: %s", self._shard_tmp, exc)
            finally:
                self._pq = None
        if self._shard_tmp is not None:
            self._shard_tmp.unlink(missing_ok=True)
            self._shard_tmp = None
        self._buf, self._buf_positions = [], 0
        self._release(remove_created=True)

    def _release(self, *, remove_created: bool) -> None:
        """Release the build lock; first remove the directory if this writer created it and committed nothing."""
        if self._lock is None:
            return
        empty = self._created and not (self.manifest and self.manifest.shards)
        if remove_created and empty:
            remove_own_files(self.path)
            if self.target is not None:
                self.target.remove_uncommitted()
        self._lock.release()
        self._lock = None
        if self.target is not None:
            self.target.finish()
        elif remove_created and empty:
            rmdir_if_empty(self.path)

    def _write_error(self, exc: OSError, doing: str) -> CacheWriteError:
        what = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename else ""
        m = self.manifest
        state = (f"the cache is at its last commit ({len(m.shards)} shards, {m.sequences} sequences) and resumable: "
                 "fix the cause (e.g. free disk space) and rerun with resume=True (--resume)") \
            if m is not None and m.shards else "nothing was committed"
        err = CacheWriteError(f"{self.location}: {doing} failed: {what}{where}; {state}")
        err.errno = exc.errno
        return err

    def _check_resume_compatible(self, old: Manifest) -> None:
        require_current_version(old, self.path)
        new = self._new_manifest
        diffs = [
            teacher_diff(old.teacher, new.teacher) if name == "teacher" else
            f"{name}: cache has {getattr(old, name)!r}, this build has {getattr(new, name)!r}"
            for name in ("vocab_size", "rule", "codec", "teacher", "tokenizer", "temperature")
            if not (same_tokenizer(old.tokenizer, new.tokenizer) if name == "tokenizer" else
                    getattr(old, name) == getattr(new, name))
        ] + build_key_diffs(old.build, new.build, self.resume_build_keys, self.resume_defaults)
        if old.has_policy != self.policy:
            diffs.append(f"policy fields: cache has {'them' if old.has_policy else 'none'}, this build "
                         f"{'has them' if self.policy else 'has none'} (responses from another model or not)")
        if diffs:
            raise InvalidInputError(f"cannot resume {self.location}: " + "; ".join(diffs))

    def _read_committed_ids(self) -> set[str]:
        ids: set[str] = set()
        for s in self.manifest.shards:
            if self.target is not None:
                ids.update(self.target.seq_ids(s.file))
                continue
            ids.update(pq.read_table(self.path / s.file, columns=["seq_id"]).column(0).to_pylist())
        return ids

    # ------------------------------------------------------------ adding data
    def add(self, rec: SequenceRecord) -> bool:
        """Append one sequence (``logitstore.records``: its tokens and the ``Scored`` values of its cached
        positions). Returns False (and counts it) when its ``seq_id`` is already in the cache. Raises
        ``InvalidInputError`` naming the sequence when the record breaks the data contract (FORMAT.md)."""
        if not isinstance(rec, SequenceRecord):
            raise InvalidInputError(f"CacheWriter.add takes a logitstore.SequenceRecord, got {type(rec).__name__}")
        tok = as_numpy(rec.input_ids).astype(np.int32, copy=False).ravel()
        sid = rec.seq_id if rec.seq_id is not None else default_seq_id(tok, rec.sample)
        if not isinstance(sid, str) or not (1 <= len(sid) <= 128):
            raise InvalidInputError(f"seq_id {sid!r} must be a non-empty string of at most 128 characters")
        if sid in self._seen:
            self.manifest.duplicates_skipped += 1
            return False
        a = self._contract.arrays(sid, tok, rec)
        self._contract.check(sid, a)
        row = self._contract.row(sid, tok, rec, a)
        self._buf.append(row)
        self._seen.add(sid)
        self._buf_positions += a.pos.size
        if self._buf_positions >= self.row_group_positions:
            try:
                self._flush()
            except OSError as exc:
                if _is_io_error(exc):
                    raise self._write_error(exc, "writing a shard") from exc
                raise
        return True

    def _flush(self) -> None:
        if not self._buf:
            return
        buf, self._buf, self._buf_positions = self._buf, [], 0
        if self.codec.ids == "ranked" and self._code_of is None:
            self._write_id_map(np.concatenate([b["ids"] for b in buf]))
        table = encode_rows(buf, schema=self.schema, codec=self.codec, code_of=self._code_of)
        if self._pq is None:
            self._open_shard()
        self._pq.write_table(table, row_group_size=len(buf))
        st = self._shard_stats
        st[0] += len(buf)
        st[1] += sum(b["pos"].size for b in buf)
        st[2] += sum(b["n_targets"] for b in buf)
        st[3] += sum(b["ids"].size for b in buf)
        if self._shard_tmp.stat().st_size >= self.shard_bytes:
            self._commit_shard()

    def _open_shard(self) -> None:
        index = len(self.manifest.shards)
        name = F.SHARD_PATTERN.format(index=index)
        self._shard_tmp = self.path / F.SHARD_DIR / f".{name}.tmp"
        meta = {"format": F.FORMAT_NAME, "format_version": self.manifest.format_version, "shard": index,
                "vocab_size": self.vocab_size, "rule": self.manifest.rule, "codec": self.manifest.codec,
                "id_map_sha256": (self.manifest.id_map or {}).get("sha256")}
        self._pq = shard_writer(self._shard_tmp, self.schema, meta, self.codec)

    def _commit_shard(self) -> None:
        if self._pq is None:
            return
        self._pq.close()
        self._pq = None
        tmp = self._shard_tmp  # until renamed, a failure leaves it to abort() to delete
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = tmp.with_name(tmp.name[1:-len(".tmp")])
        info = ShardInfo(file=f"{F.SHARD_DIR}/{final.name}", sequences=self._shard_stats[0],
                         positions=self._shard_stats[1], targets=self._shard_stats[2], entries=self._shard_stats[3],
                         bytes=tmp.stat().st_size, sha256=file_sha256(tmp))
        os.replace(tmp, final)
        self._shard_tmp = None
        if self.target is not None:
            try:
                self.target.upload(final, info.file)  # whole, under its final name, before the manifest lists it
            finally:
                final.unlink(missing_ok=True)  # staged only
        self.manifest.shards.append(info)
        try:
            fsync_dir(final.parent)
            self._save()
        except BaseException:
            self._uncommit(info, final)
            raise
        self._shard_stats = [0, 0, 0, 0]
        logger.info("committed %s (%d sequences, %d positions, %d bytes)", info.file, info.sequences,
                    info.positions, info.bytes)

    def _uncommit(self, info: ShardInfo, final: Path) -> None:
        """After a failed manifest write: forget the shard, and delete its file unless the manifest on disk
        lists it (the rename can have happened before the failure), so no unlisted shard is left behind."""
        if self.target is not None:  # the remote manifest was not replaced; the uploaded object is a stray
            self.manifest.shards.pop()
            return
        try:
            listed = info.file in {s.file for s in load_manifest(self.path).shards}
        except (OSError, LogitstoreError):
            listed = False
        if listed:
            return
        self.manifest.shards.pop()
        final.unlink(missing_ok=True)

    def _write_id_map(self, sample_ids: np.ndarray) -> None:
        id_map = C.build_id_map(sample_ids, self.vocab_size) if self.id_counts is None \
            else C.id_map_from_counts(self.id_counts, self.vocab_size)
        self.manifest.id_map = write_id_map(self.path, id_map)
        if self.target is not None:
            self.target.upload(self.path / self.manifest.id_map["file"], self.manifest.id_map["file"])
        self._code_of = C.invert_id_map(id_map)


def same_tokenizer(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether two tokenizer records name one tokenizer: by fingerprint and vocabulary size where both have a
    fingerprint (its name is where it was loaded from, which a resume from another directory spells otherwise),
    else by the whole record."""
    if old.get("fingerprint") and new.get("fingerprint"):
        return (old["fingerprint"], old.get("vocab_size")) == (new["fingerprint"], new.get("vocab_size"))
    return old == new


def teacher_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between the teacher a cache was started with and this build's, in one phrase; a changed
    revision (the content hash of its files) comes first: a resume would mix two teachers' values."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    moved = "revision" in keys
    phrases = [f"teacher {k}: cache has {old.get(k)!r:.120}, this build has {new.get(k)!r:.120}"
               for k in keys if not (moved and k in ("revision", "hashed"))]
    if moved:
        phrases.insert(0, f"teacher revision: cache has {old.get('revision')!r}, this build has "
                          f"{new.get('revision')!r} ({new.get('hashed') or 'no content hash'}): the teacher at "
                          f"{new.get('path', new.get('id'))!r} is not the one the cache was started with, and a "
                          "resume would mix two teachers' values")
    return "; ".join(phrases)


def build_key_diffs(old: dict[str, Any], new: dict[str, Any], keys: tuple[str, ...],
                    defaults: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """What a resume would change in the build arguments ``keys``, one phrase per differing key. ``defaults``: the
    declared defaults of dict-valued arguments, for the sub-settings an older build did not record
    (``logitstore.settings``)."""
    old = fill_defaults(old, new, defaults or {})
    return [f"build {key}: cache has {old.get(key)!r}, this build has {new.get(key)!r}"
            for key in keys if old.get(key) != new.get(key)]


def _is_io_error(exc: BaseException) -> bool:
    """An OS-level failure (disk full, I/O error), not one of logitstore's own errors that subclass OSError."""
    return isinstance(exc, OSError) and not isinstance(exc, LogitstoreError)
