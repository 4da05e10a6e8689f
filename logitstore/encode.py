"""Encoding a writer's buffered rows into a shard: the Arrow table under the cache's codec, and the Parquet settings.

``encode_rows`` turns the rows ``CacheWriter`` buffered (one dict per sequence, flat entry
arrays, made by ``logitstore.contract.Contract.row``) into one Arrow table of the shard schema:
per-position lists, entries as lists of lists, ids as ranked codes or raw, logprobs quantised
(qdelta) or as floats. ``shard_writer`` opens a shard's Parquet writer with the encodings of
FORMAT.md ("Shards"): ``BYTE_STREAM_SPLIT`` for ids, values, counts and floats (not half
floats), ``DELTA_BINARY_PACKED`` for ``pos`` and ``record``, no dictionaries, zstd, 2 MiB
pages with CRC32 checksums, statistics on the scalar columns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitstore import codec as C
from logitstore import format as F

DATA_PAGE_BYTES = 2 << 20  # Parquet data page target: 2 MiB measured smallest at k=50 (BENCHMARKS.md)
_SPLIT = ("input_ids", "label_logprob", "entropy", "tail_mass", "topk_ids", "topk_codes", "topk_logprobs",
          "topk_logprob_deltas", "sample_counts", "tail_ids", "tail_codes", "tail_logprobs", "tail_logprob_deltas",
          "tail_counts", "proposal_log_norm", *F.POLICY_FIELDS)


def encode_rows(buf: list[dict[str, Any]], *, schema: pa.Schema, codec: C.Codec, code_of: np.ndarray | None
                ) -> pa.Table:
    """One table of ``schema`` from buffered rows; ``code_of`` maps token id -> code (ranked ids)."""
    cat = lambda key: np.concatenate([b[key] for b in buf])  # noqa: E731
    n_pos = np.array([b["pos"].size for b in buf], np.int64)
    n_ent = cat("n_ent")
    ids = cat("ids")
    ent_offsets = np.zeros(n_ent.size + 1, np.int64)
    np.cumsum(n_ent, out=ent_offsets[1:])
    if codec.ids == "ranked":
        ids = code_of[ids]
    pos_off = offsets(n_pos)
    inner_off = pa.array(ent_offsets.astype(np.int32))

    def per_pos(values_np, field):
        return pa.ListArray.from_arrays(pos_off, pa.array(values_np), type=schema.field(field).type)

    def per_entry(values_np, field):
        t = schema.field(field).type
        inner = pa.ListArray.from_arrays(inner_off, pa.array(values_np), type=t.value_type)
        return pa.ListArray.from_arrays(pos_off, inner, type=t)

    cols: dict[str, pa.Array] = {}
    for name in ("seq_id", "record", "sample", "n_targets", "mean_entropy", "teacher_nll", "token_accuracy",
                 "correct"):
        cols[name] = pa.array([b[name] for b in buf], type=schema.field(name).type)
    cols["n_tokens"] = pa.array([b["input_ids"].size for b in buf], pa.int32())
    cols["n_positions"] = pa.array(n_pos.astype(np.int32))
    cols["input_ids"] = pa.ListArray.from_arrays(
        offsets(np.array([b["input_ids"].size for b in buf])), pa.array(cat("input_ids")),
        type=schema.field("input_ids").type)
    cols["pos"] = per_pos(cat("pos"), "pos")
    cols["loss_mask"] = per_pos(cat("loss_mask"), "loss_mask")
    ftype = np.float32 if codec.scalars == "fp32" else np.float16
    for name in ("label_logprob", "entropy", "tail_mass"):
        cols[name] = per_pos(cat(name).astype(ftype, copy=False), name)
    cols[F.id_column(codec.ids)] = per_entry(ids, F.id_column(codec.ids))
    vname = F.value_column(codec.values)[0]
    if vname is not None:
        cols[vname] = per_entry(encode_values(cat("lp"), ent_offsets[:-1], codec), vname)
    if "sample_counts" in schema.names:
        cols["sample_counts"] = per_entry(cat("counts"), "sample_counts")
    if F.id_column(codec.ids, "tail") in schema.names:
        cols.update(_tail_columns(buf, schema, codec, code_of, pos_off))
    if "proposal_log_norm" in schema.names:
        cols["proposal_log_norm"] = per_pos(cat("log_norm").astype(ftype, copy=False), "proposal_log_norm")
    for name in F.POLICY_FIELDS:
        if name in schema.names:
            cols[name] = per_pos(cat(name).astype(ftype, copy=False), name)
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


def _tail_columns(buf: list[dict[str, Any]], schema: pa.Schema, codec: C.Codec, code_of: np.ndarray | None,
                  pos_off: pa.Array) -> dict[str, pa.Array]:
    """The tail draws' ids (codes), logprobs and counts, one list per position (empty where none was drawn)."""
    n_tail = np.concatenate([b["n_tail"] for b in buf])
    off = np.zeros(n_tail.size + 1, np.int64)
    np.cumsum(n_tail, out=off[1:])
    inner_off = pa.array(off.astype(np.int32))

    def per_entry(values_np, field):
        t = schema.field(field).type
        inner = pa.ListArray.from_arrays(inner_off, pa.array(values_np), type=t.value_type)
        return pa.ListArray.from_arrays(pos_off, inner, type=t)

    ids = np.concatenate([b["tail_ids"] for b in buf])
    out = {F.id_column(codec.ids, "tail"): per_entry(code_of[ids] if codec.ids == "ranked" else ids,
                                                     F.id_column(codec.ids, "tail")),
           "tail_counts": per_entry(np.concatenate([b["tail_counts"] for b in buf]), "tail_counts")}
    vname = F.tail_value_column(codec.values)
    if vname is not None:
        starts = off[:-1][n_tail > 0]  # positions without draws have no run
        out[vname] = per_entry(encode_values(np.concatenate([b["tail_lp"] for b in buf]), starts, codec), vname)
    return out


