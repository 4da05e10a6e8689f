"""``verify``: check every shard of a cache against its manifest and the spec.

Checks, naming the file and the problem for each failure: the manifest parses,
has a readable version, and totals that add up over its shard list; no stray or
temporary files in ``shards/`` (the build lock outside it is not part of the cache); the id map (ranked
ids) matches its checksum and is a permutation; every listed shard exists with
the recorded size and sha256, has the schema and self-description the manifest
implies, and the recorded sequence/position/entry counts; and every decoded
value satisfies the invariants of FORMAT.md (ids < vocab and unique per
position, logprobs <= 0 and descending, tail mass in [0, 1], entropy in
[0, ln V], positions strictly increasing in [1, n_tokens), aggregates equal to
their recomputation, stored mass + tail mass = 1 within the codec's bound, and, where the responses
came from a policy, its logprobs <= 0 and its entropies in [0, ln V]).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from logitstore import format as F
from logitstore import remote
from logitstore.contract import has_repeats
from logitstore.errors import CacheNotFoundError, LogitstoreError
from logitstore.reader import Cache
from logitstore.writer import file_sha256


@dataclasses.dataclass
class Problem:
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


def verify(path: str | Path, *, deep: bool = True, progress: Callable[[int, int], None] | None = None) -> list[Problem]:
    """Return the problems found (an empty list means the cache is sound)."""
    path = path if remote.is_remote(path) else Path(path)
    try:
        cache = Cache(path, check_totals=False)
    except (remote.RemoteStoreError, CacheNotFoundError) as exc:
        if isinstance(path, str):  # a remote cache that cannot be reached or is not there: no report to give
            raise
        return [Problem(F.MANIFEST_NAME, str(exc))]
    except LogitstoreError as exc:
        return [Problem(F.MANIFEST_NAME, str(exc))]
    m = cache.manifest
    problems: list[Problem] = []
    if m.totals_problem():
        problems.append(Problem(F.MANIFEST_NAME, m.totals_problem()))
    listed = {s.file for s in m.shards}
    for name in _shard_dir_names(cache):
        rel = f"{F.SHARD_DIR}/{name}"
        if rel not in listed:
            what = "temporary file of an interrupted write" if name.endswith(".tmp") else "stray file"
            problems.append(Problem(rel, f"{what}, not listed in the manifest"))
    for i, _info in enumerate(m.shards):
        if progress:
            progress(i, len(m.shards))
        if cache.mirror is None:
            problems += _check_shard(cache, i, deep)
            continue
        info = cache.manifest.shards[i]  # a remote shard is downloaded into the disk cache, checked, unpinned
        try:
            _, fd = cache.mirror.acquire(info.file, info.sha256, info.bytes)
        except remote.RemoteStoreError as exc:
            problems.append(Problem(info.file, str(exc)))
            continue
        try:
            problems += _check_shard(cache, i, deep)
        finally:
            cache.close()
            cache.mirror.release(fd)
    return problems


def remote_listing(cache: Cache) -> list[Problem]:
    """The cheap check of a remote cache before training: every listed shard is an object of the manifest's size
    (each is checked again when downloaded, and its pages by their CRCs when read)."""
    sizes = cache.mirror.shard_sizes()
    out = []
    for info in cache.manifest.shards:
        got = sizes.get(info.file.rsplit("/", 1)[-1])
        if got != info.bytes:
            out.append(Problem(info.file, "missing" if got is None else
                               f"size {got} bytes, manifest says {info.bytes} (truncated or rewritten)"))
    return out


def _shard_dir_names(cache: Cache) -> list[str]:
    """The names in the cache's shard directory (for a remote cache, the objects under its shards/ prefix)."""
    if cache.mirror is not None:
        return sorted(cache.mirror.shard_sizes())
    shard_dir = cache.path / F.SHARD_DIR
    return sorted(p.name for p in shard_dir.iterdir()) if shard_dir.is_dir() else []


