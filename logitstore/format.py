"""The on-disk format of a logitstore cache: the single source of truth in code.

``FORMAT_VERSION`` and ``shard_schema()`` define what a shard holds; FORMAT.md
documents the same columns, and ``tests/logitstore/test_format_doc.py`` keeps
the two in agreement. A shard is a zstd-compressed Parquet file with one row per
sequence; per-position fields are lists (one element per cached position) and the
sparse entries are lists of lists (one list per position, most likely first).
"""

from __future__ import annotations

import pyarrow as pa

FORMAT_NAME = "logitstore"
FORMAT_VERSION = 3
#: Versions this code reads. Anything else is refused (FormatVersionError), never misread. Version 1
#: caches have no tail columns and no manifest checksum; everything they hold reads as it did.
READABLE_VERSIONS = (1, 2, 3)


def version_for(rule: dict) -> int:
    """The format version a new cache of manifest ``rule`` is written as: the oldest one that describes it, so a
    reader that predates a feature refuses only the caches that use it (version 3: systematic draws, whose
    inclusion probabilities differ from independent draws'; every other cache is version 2, as before)."""
    return 3 if rule.get("design", "independent") != "independent" else 2

MANIFEST_NAME = "manifest.json"
#: A union of caches (``logitstore.union``: a distill run's rounds) is a directory with this file instead.
UNION_NAME = "union.json"
SHARD_DIR = "shards"
SHARD_PATTERN = "shard-{index:06d}.parquet"
#: Key of the Parquet key-value metadata that makes every shard self-describing.
PARQUET_META_KEY = b"logitstore"

#: Sparse-entry rules a cache can be built with.
RULES = ("topk", "mass", "sample", "topk_tail")
#: Rules that draw (their manifest rule may carry a proposal_temperature, and then shards a proposal_log_norm).
SAMPLING_RULES = ("sample", "topk_tail")
#: Encodings of the entry token ids. "ranked": per-cache codes, most frequent id first
#: (``id_map.parquet`` maps code -> token id); "raw": the token ids themselves.
ID_CODECS = ("ranked", "raw")
#: Types of the per-position float fields (label_logprob, entropy, tail_mass).
SCALAR_DTYPES = ("fp32", "fp16")
ID_MAP_NAME = "id_map.parquet"
#: The per-position fields of a cache whose responses were sampled from another model (``build --responses-from``):
#: what that policy itself said of each position's token. Present iff the manifest's exactness lists them.
POLICY_FIELDS = ("policy_logprob", "policy_entropy")
#: Encodings of the entry logprobs. "qdelta": non-negative integer deltas down the sorted
#: list, in units of ``logprob_step`` (lossy, bounded); "fp16"/"fp32": the values themselves;
#: "none": not stored (rule "sample" only: ids and counts are all its estimator needs).
VALUE_CODECS = ("qdelta", "fp16", "fp32", "none")

_I32 = pa.int32()


def _list(t: pa.DataType) -> pa.DataType:
    return pa.list_(pa.field("element", t, nullable=False))


# Columns: (name, Arrow type or None when it depends on the codec, nullable, meaning).
# Order here is the column order of every shard.
SEQUENCE_COLUMNS = [
    ("seq_id", pa.string(), False, "content hash of the sequence (16 hex chars, blake2b-64); stable across builds"),
    ("record", pa.int64(), False, "index of the source record in the input data"),
    ("sample", _I32, False, "sample index for generated responses (0 when scoring given text)"),
    ("n_tokens", _I32, False, "len(input_ids)"),
    ("n_positions", _I32, False, "number of cached positions (length of every per-position list)"),
    ("n_targets", _I32, False, "number of cached positions whose loss_mask is true"),
    ("mean_entropy", pa.float32(), True, "mean teacher entropy (nats) over target positions; NULL without targets"),
    ("teacher_nll", pa.float32(), True, "mean of -label_logprob over target positions; NULL without targets"),
    ("token_accuracy", pa.float32(), True, "fraction of target positions whose teacher argmax equals the label"),
    ("correct", pa.bool_(), True, "verifier verdict for the sequence; NULL where no verifier ran"),
    ("input_ids", _list(_I32), False, "the full token ids of the sequence"),
]
POSITION_COLUMNS = [
    ("pos", _list(_I32), False,
     "index in input_ids of the predicted token (>= 1, strictly increasing); label = input_ids[pos]"),
    ("loss_mask", _list(pa.bool_()), False, "true where the position is a training target"),
    ("label_logprob", None, False, "teacher full-vocabulary logprob of the label (nats, <= 0); float32 or float16"),
    ("entropy", None, False, "teacher full-vocabulary entropy (nats); float32 or float16"),
    ("tail_mass", None, False, "1 - sum(exp(true logprobs of the stored entries)), in [0, 1]; float32 or float16"),
    ("topk_ids", _list(_list(_I32)), False, "id codec raw: token ids of the sparse entries, most likely first"),
    ("topk_codes", _list(_list(_I32)), False, "id codec ranked: codes of the entries; token id = id_map[code]"),
    ("topk_logprobs", None, False, "logprobs of the entries (codec fp16/fp32), descending"),
    ("topk_logprob_deltas", None, False, "codec qdelta: d[0] = round(-lp[0]/step), d[j] = q[j] - q[j-1] >= 0"),
    ("sample_counts", None, False, "rule sample: how many of the draws hit each entry"),
    ("tail_ids", _list(_list(_I32)), False, "rule topk_tail, id codec raw: token ids of the tail draws (unique, "
     "none in the head), most likely first"),
    ("tail_codes", _list(_list(_I32)), False, "rule topk_tail, id codec ranked: codes of the tail draws"),
    ("tail_logprobs", None, False, "rule topk_tail, codec fp16/fp32: logprobs of the tail draws, descending"),
    ("tail_logprob_deltas", None, False, "rule topk_tail, codec qdelta: the tail draws' logprobs as deltas"),
    ("tail_counts", None, False, "rule topk_tail: how many of the tail_draws hit each tail id"),
    ("proposal_log_norm", None, False, "rules with proposal_temperature != 1: log Z of the proposal "
     "q_x = exp(logprob_x / T - log Z) over its support; float32 or float16"),
    ("policy_logprob", None, False, "responses from another model (--responses-from): that policy's full-vocabulary "
     "temperature-1 logprob of the label (nats, <= 0); float32 or float16"),
    ("policy_entropy", None, False, "responses from another model: the policy's full-vocabulary entropy (nats); "
     "float32 or float16"),
]
SCALAR_COLUMNS = tuple(name for name, t, _, _ in SEQUENCE_COLUMNS if name != "input_ids")


