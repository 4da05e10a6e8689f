"""``logitstore diff``: compare two caches of the same data by different teachers.

Sequences are matched by ``seq_id`` (a content hash of the tokens, so caches of the
same data with the same tokenizer line up); a matched pair whose token ids differ is an
error. For every position cached in both, the divergences of ``logitstore.divergence``
(the same definition as the SQL macros) and top-1 agreement are written to
``DIFF/positions.parquet`` (``seq_id``, ``pos``, ``kl_ab``, ``kl_ba``, ``js``, ``tvd``,
``top1_agree``), and per-sequence means to ``DIFF/sequences.parquet`` (``seq_id``,
``n_positions``, ``kl_ab``, ``kl_ba``, ``js``, ``tvd``, ``top1_agreement``), with
``DIFF/diff.json`` naming both caches and their fingerprints. Query them together, e.g.::

    SELECT s.seq_id, d.js FROM read_parquet('DIFF/sequences.parquet') d JOIN sequences s USING (seq_id)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitstore.divergence import divergences
from logitstore.errors import CacheExistsError, InvalidInputError
from logitstore.manifest import atomic_write_bytes, now
from logitstore.ownership import refuse_file
from logitstore.progress import progress_bar
from logitstore.reader import Cache
from logitstore.selection import cache_fingerprint

logger = logging.getLogger(__name__)


def diff(a_path, b_path, out: str | os.PathLike, *, progress: bool = False) -> dict:
    a, b = Cache(a_path), Cache(b_path)
    for c, name in ((a, a_path), (b, b_path)):
        if c.codec.values == "none":
            raise InvalidInputError(f"{name} stores no logprobs (codec values 'none'): nothing to compare")
    if a.manifest.vocab_size != b.manifest.vocab_size or \
            a.manifest.tokenizer.get("fingerprint") != b.manifest.tokenizer.get("fingerprint"):
        raise InvalidInputError(
            f"the caches use different tokenizers (vocab {a.manifest.vocab_size} fingerprint "
            f"{a.manifest.tokenizer.get('fingerprint')} vs vocab {b.manifest.vocab_size} fingerprint "
            f"{b.manifest.tokenizer.get('fingerprint')}): their token ids do not mean the same tokens")
    out = Path(out)
    refuse_file(out, "a diff")
    if out.exists() and any(out.iterdir()):
        raise CacheExistsError(f"{out} exists and is not empty; choose another output path (a diff is written only "
                               "into a new or empty directory)")
    common = [sid for sid in a.index if sid in b.index and sid in a and sid in b]
    if not common:
        raise InvalidInputError(f"{a_path} and {b_path} share no seq_id: they are not caches of the same data")
    cols: dict[str, list] = {k: [] for k in ("seq_id", "pos", "kl_ab", "kl_ba", "js", "tvd", "top1_agree")}
    per_seq: dict[str, list] = {k: [] for k in ("seq_id", "n_positions", "kl_ab", "kl_ba", "js", "tvd",
                                                 "top1_agreement")}
    bar = progress_bar(progress, desc="diff", unit="seq", total=len(common))
    for sa, sb in _pairs(a, b, common):
        if not np.array_equal(sa.input_ids, sb.input_ids):
            raise InvalidInputError(f"seq {sa.seq_id}: the two caches hold different token ids under one seq_id")
        pos, ia, ib = np.intersect1d(sa.pos, sb.pos, return_indices=True)
        k = max(sa.ids.shape[1], sb.ids.shape[1])
        d = divergences(_pad(sa.ids[ia], k, -1), _pad(sa.logprobs[ia], k, -np.inf),
                        _pad(sb.ids[ib], k, -1), _pad(sb.logprobs[ib], k, -np.inf))
        cols["seq_id"].append(np.full(len(pos), sa.seq_id, dtype=object))
        cols["pos"].append(pos.astype(np.int32))
        for key, src in (("kl_ab", "kl_pq"), ("kl_ba", "kl_qp"), ("js", "js"), ("tvd", "tvd")):
            cols[key].append(d[src].astype(np.float32))
            per_seq[key].append(float(d[src].mean()) if len(pos) else None)
        cols["top1_agree"].append(d["top1_agree"])
        per_seq["seq_id"].append(sa.seq_id)
        per_seq["n_positions"].append(len(pos))
        per_seq["top1_agreement"].append(float(d["top1_agree"].mean()) if len(pos) else None)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    positions = pa.table({k: pa.array(np.concatenate(v)) if k != "seq_id" else pa.array(np.concatenate(v), pa.string())
                          for k, v in cols.items()})
    pq.write_table(positions, tmp / "positions.parquet", compression="zstd")
    pq.write_table(pa.table({k: pa.array(v) for k, v in per_seq.items()}), tmp / "sequences.parquet",
                   compression="zstd")
    meta = {"format": "logitstore-diff", "version": 1, "created_at": now(), "a": str(a.path), "b": str(b.path),
            "a_fingerprint": cache_fingerprint(a.manifest), "b_fingerprint": cache_fingerprint(b.manifest),
            "a_teacher": a.manifest.teacher, "b_teacher": b.manifest.teacher, "sequences": len(per_seq["seq_id"]),
            "positions": positions.num_rows, "only_in_a": len(a) - len(common), "only_in_b": len(b) - len(common),
            "definition": "KL/JS/TVD over the ids both store plus one other bucket (lower bounds of the full ones)"}
    atomic_write_bytes(tmp / "diff.json", json.dumps(meta, indent=1).encode())
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return meta


def _pairs(a: Cache, b: Cache, common: list[str], chunk: int = 2048):
    """Matched sequences of both caches, decoding at most ``chunk`` sequences of each at a time."""
    for i in range(0, len(common), chunk):
        ids = common[i:i + chunk]
        b_seqs = {s.seq_id: s for s in b.iter_sequences(ids)}
        for sa in a.iter_sequences(ids):
            yield sa, b_seqs[sa.seq_id]


def _pad(x: np.ndarray, k: int, fill) -> np.ndarray:
    return x if x.shape[1] == k else np.pad(x, ((0, 0), (0, k - x.shape[1])), constant_values=fill)