def _check_shard(cache: Cache, i: int, deep: bool) -> list[Problem]:
    info = cache.manifest.shards[i]
    f = cache.shard_paths[i]
    out = lambda msg: [Problem(info.file, msg)]  # noqa: E731
    if not f.is_file():
        return out("missing")
    size = f.stat().st_size
    if size != info.bytes:
        return out(f"size {size} bytes, manifest says {info.bytes} (truncated or rewritten)")
    if file_sha256(f) != info.sha256:
        return out("sha256 does not match the manifest (corrupted)")
    try:
        pf = pq.ParquetFile(f)
        meta = json.loads(pf.schema_arrow.metadata[F.PARQUET_META_KEY])
    except Exception as exc:  # noqa: BLE001 - any failure to parse is corruption, reported not raised
        return out(f"not a readable logitstore shard ({type(exc).__name__}: {exc})")
    if meta.get("format_version") != cache.manifest.format_version or meta.get("codec") != cache.manifest.codec \
            or meta.get("rule") != cache.manifest.rule:
        return out("self-description (format version, rule, codec) disagrees with the manifest")
    if pf.schema_arrow.remove_metadata() != cache.schema:
        return out("schema does not match the spec for the manifest's rule and codec")
    if pf.metadata.num_rows != info.sequences:
        return out(f"{pf.metadata.num_rows} sequences, manifest says {info.sequences}")
    if not deep:
        return []
    problems: list[Problem] = []
    n_pos = n_ent = n_tgt = 0
    try:
        for block in cache.iter_blocks([i]):
            n_pos += block.pos.size
            n_ent += int(block.n_entries.sum())
            n_tgt += int(block.loss_mask.sum())
            problems += [Problem(info.file, msg) for msg in _invariants(cache, block)]
    except LogitstoreError as exc:
        return out(str(exc))
    if (n_pos, n_ent, n_tgt) != (info.positions, info.entries, info.targets):
        problems += out(f"positions/entries/targets {n_pos}/{n_ent}/{n_tgt}, manifest says "
                        f"{info.positions}/{info.entries}/{info.targets}")
    return problems


def _invariants(cache: Cache, b) -> list[str]:
    V = cache.manifest.vocab_size
    bad: list[str] = []
    valid = b.valid
    ids = b.ids
    if ids[valid].size and (ids[valid].min() < 0 or ids[valid].max() >= V):
        bad.append(f"entry ids outside [0, {V})")
    if ids.shape[1] > 1 and has_repeats(ids, valid):
        bad.append("a position lists the same token id twice")
    lp = b.logprobs
    if lp is not None:
        bad += _logprob_invariants(cache, lp, valid, b.tail_mass)
    if (b.n_entries < 1).any() or (b.n_entries > cache.k).any():
        bad.append(f"entries per position outside [1, k={cache.k}]")
    if not ((b.tail_mass >= 0) & (b.tail_mass <= 1)).all():
        bad.append("tail_mass outside [0, 1]")
    if not ((b.entropy >= 0) & (b.entropy <= math.log(V) * (1 + 1e-3) + 1e-3)).all():
        bad.append(f"entropy outside [0, ln V = {math.log(V):.3f}]")
    if not (b.label_logprob <= 0).all():
        bad.append("label_logprob > 0")
    if b.counts is not None:
        if (b.counts[valid] < 1).any() or (np.where(valid, b.counts, 0).sum(axis=1) > cache.rule.draws).any():
            bad.append(f"sample_counts must be >= 1 and sum to at most draws={cache.rule.draws} per position")
    if b.tail_ids is not None:
        bad += _tail_invariants(cache, b)
    if cache.rule.tempered:
        ok = np.isfinite(b.proposal_log_norm)
        if b.n_tail is not None:
            ok |= np.isneginf(b.proposal_log_norm) & (b.n_tail == 0)
        if not ok.all():
            bad.append("proposal_log_norm must be finite (-inf only where no tail is drawn)")
    if cache.policy:
        if not (np.isfinite(b.policy_logprob).all() and (b.policy_logprob <= 0).all()):
            bad.append("policy_logprob must be finite and <= 0")
        if not ((b.policy_entropy >= 0) & (b.policy_entropy <= math.log(V) * (1 + 1e-3) + 1e-3)).all():
            bad.append(f"policy_entropy outside [0, ln V = {math.log(V):.3f}]")
    bad += _sequence_invariants(cache, b)
    return bad