def encode_values(lp: np.ndarray, starts: np.ndarray, codec: C.Codec) -> np.ndarray:
    """Flat entry logprobs (each position's run starting at ``starts``) as the codec stores them."""
    if codec.values == "qdelta":
        return C.quantise_deltas(lp, starts, codec.logprob_step)
    return lp.astype(np.float16 if codec.values == "fp16" else np.float32, copy=False)


def shard_writer(path: Path, schema: pa.Schema, meta: dict[str, Any], codec: C.Codec) -> pq.ParquetWriter:
    """The Parquet writer of a new shard at ``path``, its self-description ``meta`` in the key-value metadata."""
    enc = {}
    for f in schema:
        leaf_type, depth = _leaf(f.type)
        leaf = f.name + ".list.element" * depth
        if f.name in ("pos", "record"):
            enc[leaf] = "DELTA_BINARY_PACKED"
        elif f.name in _SPLIT and not pa.types.is_float16(leaf_type):  # DuckDB reads no BYTE_STREAM_SPLIT halves
            enc[leaf] = "BYTE_STREAM_SPLIT"
    return pq.ParquetWriter(
        path, schema.with_metadata({F.PARQUET_META_KEY: json.dumps(meta).encode()}), compression="zstd",
        compression_level=codec.zstd_level, use_dictionary=False, column_encoding=enc,
        write_statistics=list(F.SCALAR_COLUMNS),
        write_page_checksum=True,  # CRC32 per page: readers detect corrupted pages, not just verify
        data_page_size=DATA_PAGE_BYTES,
    )


def offsets(lengths: np.ndarray) -> pa.Array:
    """List offsets ``[n + 1]`` (int32) of lists with these lengths."""
    off = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=off[1:])
    return pa.array(off)


def _leaf(t: pa.DataType) -> tuple[pa.DataType, int]:
    """The element type under a (nested) list type, and the nesting depth."""
    d = 0
    while pa.types.is_list(t):
        t, d = t.value_type, d + 1
    return t, d
