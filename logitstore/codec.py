"""Encoding and decoding of sparse entries: the codec of a cache.

A ``Codec`` says how entry ids and logprobs are stored (see FORMAT.md):

- ids: ``ranked`` stores per-cache codes (most frequent token first, so most codes
  are small and ``BYTE_STREAM_SPLIT`` + zstd compress them well) with the code ->
  token id table in ``id_map.parquet``; ``raw`` stores the token ids.
- values: ``qdelta`` quantises q = round(-logprob / step) and stores the
  non-negative differences down the sorted list (max abs error step / 2);
  ``fp16`` / ``fp32`` store the logprobs themselves.

The functions here work on *flat* entry arrays (all entries of many positions
back to back, with per-position offsets) so that writer and reader stay
vectorised.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from logitstore.errors import InvalidInputError
from logitstore.format import ID_CODECS, SCALAR_DTYPES, VALUE_CODECS

#: Default quantisation step of qdelta values: 5/128 nats (exact in binary), bound 5/256.
DEFAULT_LOGPROB_STEP = 0.0390625
QDELTA_MAX = np.iinfo(np.uint16).max


@dataclasses.dataclass(frozen=True)
class Codec:
    """How a cache stores its entries. Recorded in the manifest; fixed for a cache's life."""

    values: str = "qdelta"
    """entry logprobs: qdelta (quantised deltas), fp16 or fp32"""
    logprob_step: float = DEFAULT_LOGPROB_STEP
    """qdelta quantisation step in nats; the max abs logprob error is step / 2"""
    ids: str = "ranked"
    """entry ids: ranked (per-cache frequency-ranked codes) or raw token ids"""
    scalars: str = "fp32"
    """per-position label_logprob, entropy and tail_mass: fp32 or fp16"""
    zstd_level: int = 1
    """zstd level of the Parquet pages (1 is fastest and, on these data, no larger than 3-12)"""

    def __post_init__(self) -> None:
        for name, allowed in (("values", VALUE_CODECS), ("ids", ID_CODECS), ("scalars", SCALAR_DTYPES)):
            if getattr(self, name) not in allowed:
                raise InvalidInputError(f"codec {name}={getattr(self, name)!r} is not one of {allowed}")
        if not (0 < self.logprob_step <= 1):
            raise InvalidInputError(f"logprob_step={self.logprob_step} must be in (0, 1] nats")
        if not (-7 <= self.zstd_level <= 22):
            raise InvalidInputError(f"zstd_level={self.zstd_level} must be in [-7, 22] (zstd's range)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Codec:
        return cls(**d)

    def logprob_error_text(self) -> str:
        """The decoding error of entry logprobs, in words (FORMAT.md, "Codecs and decoding error")."""
        if self.values == "qdelta":
            return f"{self.logprob_error_bound():.4g} nats (step {self.logprob_step:.4g} / 2)"
        return {"fp32": "0 (lossless)", "fp16": "2^-11 relative (fp16 rounding)",
                "none": "logprobs not stored"}[self.values]

    def logprob_error_bound(self) -> float:
        """Max abs error of a decoded entry logprob (0 for fp32; fp16 is relative, see FORMAT.md)."""
        return self.logprob_step / 2 if self.values == "qdelta" else 0.0

    def logprob_errors(self, logprobs):
        """Elementwise bound on the abs error of decoded entry logprobs (a numpy array or torch tensor; FORMAT.md's
        ``e_j``, "Invariants"): ``step / 2`` (qdelta), ``2^-11 |logprob| + 1e-7`` (fp16), ``1e-6`` (fp32)."""
        a = abs(logprobs)
        if self.values == "qdelta":
            return a * 0.0 + self.logprob_step / 2
        if self.values == "fp16":
            return a * 2.0**-11 + 1e-7
        return a * 0.0 + 1e-6

    def scalar_error(self, value):
        """Elementwise bound on the abs error of decoded per-position scalars (entropy, label logprob, tail mass; an
        array or tensor):
        float32 rounding (``1e-6 max(1, |x|)``) or fp16's (``2^-11 |x| + 1e-7``)."""
        a = abs(value)
        if self.scalars == "fp16":
            return a * 2.0**-11 + 1e-7
        return a.clip(min=1.0) * 1e-6


# ---------------------------------------------------------------- values


def quantise_deltas(logprobs: np.ndarray, starts: np.ndarray, step: float) -> np.ndarray:
    """Flat logprobs (descending within each position) -> uint16 qdelta values.

    ``starts[i]`` is the flat index of position i's first entry (every position has >= 1).
    q = round(-logprob / step) is formed in float32, exact for |q| < 2**24 (the uint16 range is far below).
    """
    q = np.rint(logprobs.astype(np.float32, copy=False) * np.float32(-1.0 / step)).astype(np.int32)
    d = np.empty_like(q)
    d[0:1] = q[0:1]
    np.subtract(q[1:], q[:-1], out=d[1:])
    d[starts] = q[starts]
    if d.size and (d.min() < 0 or d.max() > QDELTA_MAX):
        bad = int(np.argmax((d < 0) | (d > QDELTA_MAX)))
        raise InvalidInputError(
            f"entry logprob {logprobs[bad]} at flat index {bad} cannot be stored as a qdelta: "
            f"values must be <= 0, descending, and > -{QDELTA_MAX * step:.0f} nats"
        )
    return d.astype(np.uint16)


def dequantise_flat(deltas: np.ndarray, starts: np.ndarray, step: float) -> np.ndarray:
    """Flat qdelta values -> flat float32 logprobs; ``starts`` as in ``quantise_deltas``."""
    if not deltas.size:
        return np.zeros(0, np.float32)
    # int32 running sums when the total fits (always, in practice), int64 otherwise
    acc = np.int32 if int(deltas.sum(dtype=np.int64)) < 2**31 else np.int64
    c = np.cumsum(deltas, dtype=acc)
    # each entry's base is the running sum just before its position's first entry; the running
    # sum never decreases (deltas >= 0), so a running maximum spreads the bases forward
    base = np.zeros_like(c)
    base[starts[1:]] = c[starts[1:] - 1]
    np.maximum.accumulate(base, out=base)
    c -= base
    out = c.astype(np.float32)
    out *= np.float32(-step)
    return out


# ---------------------------------------------------------------- ids


def build_id_map(sample_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Code -> token id table from the entry ids in ``sample_ids`` (see ``id_map_from_counts``)."""
    return id_map_from_counts(np.bincount(sample_ids.astype(np.int64).ravel(), minlength=vocab_size), vocab_size)


def id_map_from_counts(counts: np.ndarray, vocab_size: int) -> np.ndarray:
    """Code -> token id table from per-token frequencies ``counts`` (ids past ``vocab_size`` are ignored,
    missing ones count 0).

    Tokens are ranked by descending frequency (ties and unseen ids by ascending id), and
    rank r gets the r-th code in low-byte-major order (low byte 0 for every high byte, then
    low byte 1, ...). So the most frequent tokens share low byte 0 and differ in the high
    byte: with ``BYTE_STREAM_SPLIT`` neither byte stream is dominated by one symbol, which
    zstd's Huffman literal coder handles better (FORMAT.md; measured in BENCHMARKS.md).
    """
    counts = np.pad(np.asarray(counts, np.int64)[:vocab_size], (0, max(0, vocab_size - len(counts))))
    by_rank = np.argsort(-counts, kind="stable")  # token ids, most frequent first
    codes = np.arange(vocab_size)
    code_of_rank = np.lexsort((codes >> 8, codes & 255))
    id_map = np.empty(vocab_size, np.int32)
    id_map[code_of_rank] = by_rank
    return id_map


def invert_id_map(id_map: np.ndarray) -> np.ndarray:
    """Token id -> code."""
    inv = np.empty_like(id_map)
    inv[id_map] = np.arange(id_map.size, dtype=id_map.dtype)
    return inv


# ---------------------------------------------------------------- padding


def valid_mask(lengths: np.ndarray, k: int) -> np.ndarray | None:
    """``[N, k]`` mask of the valid entries, or None when every position has k (no padding needed)."""
    if lengths.size and int(lengths.min()) == k:
        return None
    return np.arange(k)[None, :] < lengths[:, None]


def pad_flat(values: np.ndarray, mask: np.ndarray | None, n: int, k: int, fill) -> np.ndarray:
    """Flat entries -> ``[n, k]``, padded with ``fill`` where ``mask`` (from ``valid_mask``) is false."""
    if mask is None:  # fixed k: a view, no scatter
        return values.reshape(n, k)
    out = np.full((n, k), fill, dtype=values.dtype)
    out[mask] = values  # row-major mask order = flat entry order
    return out