def _tail_invariants(cache: Cache, b) -> list[str]:
    """Rule topk_tail: tail ids in range, distinct, outside the head; counts >= 1 summing to tail_draws where the
    tail is drawn; logprobs finite, <= 0, descending, no more likely than the head's last entry (within the codec)."""
    V, D, bad = cache.manifest.vocab_size, cache.rule.tail_draws, []
    tv = np.arange(b.tail_ids.shape[1])[None, :] < b.n_tail[:, None]
    ids = b.tail_ids[tv]
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        bad.append(f"tail ids outside [0, {V})")
    if has_repeats(np.concatenate([b.ids, b.tail_ids], 1), np.concatenate([b.valid, tv], 1)):
        bad.append("a tail id repeats another tail id or a head entry of its position")
    sums = np.where(tv, b.tail_counts, 0).sum(axis=1)
    if (b.tail_counts[tv] < 1).any() or (sums != np.where(b.n_tail > 0, D, 0)).any():
        bad.append(f"tail_counts must be >= 1 and sum to tail_draws={D} where the tail is drawn")
    lp = b.tail_logprobs
    if lp is not None:
        if not np.isfinite(lp[tv]).all() or (lp[tv] > 0).any():
            bad.append("tail logprobs must be finite and <= 0")
        if lp.shape[1] > 1 and ((lp[:, 1:] > lp[:, :-1]) & tv[:, 1:]).any():
            bad.append("tail draws not sorted by logprob, most likely first")
        head_min = np.where(b.valid, b.logprobs, np.inf).min(axis=1)
        tol = 2 * cache.codec.logprob_error_bound() + 1e-4  # both sides decoded within the bound
        if cache.codec.values == "fp16":
            tol = tol + 2.0**-10 * np.abs(head_min)
        if (np.where(tv, lp, -np.inf).max(axis=1, initial=-np.inf) > head_min + tol).any():
            bad.append("a tail draw is more likely than the head's last entry")
    return bad


def _logprob_invariants(cache: Cache, lp: np.ndarray, valid: np.ndarray, tail: np.ndarray) -> list[str]:
    bad = []
    if (lp[valid] > 0).any() or not np.isfinite(lp[valid]).all():
        bad.append("entry logprobs must be finite and <= 0")
    if lp.shape[1] > 1 and ((lp[:, 1:] > lp[:, :-1]) & valid[:, 1:]).any():
        bad.append("entries not sorted by logprob, most likely first")
    # stored mass + tail = 1, within the decoding error of the values: an entry decoded with
    # abs logprob error e (Codec.logprob_errors) has probability error p * expm1(e)
    lp64 = np.where(valid, lp, -np.inf).astype(np.float64)
    p = np.exp(lp64)
    err = np.where(valid, cache.codec.logprob_errors(np.where(valid, lp64, 0.0)), 0.0)
    mass = p.sum(axis=1)
    tol = (p * np.expm1(err)).sum(axis=1) + (1e-3 if cache.codec.scalars == "fp16" else 1e-5)
    if (np.abs(mass + tail - 1) > tol).any():
        bad.append("sum(exp(entry logprobs)) + tail_mass != 1 beyond the codec's bound")
    return bad


def _sequence_invariants(cache: Cache, b) -> list[str]:
    bad: list[str] = []
    s = b.scalars
    n_pos = np.diff(b.pos_offsets)
    n_tok = np.diff(b.token_offsets)
    if not (np.array_equal(n_pos, s["n_positions"]) and np.array_equal(n_tok, s["n_tokens"])):
        bad.append("n_positions/n_tokens disagree with the lists")
    if b.pos.size:
        first = np.zeros(b.pos.size, bool)
        first[b.pos_offsets[:-1][n_pos > 0]] = True
        rows = np.repeat(np.arange(len(b)), n_pos)
        step = np.diff(b.pos, prepend=0)
        if (b.pos < 1).any() or (b.pos >= n_tok[rows]).any() or (~first & (step <= 0)).any():
            bad.append("positions must be strictly increasing within [1, n_tokens)")
    for i in range(len(b)):
        a, z = b.pos_offsets[i], b.pos_offsets[i + 1]
        msk = b.loss_mask[a:z]
        if int(msk.sum()) != s["n_targets"][i]:
            bad.append(f"seq {s['seq_id'][i]}: n_targets disagrees with loss_mask")
            continue
        if msk.any():
            me = float(b.entropy[a:z][msk].astype(np.float64).mean())
            nll = float(-b.label_logprob[a:z][msk].astype(np.float64).mean())
            tol = 2e-3 if cache.codec.scalars == "fp16" else 1e-4
            if s["mean_entropy"][i] is None or abs(me - s["mean_entropy"][i]) > tol * max(1, me) or \
                    s["teacher_nll"][i] is None or abs(nll - s["teacher_nll"][i]) > tol * max(1, nll):
                bad.append(f"seq {s['seq_id'][i]}: mean_entropy/teacher_nll disagree with the positions")
    return bad
