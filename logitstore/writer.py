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
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitstore import codec as C
from logitstore import format as F
from logitstore.errors import CacheExistsError, CacheWriteError, InvalidInputError, LogitstoreError
from logitstore.lock import LOCK_NAME, BuildLock
from logitstore.manifest import EXACTNESS_WORDS, Manifest, ShardInfo, atomic_write_bytes, fsync_dir, load_manifest, now, save_manifest
from logitstore.rules import Rule, Sampled

logger = logging.getLogger(__name__)

_LP_TOL = 1e-4  # logprobs/entropies this far past their bound are rounding noise and get clamped
DATA_PAGE_BYTES = 2 << 20  # Parquet data page target: 2 MiB measured smallest at k=50 (BENCHMARKS.md)


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


def _np(x, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float8_e4m3fn", "torch.float8_e5m2"):  # numpy has no such dtype
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


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
        id_counts: np.ndarray | None = None,
    ):
        if not (1 <= vocab_size <= 2**31 - 1):
            raise InvalidInputError(f"vocab_size={vocab_size} must be in [1, 2**31)")
        if shard_bytes < 1:
            raise InvalidInputError(f"shard_bytes={shard_bytes} must be positive")
        if row_group_positions < 1:
            raise InvalidInputError(f"row_group_positions={row_group_positions} must be positive")
        self.path = Path(path)
        self.rule, self.codec = rule, codec
        self.vocab_size = int(vocab_size)
        self.shard_bytes, self.row_group_positions = int(shard_bytes), int(row_group_positions)
        if codec.values == "none" and not isinstance(rule, Sampled):
            raise InvalidInputError("codec values='none' (no logprobs stored) is only allowed under rule sample")
        ex = {
            "topk_logprobs": {"fp32": "exact", "none": "absent"}.get(codec.values, "quantised"),
            "label_logprob": "exact" if codec.scalars == "fp32" else "quantised",
            "entropy": "exact" if codec.scalars == "fp32" else "quantised",
            "tail_mass": "exact" if codec.scalars == "fp32" else "quantised",
        }
        for key, word in (exactness or {}).items():
            if key not in ex or word not in EXACTNESS_WORDS:
                raise InvalidInputError(
                    f"exactness {key}={word!r}: fields are {sorted(ex)}, words are {EXACTNESS_WORDS}")
            ex[key] = word
        self._new_manifest = Manifest(
            vocab_size=self.vocab_size, rule=rule.to_dict(), codec=codec.to_dict(), teacher=dict(teacher or {}),
            tokenizer=dict(tokenizer or {}), temperature=float(temperature), exactness=ex, build=dict(build or {}),
        )
        self.resume = resume
        self.resume_build_keys = tuple(resume_build_keys)  # build arguments a resume must match, besides identity
        # token frequencies the ranked id map is built from (default: the first row group's entries); writers of
        # the parts of one cache (``logitstore.parts``) pass the same counts, so the parts share one id map
        self.id_counts = None if id_counts is None else np.asarray(id_counts, np.int64).ravel()
        self.schema = F.shard_schema(rule=rule.name, value_codec=codec.values, id_codec=codec.ids,
                                     scalar_dtype=codec.scalars)
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
    def __enter__(self) -> "CacheWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def open(self) -> None:
        if not (self.path / F.MANIFEST_NAME).is_file() and self.path.exists() and \
                any(p.name not in (F.SHARD_DIR, LOCK_NAME) for p in self.path.iterdir()):
            raise CacheExistsError(f"{self.path} exists, is not empty and is not a cache; choose a new output path")
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
            self._open_locked()
        except BaseException as exc:
            self._release(remove_created=True)
            if _is_io_error(exc):
                raise self._write_error(exc, "opening the cache") from exc
            raise

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
                from logitstore.reader import read_id_map

                self._code_of = C.invert_id_map(read_id_map(self.path, self.manifest))
            self.committed_ids = self._read_committed_ids()
            self._seen = set(self.committed_ids)
        else:
            self.manifest = self._new_manifest
            self.manifest.created_at = now()
            self.manifest.created_by = f"logitstore {_version()}"
        # anything the manifest does not list is an interrupted shard or a stray file: drop it
        listed = {Path(s.file).name for s in self.manifest.shards}
        for p in shard_dir.iterdir():
            if p.name not in listed:
                logger.warning("removing %s (not committed in the manifest)", p)
                p.unlink()
        if not self.manifest.id_map:
            for p in (self.path / F.ID_MAP_NAME, self.path / f".{F.ID_MAP_NAME}.tmp"):
                p.unlink(missing_ok=True)
        self.manifest.complete = False
        save_manifest(self.path, self.manifest)

    def close(self) -> Manifest:
        """Write what is buffered, commit the last shard, mark the cache complete and release the lock."""
        try:
            self._flush()
            self._commit_shard()
            self.manifest.complete = True
            save_manifest(self.path, self.manifest)
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
            for name in (F.MANIFEST_NAME, f".{F.MANIFEST_NAME}.tmp", F.ID_MAP_NAME, f".{F.ID_MAP_NAME}.tmp"):
                (self.path / name).unlink(missing_ok=True)
            shard_dir = self.path / F.SHARD_DIR
            if shard_dir.is_dir():
                for p in shard_dir.iterdir():
                    p.unlink(missing_ok=True)
                rmdir_if_empty(shard_dir)
        self._lock.release()
        self._lock = None
        if remove_created and empty:
            rmdir_if_empty(self.path)

    def _write_error(self, exc: OSError, doing: str) -> CacheWriteError:
        what = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename else ""
        m = self.manifest
        state = (f"the cache is at its last commit ({len(m.shards)} shards, {m.sequences} sequences) and resumable: "
                 "fix the cause (e.g. free disk space) and rerun with resume=True (--resume)") \
            if m is not None and m.shards else "nothing was committed"
        err = CacheWriteError(f"{self.path}: {doing} failed: {what}{where}; {state}")
        err.errno = exc.errno
        return err

    def _check_resume_compatible(self, old: Manifest) -> None:
        new = self._new_manifest
        diffs = [
            f"{name}: cache has {getattr(old, name)!r}, this build has {getattr(new, name)!r}"
            for name in ("vocab_size", "rule", "codec", "teacher", "tokenizer", "temperature")
            if getattr(old, name) != getattr(new, name)
        ] + build_key_diffs(old.build, new.build, self.resume_build_keys)
        if diffs:
            raise InvalidInputError(f"cannot resume {self.path}: " + "; ".join(diffs))

    def _read_committed_ids(self) -> set[str]:
        ids: set[str] = set()
        for s in self.manifest.shards:
            ids.update(pq.read_table(self.path / s.file, columns=["seq_id"]).column(0).to_pylist())
        return ids

    # ------------------------------------------------------------ adding data
    def add(
        self,
        *,
        input_ids,
        ids,
        logprobs,
        label_logprob,
        entropy,
        tail_mass,
        positions=None,
        n_entries=None,
        counts=None,
        loss_mask=None,
        argmax=None,
        seq_id: str | None = None,
        record: int = 0,
        sample: int = 0,
        correct: bool | None = None,
        aggregates: dict[str, float | None] | None = None,
    ) -> bool:
        """Append one sequence. Returns False (and counts it) when its ``seq_id`` is already in the cache.

        Shapes: ``input_ids [T]``; per cached position (N of them): ``positions [N]`` (default
        ``1..T-1``), ``ids``/``logprobs`` ``[N, K]`` sorted by logprob descending with
        ``n_entries [N]`` valid (default K), ``counts [N, K]`` (rule sample), ``label_logprob``,
        ``entropy``, ``tail_mass``, ``loss_mask`` (default all true), ``argmax`` (the teacher's top-1
        id, default ``ids[:, 0]``; needed for token_accuracy under rule sample). ``logprobs`` may be
        None only when the codec stores none. ``aggregates`` (mean_entropy, teacher_nll,
        token_accuracy) replaces the recomputation, to carry values over from another cache.
        """
        tok = _np(input_ids).astype(np.int32, copy=False).ravel()
        T = tok.size
        sid = seq_id if seq_id is not None else default_seq_id(tok, sample)
        if not isinstance(sid, str) or not (1 <= len(sid) <= 128):
            raise InvalidInputError(f"seq_id {sid!r} must be a non-empty string of at most 128 characters")
        if sid in self._seen:
            self.manifest.duplicates_skipped += 1
            return False
        pos = np.arange(1, T, dtype=np.int32) if positions is None else _np(positions).astype(np.int32).ravel()
        N = pos.size
        ids = _np(ids)
        if logprobs is None:
            if self.codec.values != "none":
                raise InvalidInputError(f"seq {sid}: logprobs are required unless the codec stores none")
            logprobs = np.zeros(ids.shape, np.float32)  # placeholders: checked trivially, never stored
        lp = _np(logprobs, np.float32)
        if ids.ndim != 2 or lp.shape != ids.shape or ids.shape[0] != N:
            raise InvalidInputError(
                f"seq {sid}: ids {ids.shape} and logprobs {lp.shape} must both be [N, K] with N={N} positions")
        K = ids.shape[1]
        if K > self.rule.k or K < 1:
            raise InvalidInputError(f"seq {sid}: {K} entries per position; the rule allows 1..{self.rule.k}")
        n_ent = np.full(N, K, np.int32) if n_entries is None else _np(n_entries).astype(np.int32).ravel()
        cnt = None if counts is None else _np(counts)
        if isinstance(self.rule, Sampled) != (cnt is not None):
            raise InvalidInputError(f"seq {sid}: counts are required under rule sample and only there")
        lab_lp = _np(label_logprob, np.float32).ravel()
        ent = _np(entropy, np.float32).ravel()
        tail = _np(tail_mass, np.float32).ravel()
        mask = np.ones(N, bool) if loss_mask is None else _np(loss_mask).astype(bool).ravel()
        for name, a in (("n_entries", n_ent), ("label_logprob", lab_lp), ("entropy", ent), ("tail_mass", tail),
                        ("loss_mask", mask)):
            if a.size != N:
                raise InvalidInputError(f"seq {sid}: {name} has {a.size} values for {N} positions")
        # ---- the data contract, vectorised
        if T and (tok.min() < 0 or tok.max() >= self.vocab_size):
            raise InvalidInputError(f"seq {sid}: input_ids outside [0, {self.vocab_size})")
        if N and (pos[0] < 1 or pos[-1] >= T or (N > 1 and np.diff(pos).min() <= 0)):
            raise InvalidInputError(f"seq {sid}: positions must be strictly increasing within [1, {T - 1}]")
        if N and (n_ent.min() < 1 or n_ent.max() > K):
            raise InvalidInputError(f"seq {sid}: n_entries must be within [1, {K}]")
        fixed = not N or int(n_ent.min()) == K  # every position has K entries: no masks, no copies
        valid = np.ones((N, K), bool) if fixed else np.arange(K)[None, :] < n_ent[:, None]
        ids_v, lp_v = (ids.reshape(-1), lp.reshape(-1)) if fixed else (ids[valid], lp[valid])
        if ids_v.size and (ids_v.min() < 0 or ids_v.max() >= self.vocab_size):
            raise InvalidInputError(f"seq {sid}: entry ids outside [0, {self.vocab_size})")
        if not np.isfinite(lp_v).all() or (lp_v.size and lp_v.max() > _LP_TOL):
            raise InvalidInputError(f"seq {sid}: entry logprobs must be finite and <= 0")
        if K > 1 and ((lp[:, 1:] > lp[:, :-1]) if fixed else ((lp[:, 1:] > lp[:, :-1]) & valid[:, 1:])).any():
            raise InvalidInputError(f"seq {sid}: entries must be sorted by logprob, most likely first")
        if K > 1 and has_repeats(ids, None if fixed else valid):
            raise InvalidInputError(f"seq {sid}: a position lists the same token id twice")
        if not (np.isfinite(lab_lp).all() and lab_lp.max(initial=0) <= _LP_TOL):
            raise InvalidInputError(f"seq {sid}: label_logprob must be finite and <= 0")
        if not (np.isfinite(ent).all() and ent.min(initial=0) >= -_LP_TOL):
            raise InvalidInputError(f"seq {sid}: entropy must be finite and >= 0")
        if not (tail.min(initial=0) >= -_LP_TOL and tail.max(initial=0) <= 1 + _LP_TOL):
            raise InvalidInputError(f"seq {sid}: tail_mass must be within [0, 1]")
        if self.codec.values == "qdelta" and lp_v.size and lp_v.min() < -C.QDELTA_MAX * self.codec.logprob_step:
            raise InvalidInputError(f"seq {sid}: logprobs below {-C.QDELTA_MAX * self.codec.logprob_step:.0f} nats "
                                    f"do not fit the qdelta codec at step {self.codec.logprob_step}")
        if "fp16" in (self.codec.values, self.codec.scalars):
            floor = -65504.0  # the most negative finite IEEE half
            if (self.codec.values == "fp16" and lp_v.min(initial=0) < floor) or \
                    (self.codec.scalars == "fp16" and lab_lp.min(initial=0) < floor):
                raise InvalidInputError(f"seq {sid}: logprobs below {floor} do not fit the fp16 codec")
        if cnt is not None:
            if cnt.shape != ids.shape or (cnt[valid] < 1).any() or \
                    (np.where(valid, cnt, 0).sum(axis=1) > self.rule.draws).any():
                raise InvalidInputError(
                    f"seq {sid}: counts must be [N, K], >= 1 on valid entries and sum to at most "
                    f"draws={self.rule.draws} per position")
        if lp_v.size and lp_v.max() > 0:  # rounding noise above 0 (checked <= _LP_TOL above); never edit in place
            lp_v = np.minimum(lp_v, 0)
        # ---- aggregates over target positions, from the full-precision inputs
        labels = tok[pos]
        top1 = None if argmax is None else _np(argmax).ravel()
        if top1 is None and not isinstance(self.rule, Sampled):
            top1 = ids[:, 0]
        nt = int(mask.sum())
        agg = {
            "mean_entropy": float(ent[mask].mean()) if nt else None,
            "teacher_nll": float(-lab_lp[mask].mean()) if nt else None,
            "token_accuracy": float((top1[mask] == labels[mask]).mean()) if nt and top1 is not None else None,
        }
        if aggregates is not None:
            unknown = set(aggregates) - set(agg)
            if unknown:
                raise InvalidInputError(f"seq {sid}: aggregates {sorted(unknown)} unknown; allowed {sorted(agg)}")
            agg.update({k: None if v is None else float(v) for k, v in aggregates.items()})
        self._buf.append(dict(
            # the buffer owns copies: a caller may reuse its arrays (or tensors) for the next sequence
            seq_id=sid, record=int(record), sample=int(sample), correct=correct, input_ids=tok.copy(), pos=pos,
            loss_mask=mask, label_logprob=np.minimum(lab_lp, 0), entropy=np.maximum(ent, 0),
            tail_mass=np.clip(tail, 0, 1), ids=ids_v.astype(np.int32), lp=lp_v.copy() if fixed else lp_v, n_ent=n_ent,
            counts=None if cnt is None else cnt[valid].astype(np.uint16), n_targets=nt, **agg,
        ))
        self._seen.add(sid)
        self._buf_positions += N
        if self._buf_positions >= self.row_group_positions:
            try:
                self._flush()
            except OSError as exc:
                if _is_io_error(exc):
                    raise self._write_error(exc, "writing a shard") from exc
                raise
        return True

    # ------------------------------------------------------------ writing
    def _flush(self) -> None:
        if not self._buf:
            return
        buf, self._buf, self._buf_positions = self._buf, [], 0
        cat = lambda key: np.concatenate([b[key] for b in buf])  # noqa: E731
        n_pos = np.array([b["pos"].size for b in buf], np.int64)
        n_ent = cat("n_ent")
        ids = cat("ids")
        lp = cat("lp")
        ent_offsets = np.zeros(n_ent.size + 1, np.int64)
        np.cumsum(n_ent, out=ent_offsets[1:])
        if self.codec.ids == "ranked":
            if self._code_of is None:
                self._write_id_map(ids)
            ids = self._code_of[ids]
        if self.codec.values == "qdelta":
            values = C.quantise_deltas(lp, ent_offsets[:-1], self.codec.logprob_step)
        elif self.codec.values == "none":
            values = None
        else:
            values = lp.astype(np.float16 if self.codec.values == "fp16" else np.float32, copy=False)
        ftype = np.float32 if self.codec.scalars == "fp32" else np.float16
        pos_off = _offsets(n_pos)
        inner_off = pa.array(ent_offsets.astype(np.int32))

        def per_pos(values_np, field):
            return pa.ListArray.from_arrays(pos_off, pa.array(values_np), type=self.schema.field(field).type)

        def per_entry(values_np, field):
            t = self.schema.field(field).type
            inner = pa.ListArray.from_arrays(inner_off, pa.array(values_np), type=t.value_type)
            return pa.ListArray.from_arrays(pos_off, inner, type=t)

        cols: dict[str, pa.Array] = {}
        for name in ("seq_id", "record", "sample", "n_targets", "mean_entropy", "teacher_nll", "token_accuracy",
                     "correct"):
            cols[name] = pa.array([b[name] for b in buf], type=self.schema.field(name).type)
        cols["n_tokens"] = pa.array([b["input_ids"].size for b in buf], pa.int32())
        cols["n_positions"] = pa.array(n_pos.astype(np.int32))
        cols["input_ids"] = pa.ListArray.from_arrays(
            _offsets(np.array([b["input_ids"].size for b in buf])), pa.array(cat("input_ids")),
            type=self.schema.field("input_ids").type)
        cols["pos"] = per_pos(cat("pos"), "pos")
        cols["loss_mask"] = per_pos(cat("loss_mask"), "loss_mask")
        for name in ("label_logprob", "entropy", "tail_mass"):
            cols[name] = per_pos(cat(name).astype(ftype, copy=False), name)
        cols[F.id_column(self.codec.ids)] = per_entry(ids, F.id_column(self.codec.ids))
        vname = F.value_column(self.codec.values)[0]
        if vname is not None:
            cols[vname] = per_entry(values, vname)
        if isinstance(self.rule, Sampled):
            cols["sample_counts"] = per_entry(cat("counts"), "sample_counts")
        table = pa.Table.from_arrays([cols[f.name] for f in self.schema], schema=self.schema)
        if self._pq is None:
            self._open_shard()
        self._pq.write_table(table, row_group_size=len(buf))
        st = self._shard_stats
        st[0] += len(buf); st[1] += int(n_pos.sum()); st[2] += sum(b["n_targets"] for b in buf); st[3] += ids.size
        if self._shard_tmp.stat().st_size >= self.shard_bytes:
            self._commit_shard()

    def _open_shard(self) -> None:
        index = len(self.manifest.shards)
        name = F.SHARD_PATTERN.format(index=index)
        self._shard_tmp = self.path / F.SHARD_DIR / f".{name}.tmp"
        meta = {"format": F.FORMAT_NAME, "format_version": F.FORMAT_VERSION, "shard": index,
                "vocab_size": self.vocab_size, "rule": self.manifest.rule, "codec": self.manifest.codec,
                "id_map_sha256": (self.manifest.id_map or {}).get("sha256")}
        schema = self.schema.with_metadata({F.PARQUET_META_KEY: json.dumps(meta).encode()})
        enc = {}
        for f in self.schema:
            leaf_type, depth = _leaf(f.type)
            leaf = f.name + ".list.element" * depth
            if f.name in ("pos", "record"):
                enc[leaf] = "DELTA_BINARY_PACKED"
            elif f.name in ("input_ids", "label_logprob", "entropy", "tail_mass", "topk_ids", "topk_codes",
                            "topk_logprobs", "topk_logprob_deltas", "sample_counts") \
                    and not pa.types.is_float16(leaf_type):  # DuckDB reads no BYTE_STREAM_SPLIT half floats
                enc[leaf] = "BYTE_STREAM_SPLIT"
        self._pq = pq.ParquetWriter(
            self._shard_tmp, schema, compression="zstd", compression_level=self.codec.zstd_level,
            use_dictionary=False, column_encoding=enc, write_statistics=list(F.SCALAR_COLUMNS),
            write_page_checksum=True,  # CRC32 per page: readers detect corrupted pages, not just verify
            data_page_size=DATA_PAGE_BYTES,
        )

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
        self.manifest.shards.append(info)
        try:
            fsync_dir(final.parent)
            save_manifest(self.path, self.manifest)
        except BaseException:
            self._uncommit(info, final)
            raise
        self._shard_stats = [0, 0, 0, 0]
        logger.info("committed %s (%d sequences, %d positions, %d bytes)", info.file, info.sequences,
                    info.positions, info.bytes)

    def _uncommit(self, info: ShardInfo, final: Path) -> None:
        """After a failed manifest write: forget the shard, and delete its file unless the manifest on disk
        lists it (the rename can have happened before the failure), so no unlisted shard is left behind."""
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
        table = pa.table({"code": pa.array(np.arange(id_map.size, dtype=np.int32)), "token_id": pa.array(id_map)})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        atomic_write_bytes(self.path / F.ID_MAP_NAME, data)
        self.manifest.id_map = {"file": F.ID_MAP_NAME, "sha256": hashlib.sha256(data).hexdigest(),
                                "size": int(id_map.size)}
        self._code_of = C.invert_id_map(id_map)