def value_column(value_codec: str) -> tuple[str | None, pa.DataType | None]:
    """The column that holds the entry logprobs under ``value_codec``, and its type (None: not stored)."""
    if value_codec == "none":
        return None, None
    if value_codec == "qdelta":
        return "topk_logprob_deltas", _list(_list(pa.uint16()))
    if value_codec == "fp16":
        return "topk_logprobs", _list(_list(pa.float16()))
    if value_codec == "fp32":
        return "topk_logprobs", _list(_list(pa.float32()))
    raise ValueError(f"value codec {value_codec!r} is not one of {VALUE_CODECS}")


def id_column(id_codec: str, prefix: str = "topk") -> str:
    """The column of the entry ids (``prefix="tail"``: of the tail draws) under ``id_codec``."""
    if id_codec not in ID_CODECS:
        raise ValueError(f"id codec {id_codec!r} is not one of {ID_CODECS}")
    return f"{prefix}_codes" if id_codec == "ranked" else f"{prefix}_ids"


def tail_value_column(value_codec: str) -> str | None:
    """The column of the tail draws' logprobs under ``value_codec`` (same codec as the head's)."""
    name = value_column(value_codec)[0]
    return None if name is None else name.replace("topk_", "tail_", 1)


def shard_schema(*, rule: str, value_codec: str, id_codec: str, scalar_dtype: str, tempered: bool = False,
                 policy: bool = False) -> pa.Schema:
    """The Arrow schema of a shard written under sparse-entry ``rule`` with the given codecs; ``tempered``: the
    rule draws from a proposal with temperature != 1 (then the shard has ``proposal_log_norm``); ``policy``: the
    responses were sampled from another model (then the shard has ``policy_logprob`` and ``policy_entropy``)."""
    if rule not in RULES:
        raise ValueError(f"rule {rule!r} is not one of {RULES}")
    if value_codec == "none" and (rule != "sample" or tempered):
        raise ValueError("value codec 'none' is only allowed under rule 'sample' at proposal temperature 1")
    if tempered and rule not in SAMPLING_RULES:
        raise ValueError(f"rule {rule!r} draws nothing, so it has no proposal temperature")
    if scalar_dtype not in SCALAR_DTYPES:
        raise ValueError(f"scalar dtype {scalar_dtype!r} is not one of {SCALAR_DTYPES}")
    vname, vtype = value_column(value_codec)
    iname = id_column(id_codec)
    ftype = _list(pa.float32() if scalar_dtype == "fp32" else pa.float16())
    fields = [pa.field(n, t, nullable=nl) for n, t, nl, _ in SEQUENCE_COLUMNS]
    for name, t, nl, _ in POSITION_COLUMNS:
        if name in ("label_logprob", "entropy", "tail_mass"):
            t = ftype
        elif name in ("topk_ids", "topk_codes"):
            if name != iname:
                continue
        elif name in ("topk_logprobs", "topk_logprob_deltas"):
            if name != vname:
                continue
            t = vtype
        elif name == "sample_counts":
            if rule != "sample":
                continue
            t = _list(_list(pa.uint16()))
        elif name.startswith("tail_"):
            if rule != "topk_tail" or name not in (id_column(id_codec, "tail"), tail_value_column(value_codec),
                                                   "tail_counts"):
                continue
            t = vtype if name == tail_value_column(value_codec) else _list(_list(pa.uint16())) \
                if name == "tail_counts" else t
        elif name == "proposal_log_norm":
            if not tempered:
                continue
            t = ftype
        elif name in POLICY_FIELDS:
            if not policy:
                continue
            t = ftype
        fields.append(pa.field(name, t, nullable=nl))
    return pa.schema(fields)
