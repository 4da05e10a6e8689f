"""The id map of a ranked-id cache: ``id_map.parquet``, the code -> token id table (FORMAT.md, "Codecs").

``write_id_map`` stores a table built by ``codec.build_id_map`` / ``codec.id_map_from_counts``
atomically and returns its manifest record; ``read_id_map`` reads it back, checked against the
manifest's checksum and for being a permutation of the vocabulary.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitstore import format as F
from logitstore.errors import CorruptCacheError
from logitstore.manifest import Manifest, atomic_write_bytes


def write_id_map(cache_dir: Path, id_map: np.ndarray) -> dict[str, Any]:
    """Write ``id_map [V]`` (code -> token id) as ``CACHE/id_map.parquet``; the manifest's ``id_map`` record."""
    table = pa.table({"code": pa.array(np.arange(id_map.size, dtype=np.int32)),
                      "token_id": pa.array(np.asarray(id_map, np.int32))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    atomic_write_bytes(Path(cache_dir) / F.ID_MAP_NAME, data)
    return {"file": F.ID_MAP_NAME, "sha256": hashlib.sha256(data).hexdigest(), "size": int(id_map.size)}


def read_id_map(cache_dir: Path, manifest: Manifest) -> np.ndarray:
    """The code -> token id table of a ranked-id cache, checked against the manifest."""
    f = Path(cache_dir) / manifest.id_map["file"]
    try:
        data = f.read_bytes()
    except OSError as exc:
        raise CorruptCacheError(f"{f}: cannot read the id map ({exc})") from exc
    if hashlib.sha256(data).hexdigest() != manifest.id_map["sha256"]:
        raise CorruptCacheError(f"{f}: checksum does not match the manifest")
    try:
        t = pq.read_table(pa.BufferReader(data))
        m = t.column("token_id").to_numpy().astype(np.int32)
    except (pa.ArrowException, KeyError, ValueError) as exc:
        raise CorruptCacheError(f"{f}: not a readable id map ({exc})") from exc
    if m.size != manifest.vocab_size or not np.array_equal(np.sort(m), np.arange(m.size)):
        raise CorruptCacheError(f"{f}: not a permutation of the {manifest.vocab_size} token ids")
    return m