def build_key_diffs(old: dict[str, Any], new: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """What a resume would change in the build arguments ``keys``, one phrase per differing key."""
    return [f"build {key}: cache has {old.get(key)!r}, this build has {new.get(key)!r}"
            for key in keys if old.get(key) != new.get(key)]


def has_repeats(ids: np.ndarray, valid: np.ndarray | None) -> bool:
    """True when some row of ``ids [N, K]`` lists an id twice among its valid entries (None: all valid)."""
    if valid is None:
        s = np.sort(ids.astype(np.int32, copy=False), axis=1)
    else:
        fill = -1 - np.arange(ids.shape[1], dtype=np.int32)[None, :]  # distinct negatives for padding
        s = np.sort(np.where(valid, ids, fill).astype(np.int32, copy=False), axis=1)
    return bool((s[:, 1:] == s[:, :-1]).any())


def _offsets(lengths: np.ndarray) -> pa.Array:
    off = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=off[1:])
    return pa.array(off)


def _leaf(t: pa.DataType) -> tuple[pa.DataType, int]:
    """The element type under a (nested) list type, and the nesting depth."""
    d = 0
    while pa.types.is_list(t):
        t, d = t.value_type, d + 1
    return t, d


def _is_io_error(exc: BaseException) -> bool:
    """An OS-level failure (disk full, I/O error), not one of logitstore's own errors that subclass OSError."""
    return isinstance(exc, OSError) and not isinstance(exc, LogitstoreError)


def rmdir_if_empty(path: Path) -> None:
    """Remove the directory ``path`` if it is empty; otherwise (or if it is gone) leave it."""
    try:
        path.rmdir()
    except OSError:  # not empty (another writer's lock appeared meanwhile) or already gone: leave it
        pass


def _version() -> str:
    from logitstore import __version__

    return __version__
