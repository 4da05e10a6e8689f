"""Encoding study behind the store's codec: one column at a time, on real teacher top-50 entries.

Compares, in bytes/position at k=50 on the ``tools/teacher_dump.py`` data (SmolLM2-135M,
V=49152): PLAIN vs BYTE_STREAM_SPLIT ids; raw ids vs frequency-ranked codes vs the
low-byte-major ranked codes the codec uses; the byte-split entropy loss; quantised
logprobs stored absolute vs as deltas; zstd levels; Parquet data page v1 vs v2. Each
column is written alone with pyarrow, as the writer would write it.

    python tools/bench_encodings.py
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from logitstore.codec import build_id_map, invert_id_map  # noqa: E402
from tools.teacher_dump import load_or_compute  # noqa: E402

N, K, V = 50_000, 50, 49152


def entropy_bits(x: np.ndarray) -> float:
    _, c = np.unique(x, return_counts=True)
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def size(values: np.ndarray, encoding: str = "BYTE_STREAM_SPLIT", level: int = 1, page_version: str = "1.0") -> float:
    off = pa.array(np.arange(0, N * K + 1, K, dtype=np.int32))
    t = pa.table({"x": pa.ListArray.from_arrays(off, pa.array(values.ravel()))})
    b = io.BytesIO()
    pq.write_table(t, b, compression="zstd", compression_level=level, use_dictionary=False,
                   column_encoding={"x.list.element": encoding}, write_statistics=False,
                   data_page_size=2 << 20, data_page_version=page_version)
    return b.tell() / N


def main() -> None:
    d = load_or_compute(51_000)
    ids = d["top_ids"][:N, :K].astype(np.int32)
    lp = d["top_lp"][:N, :K]
    counts = np.bincount(ids.ravel(), minlength=V)
    ranked = np.empty(V, np.int32)
    ranked[np.argsort(-counts, kind="stable")] = np.arange(V)
    codes_rank = ranked[ids]
    codes_lbm = invert_id_map(build_id_map(ids, V))[ids]  # what the writer stores
    print(f"k={K}, {N} positions, V={V}; bytes/position of one column (zstd 1 unless noted)\n")
    print(f"order-0 entropy of the ids: {entropy_bits(ids) * K / 8:.1f} B/position ({entropy_bits(ids):.2f} bits/id)")
    for name, c in (("frequency rank", codes_rank), ("low-byte-major rank (codec)", codes_lbm)):
        lo, hi = c & 255, c >> 8
        print(f"  {name}: H(low byte) + H(high byte) = {entropy_bits(lo) + entropy_bits(hi):.2f} bits/id")
    print("ids:")
    for lvl in (1, 3):
        print(f"  raw ids, PLAIN, zstd {lvl}: {size(ids, 'PLAIN', lvl):.1f}    "
              f"raw ids, BYTE_STREAM_SPLIT: {size(ids, level=lvl):.1f}")
    print(f"  frequency-ranked codes, BYTE_STREAM_SPLIT: {size(codes_rank):.1f}")
    print(f"  low-byte-major ranked codes, BYTE_STREAM_SPLIT: {size(codes_lbm):.1f}")
    print("logprobs:")
    for step in (1 / 32, 5 / 128):
        q = np.rint(-lp / step).astype(np.int32)
        dq = np.diff(q, axis=1, prepend=0).astype(np.int32)
        print(f"  step {step:.6g}: absolute {size(q):.1f} (H {entropy_bits(q):.2f} bits/value), "
              f"deltas {size(dq):.1f} (H {entropy_bits(dq):.2f} bits/value, floor {entropy_bits(dq) * K / 8:.1f} B)")
    dq = np.diff(np.rint(-lp / (5 / 128)).astype(np.int32), axis=1, prepend=0)
    print("zstd level, codes + deltas (step 5/128):")
    for lvl in (1, 3, 6, 9, 12, 19):
        print(f"  {lvl:2d}: {size(codes_lbm, level=lvl) + size(dq, level=lvl):.1f}")
    print(f"data page v2 (codes + deltas): {size(codes_lbm, page_version='2.0') + size(dq, page_version='2.0'):.1f} "
          f"vs v1 {size(codes_lbm) + size(dq):.1f}")


if __name__ == "__main__":
    main()
