"""Bytes per token of other projects' teacher-logit caches, emulated on the same real teacher positions.

Takes the SmolLM2-135M-Instruct teacher positions that ``tools/bench_store.py`` uses (the dump of
``tools/teacher_dump.py``: top-256 float32 logprobs and 50 draws per position, V = 49152) and writes
them the way each project's capture code lays them out on disk, then divides the bytes written by
the number of positions. For each top-k format it also decodes what was written and reports the
max / mean abs logprob error against the teacher's float32 values over the stored top-k entries.

How each format is emulated (the sources are the projects' own code, read, not imported or copied):

- logitstore: ``CacheWriter`` with the default codec (ranked ids, quantised logprob deltas, zstd 1)
  and with the lossless ``Codec(values="fp32")``, read back with ``logitstore.open``. B/token
  counts the shard files; the id map and manifest are a fixed per-cache cost, shown apart.
- DistillKit (arcee-ai/DistillKit, ``distillkit/sample_logits_vllm.py``, ``sample_common.py``,
  ``compression/monotonic_logprobs.py``): its "budget" logprob_compressor (``exact_k`` 1 in
  bfloat16, a least-squares fit of the remaining logprobs on the terms [1, t, sqrt t] with
  float32 coefficients, no residual bins, no delta encoding), token ids bit-packed at
  ceil(log2 V) = 16 bits; one Parquet row per sequence with its schema (``input_ids``
  list<uint64>, ``compressed_logprobs`` and ``bytepacked_indices`` list<list<uint8>>) written by a
  default ``pq.ParquetWriter`` (snappy). The README gives this config at k=50; k=32 uses the same
  terms. Checked once against DistillKit's own ``LogprobCompressor`` on 1,785 of these positions
  (a scratch copy, not a dependency): identical index bytes, coefficients equal to the last float32
  bits, and its decoder gives the same logprob errors to 1e-6.
- axolotl (axolotl-ai-cloud/axolotl, ``src/axolotl/integrations/kd/chat_template.py``): dataset
  rows as JSONL, raw and gzip (level 6), in its current format (``logprobs`` [positions][k] floats
  plus ``target_token_ids`` [positions][k] ints) and its legacy format (per position, a list of
  ``{"token": "token_id:ID", "logprob": X}``); float32 values written as Python's shortest
  round-trip repr of the double. Only the KD fields are counted (each row also carries the
  conversation text). The current format is also written as Parquet the way ``datasets`` types it
  (float64 / int64 lists, snappy), and the tokenized rows axolotl prepares (``target_logprobs``
  float64, ``target_token_ids`` int64 and ``target_mask`` int64, k per position each) as an
  uncompressed Arrow stream, the form of a ``datasets`` cache (types inferred, not read from a
  real cache).
- Megatron-LM (NVIDIA/Megatron-LM, ``megatron/training/distillation/logits_saver.py``,
  ``utils_logits.py``): per training iteration, ``torch.save`` of a dict of per-microbatch lists
  (``values`` [seq, mbs, k] fp16 logprobs, the default ``--logits-save-dtype``; ``indices_low``
  uint16; ``bit_17`` bool), zstd level 3, one tar member ``{iteration}.pt.zst`` per iteration
  after a ``_meta.json`` member, in ``cp0_dp0__{iter}.tar``. Assumed here: micro-batch 1 sequence
  of 255 positions, 8 micro-batches per iteration.
- SampledKD (almogtavor/sampled-knowledge-distillation, ``sampledkd/training/offline_cache.py``),
  which caches Random-Sampling KD (Anshumann et al., ACL 2025): per position U = 12 fixed slots of
  3 bytes (17-bit id + 7-bit count/N quantised to sum 127; the 12 most drawn ids of N = 50 draws,
  padded with id V), a uint8 entropy and a bool valid mask; one ``torch.save``'d dict per sequence,
  shards of up to 2048 items, a JSON manifest keyed by a SHA-1 of the input ids. The draws are the
  dump's 50 draws from the full T = 1 distribution; the entropy byte uses the exact entropy (the
  project stores a truncated approximation; same size).
- TRL (GKDTrainer, GOLDTrainer, DistillationTrainer): online, the teacher runs every step and
  nothing is stored; no row.

    python tools/bench_compare.py [--positions 50000] [--k 50 32] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logitstore as ls
from tools.bench_store import entries_for, entry_column_bytes, sequences
from tools.teacher_dump import load_or_compute

V = 49152
GZIP_LEVEL = 6  # what `gzip FILE` uses


def _row(name, how, nbytes, positions, err=None, fixed=0, note=""):
    return {"name": name, "how": how, "bpt": nbytes / positions, "err": err, "fixed": fixed, "note": note}


def _err(dec: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    d = np.abs(dec.astype(np.float64) - ref.astype(np.float64))
    return float(d.max()), float(d.mean())


def _lists(values: np.ndarray, per_row: list[int], arrow_type=None) -> pa.ListArray:
    """list<T> over the flat ``values``, ``per_row`` items per row."""
    off = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(off), pa.array(values.ravel(), type=arrow_type))


def _nested(values: np.ndarray, seq_lens: list[int], arrow_type=None) -> pa.ListArray:
    """list<list<T>> of a [P, W] array: one row per sequence, one inner list of W per position."""
    inner = _lists(values, [values.shape[1]] * values.shape[0], arrow_type)
    off = np.concatenate([[0], np.cumsum(seq_lens)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(off), inner)


# ----------------------------------------------------------------------------------- logitstore
def logitstore_rows(seqs, k, workdir) -> list[dict]:
    """Top-k ``k`` with the default and the lossless codec; ``k`` = 0: the two sampled configurations."""
    rows = []
    rule = ls.Sampled(50) if k == 0 else ls.TopK(k)
    configs = [("logitstore, default codec", ls.Codec()),
               ("logitstore, fp32 values (lossless)", ls.Codec(values="fp32"))]
    if k == 0:  # the sampled rows (k-independent)
        configs = [("logitstore Sampled(50), ids+logprobs+counts", ls.Codec()),
                   ("logitstore Sampled(50), ids+counts", ls.Codec(values="none"))]
    prepared = [(s, entries_for(s, rule)) for s in seqs]
    for name, codec in configs:
        path = Path(workdir) / f"ls_{k}_{len(rows)}"
        shutil.rmtree(path, ignore_errors=True)
        with ls.CacheWriter(path, vocab_size=V, rule=rule, codec=codec) as w:
            for i, (s, e) in enumerate(prepared):
                w.add(ls.SequenceRecord(input_ids=s["input_ids"], record=i, scored=ls.Scored.of(
                    e, label_logprob=s["label_lp"], entropy=s["entropy"])))
        cache = ls.open(path)
        shards = sum(f.stat().st_size for f in cache.shard_paths)
        fixed = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) - shards
        entry = entry_column_bytes(cache.shard_paths)
        positions = sum(len(s["label_lp"]) for s in seqs)
        blocks = list(cache.iter_blocks())
        err = None
        if codec.values != "none":
            dec = np.concatenate([b.logprobs for b in blocks])
            ref = np.concatenate([np.pad(e.logprobs, ((0, 0), (0, dec.shape[1] - e.logprobs.shape[1])),
                                         constant_values=-np.inf) for _, e in prepared])
            ok = np.isfinite(ref)
            err = _err(dec[ok], ref[ok])
        how = "zstd Parquet shards" + (", zstd 1" if codec.zstd_level == 1 else "")
        rows.append(_row(name, how, shards, positions, err, fixed,
                         f"entry columns {entry / positions:.1f} B/token; rest: input_ids, label logprob, "
                         "entropy, tail mass, positions, mask"))
    return rows


# ----------------------------------------------------------------------------------- DistillKit
def distillkit_row(seqs, k, workdir, exact_k=1) -> dict:
    ids = np.concatenate([s["top_ids"][:, :k] for s in seqs]).astype(np.int64)
    lp = np.concatenate([s["top_lp"][:, :k] for s in seqs]).astype(np.float32)
    P = len(ids)
    exact = torch.from_numpy(np.ascontiguousarray(lp[:, :exact_k])).to(torch.bfloat16)
    t = torch.arange(k - exact_k, dtype=torch.float32)
    X = torch.stack([t ** 0, t, t.sqrt()], dim=-1)  # terms [0, 1, "sqrt"], t = 0..k-exact_k-1
    coeffs = (torch.linalg.pinv(X) @ torch.from_numpy(lp[:, exact_k:]).T).T.contiguous()  # [P, 3] float32
    logprob_bytes = np.concatenate([exact.view(torch.uint8).numpy().reshape(P, -1),
                                    coeffs.view(torch.uint8).numpy().reshape(P, -1)], axis=1)
    bits = math.ceil(math.log2(V))
    be = np.unpackbits(ids.astype(">u4").view(np.uint8).reshape(P, k, 4), axis=-1)  # [P, k, 32], MSB first
    index_bytes = np.packbits(be[:, :, 32 - bits:].reshape(P, -1), axis=1)  # k x bits, zero-padded to whole bytes
    lens = [len(s["label_lp"]) for s in seqs]
    table = pa.table({
        "input_ids": _lists(np.concatenate([s["input_ids"] for s in seqs]).astype(np.uint64),
                            [len(s["input_ids"]) for s in seqs]),
        "compressed_logprobs": _nested(logprob_bytes, lens),
        "bytepacked_indices": _nested(index_bytes, lens),
    })
    f = Path(workdir) / f"distillkit_k{k}" / "data_0.parquet"
    f.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(f, schema=table.schema) as w:  # the capture script's writer: pyarrow defaults
        w.write_table(table)
    config = f.parent / "compression_config.yaml"
    config.write_text(f"d: {V}\nk: {k}\nexact_k: {exact_k}\nexact_dtype: bfloat16\n"
                      "polynomial_terms: [0, 1, sqrt]\nterm_dtype: float32\nresidual_bins: []\n"
                      "delta_encoding: false\nerror_diffusion: false\nnormalize_t: false\n")
    dec = np.concatenate([exact.float().numpy(), (coeffs @ X.T).numpy()], axis=1)
    md = pq.ParquetFile(f).metadata
    entry = sum(md.row_group(r).column(c).total_compressed_size for r in range(md.num_row_groups)
                for c in range(md.num_columns) if md.row_group(r).column(c).path_in_schema.split(".")[0] != "input_ids")
    raw = logprob_bytes.shape[1] + index_bytes.shape[1]
    return _row("DistillKit, budget compressor", "Parquet (snappy), bit-packed bytes", f.stat().st_size, P,
                _err(dec, lp), config.stat().st_size,
                f"raw {raw} B/token ({index_bytes.shape[1]} ids + {logprob_bytes.shape[1]} logprobs); "
                f"entry columns {entry / P:.1f} B/token; input_ids as uint64")


# ------------------------------------------------------------------------------------- axolotl
def _write(path: Path, text: str) -> tuple[int, int]:
    data = text.encode()
    path.write_bytes(data)
    return len(data), len(gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0))


def axolotl_rows(seqs, k, workdir) -> list[dict]:
    d = Path(workdir) / f"axolotl_k{k}"
    d.mkdir(parents=True, exist_ok=True)
    P = sum(len(s["label_lp"]) for s in seqs)
    v2 = "".join(json.dumps({"logprobs": s["top_lp"][:, :k].tolist(),
                             "target_token_ids": s["top_ids"][:, :k].tolist()}) + "\n" for s in seqs)
    row0 = json.loads(v2.split("\n", 1)[0])
    assert np.array_equal(np.array(row0["logprobs"], np.float32), seqs[0]["top_lp"][:, :k])  # exact round trip
    legacy = "".join(
        json.dumps({"logprobs": [[{"token": f"token_id:{i}", "logprob": x} for i, x in zip(ri, rx)]
                                 for ri, rx in zip(s["top_ids"][:, :k].tolist(), s["top_lp"][:, :k].tolist())]}) + "\n"
        for s in seqs)
    v2_raw, v2_gz = _write(d / "kd_v2.jsonl", v2)
    lg_raw, lg_gz = _write(d / "kd_legacy.jsonl", legacy)
    lens = [len(s["label_lp"]) for s in seqs]
    lp = np.concatenate([s["top_lp"][:, :k] for s in seqs]).astype(np.float64)
    ids = np.concatenate([s["top_ids"][:, :k] for s in seqs]).astype(np.int64)
    pq.write_table(pa.table({"logprobs": _nested(lp, lens), "target_token_ids": _nested(ids, lens)}),
                   d / "kd_v2.parquet")
    prepared = pa.table({"target_logprobs": _nested(lp, lens), "target_token_ids": _nested(ids, lens),
                         "target_mask": _nested(np.ones_like(ids), lens)})
    with pa.OSFile(str(d / "prepared.arrow"), "wb") as sink, pa.ipc.new_stream(sink, prepared.schema) as w:
        w.write_table(prepared)
    exact = (0.0, 0.0)
    return [
        _row("axolotl KD rows (current)", "JSONL", v2_raw, P, exact,
             note="logprobs + target_token_ids; text not counted"),
        _row("axolotl KD rows (current)", f"JSONL, gzip -{GZIP_LEVEL}", v2_gz, P, exact),
        _row("axolotl KD rows (current)", "Parquet (snappy), float64/int64", (d / "kd_v2.parquet").stat().st_size,
             P, exact, note="as `datasets` types the JSON values"),
        _row("axolotl KD rows (legacy)", "JSONL", lg_raw, P, exact,
             note='{"token": "token_id:ID", "logprob": X} per entry'),
        _row("axolotl KD rows (legacy)", f"JSONL, gzip -{GZIP_LEVEL}", lg_gz, P, exact),
        _row("axolotl prepared rows", "Arrow stream, uncompressed", (d / "prepared.arrow").stat().st_size, P, exact,
             note="target_logprobs f64, target_token_ids i64, target_mask i64 (inferred types)"),
    ]


# ---------------------------------------------------------------------------------- Megatron-LM
def _zstd3(data: bytes) -> bytes:
    try:
        import zstandard
    except ImportError:  # same library and level through pyarrow
        return pa.Codec("zstd", compression_level=3).compress(data, asbytes=True)
    return zstandard.ZstdCompressor(level=3).compress(data)


def megatron_row(seqs, k, workdir, microbatches_per_iter=8) -> dict:
    d = Path(workdir) / f"megatron_k{k}"
    d.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"hash": hashlib.md5(b"bench", usedforsecurity=False).hexdigest(),
                       "identifiers": {"seed": 1234, "sequence_length": 255, "train_samples": len(seqs),
                                       "blend": {"kind": "blend", "blend": [[1.0, "pydoc_topics_text_document"]]}},
                       "saver": {"k": k, "p": None, "min_k": 1, "save_dtype": "fp16"}},
                      separators=(",", ":")).encode()
    tar_path = d / f"cp0_dp0__{math.ceil(len(seqs) / microbatches_per_iter)}.tar"
    decoded, ref = [], []
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("_meta.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
        for it, a in enumerate(range(0, len(seqs), microbatches_per_iter), start=1):
            mbs = seqs[a:a + microbatches_per_iter]
            ids = [torch.from_numpy(s["top_ids"][:, None, :k].astype(np.int64)) for s in mbs]  # [seq, mbs=1, k]
            vals = [torch.from_numpy(np.ascontiguousarray(s["top_lp"][:, None, :k])).to(torch.float16) for s in mbs]
            buf = io.BytesIO()
            torch.save({"values": vals, "indices_low": [(i & 0xFFFF).to(torch.uint16) for i in ids],
                        "bit_17": [(i >> 16).to(torch.bool) for i in ids]}, buf)
            data = _zstd3(buf.getvalue())
            info = tarfile.TarInfo(f"{it}.pt.zst")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            decoded += [v.float().numpy().reshape(-1, k) for v in vals]
            ref += [s["top_lp"][:, :k] for s in mbs]
    P = sum(len(s["label_lp"]) for s in seqs)
    return _row("Megatron-LM offline logits", "tar of zstd-3 torch.save, fp16/uint16/bool", tar_path.stat().st_size, P,
                _err(np.concatenate(decoded), np.concatenate(ref)),
                note=f"raw tensors {5 * k} B/token (2 fp16 + 2 uint16 + 1 bool per entry); all positions stored")


# ------------------------------------------------------------------------------------ SampledKD
def sampledkd_row(seqs, workdir, U=12, N=50, id_bits=17, qmax=127) -> dict:
    d = Path(workdir) / "sampledkd"
    d.mkdir(parents=True, exist_ok=True)
    items, kept_draws, total_draws = [], 0, 0
    for s in seqs:
        draws = s["draws"][:, :N]
        P = len(draws)
        srt = np.sort(draws, axis=1)
        new = np.concatenate([np.ones((P, 1), bool), srt[:, 1:] != srt[:, :-1]], axis=1)
        grp = np.cumsum(new, axis=1) - 1  # unique-id index within the row
        ids = np.full((P, N), V, np.int64)
        cnt = np.zeros((P, N), np.int64)
        rows = np.repeat(np.arange(P), N)
        ids[rows, grp.ravel()] = srt.ravel()
        np.add.at(cnt, (rows, grp.ravel()), 1)
        order = np.argsort(-cnt, axis=1, kind="stable")[:, :U]  # the U most drawn ids
        ids, cnt = np.take_along_axis(ids, order, 1), np.take_along_axis(cnt, order, 1)
        kept_draws += int(cnt.sum())
        total_draws += P * N
        x = cnt / N * qmax
        q = np.rint(x)
        diff = (qmax - q.sum(axis=1)).astype(np.int64)  # make each row's q7 sum to 127, as the builder does
        resid = np.where(cnt > 0, np.abs(x - q), -1.0)
        rank = np.argsort(np.argsort(-resid, axis=1, kind="stable"), axis=1)
        q = np.clip(q + np.where(rank < np.abs(diff)[:, None], np.sign(diff)[:, None], 0), 0, qmax)
        q = np.where(cnt > 0, q, 0).astype(np.int64)
        packed = (ids & ((1 << id_bits) - 1)) | (q << id_bits)
        b = np.stack([packed & 0xFF, (packed >> 8) & 0xFF, (packed >> 16) & 0xFF], axis=-1).astype(np.uint8)
        h = np.rint(np.clip(s["entropy"], 0, math.log(V)) / math.log(V) * 255).astype(np.uint8)
        key = hashlib.sha1(s["input_ids"].astype(np.int64).tobytes()).hexdigest()
        items.append({"key": key, "valid_mask": torch.ones(P, dtype=torch.bool), "topk_m": 20,
                      "H_hat_u8": torch.from_numpy(h),
                      "rs": {"U": U, "N": N, "id_bits": id_bits, "prob_bits": 7, "sentinel_id": V,
                             "packed": torch.from_numpy(b.reshape(-1))}})
    shard_size = 2048
    manifest = {"signature": {"rs_vocab_samples": U, "rs_samples": N, "H_hat_u8": True, "kd_temperature": 1.0},
                "items": {}, "shards": []}
    for sh, a in enumerate(range(0, len(items), shard_size)):
        torch.save(items[a:a + shard_size], d / f"shard_{sh:06d}.pt")
        manifest["shards"].append({"path": f"shard_{sh:06d}.pt", "n": len(items[a:a + shard_size])})
        manifest["items"].update({it["key"]: {"shard": sh, "index": j} for j, it in enumerate(items[a:a + shard_size])})
    (d / "manifest.json").write_text(json.dumps(manifest))
    nbytes = sum(f.stat().st_size for f in d.iterdir())
    P = sum(len(s["label_lp"]) for s in seqs)
    return _row(f"SampledKD (RS-KD cache), U={U}", "torch.save shards, 3-byte id+q7 slots", nbytes, P, None,
                note=f"raw {3 * U + 1} B/token + 1 B mask; keeps {kept_draws / total_draws:.1%} of the {N} draws")


# ----------------------------------------------------------------------------------------- main
def _fmt_err(e: tuple[float, float] | None) -> str:
    return "-" if e is None else f"{e[0]:.4f} / {e[1]:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=50_000, help="positions to use (default 50000)")
    ap.add_argument("--k", type=int, nargs="+", default=[50, 32], help="top-k sizes (default 50 32)")
    ap.add_argument("--workdir", default=None, help="where to write the files (default: a temp dir, removed)")
    a = ap.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    torch.set_num_threads(1)
    d = load_or_compute(max(a.positions, 51_000))
    seqs = sequences(d, a.positions)
    P = sum(len(s["label_lp"]) for s in seqs)
    workdir = a.workdir or tempfile.mkdtemp(prefix="bench_compare_")
    by_k: dict[int, list[dict]] = {}
    try:
        for k in a.k:
            print(f"... k={k}", file=sys.stderr)
            by_k[k] = [*logitstore_rows(seqs, k, workdir), distillkit_row(seqs, k, workdir),
                       megatron_row(seqs, k, workdir), *axolotl_rows(seqs, k, workdir)]
        print("... sampled", file=sys.stderr)
        sampled = logitstore_rows(seqs, 0, workdir) + [sampledkd_row(seqs, workdir)]
    finally:
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n$ python tools/bench_compare.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"\nteacher-cache formats on the same {P:,} positions ({len(seqs)} sequences of {len(seqs[0]['label_lp'])}) "
          f"of SmolLM2-135M-Instruct (V={V}), pydoc_data.topics; B/token = bytes written / positions\n")
    hdr = "| format | container, encoding | " + " | ".join(f"k={k} B/token | k={k} max / mean abs err" for k in a.k)
    print(hdr + " | fixed B per cache | notes (first k) |")
    print("|" + "---|" * (4 + 2 * len(a.k)))
    for i, r in enumerate(by_k[a.k[0]]):
        cells = " | ".join(f"{by_k[k][i]['bpt']:,.1f} | {_fmt_err(by_k[k][i]['err'])}" for k in a.k)
        print(f"| {r['name']} | {r['how']} | {cells} | {r['fixed'] or '-'} | {r['note']} |")
    print("| TRL GKD / GOLD / Distillation trainers | nothing stored (teacher runs every step) | "
          + " | ".join("0 | -" for _ in a.k) + " | - | not measured |")
    print("\nsampled (50 draws per position from the full distribution):\n")
    print("| format | container, encoding | B/token | fixed B per cache | notes |")
    print("|---|---|---|---|---|")
    for r in sampled:
        print(f"| {r['name']} | {r['how']} | {r['bpt']:,.1f} | {r['fixed'] or '-'} | {r['note']} |")


if __name__ == "__main__":
    main()
