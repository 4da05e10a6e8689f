"""The DuckDB face of an open cache: the views ``sequences`` and ``tokens``, the ``manifest`` and
``exactness`` tables, and the macros. ``logitstore.query.connect(path)`` and ``Cache.sql`` use this.

``views.connect(cache)`` (``cache``: an open ``logitstore.reader.Cache``) returns a DuckDB connection where

- ``sequences`` has one row per sequence: ``seq_id``, ``record``, ``sample``, ``input_ids``,
  ``n_tokens``, ``n_positions``, ``n_targets``, ``mean_entropy``, ``teacher_nll``,
  ``token_accuracy``, ``correct``. It reads only the columns a query names, straight from
  the shards, so filters on the scalar columns never unpack a list.
- ``tokens`` has one row per cached position: ``seq_id``, ``pos``, ``label``,
  ``label_logprob``, ``entropy``, ``tail_mass``, ``loss_mask``, ``topk_ids``,
  ``topk_logprobs`` (decoded: token ids through the id map, logprobs from the quantised
  deltas), ``sample_counts`` for sampled caches (NULL otherwise), and ``tail_ids``,
  ``tail_logprobs``, ``tail_counts`` (the tail draws of a ``topk_tail`` cache, decoded the same
  way; empty lists where a cache has no tail draws), ``proposal_log_norm`` (rules drawn at a
  proposal temperature != 1, NULL otherwise), and ``policy_logprob``, ``policy_entropy`` (what the
  model that sampled the responses said of each position, in a cache built with
  ``--responses-from``; NULL otherwise).
- ``manifest`` is one row per manifest key (``key``, ``value`` as JSON text), e.g.
  ``SELECT value FROM manifest WHERE key = 'teacher'``.
- ``exactness`` is one row per stored field (``field``, ``exactness``: exact, quantised,
  estimate, bound or absent, ``meaning``): a cache built with vLLM stores an entropy *bound*,
  and a query can check ``SELECT exactness FROM exactness WHERE field = 'entropy'``.
- opened on a selection file, both views hold only the selected sequences, and the table
  ``selection`` (``seq_id``, ``weight``) holds the selection itself.
- ``connect(cache, con, prefix="m1_")`` names all of these ``m1_sequences``, ``m1_tokens``, ...
  (the macros keep their names), so several caches can sit in one connection
  (``logitstore.union``).

Macros over a position's entry lists (nats throughout):

- ``support_entropy(lps)``: entropy of the entries renormalised over the stored support;
- ``top1_margin(lps)``: ``lps[1] - lps[2]`` (NULL with a single entry);
- ``sparse_kl(ids_p, lps_p, ids_q, lps_q)``, ``sparse_js(...)``, ``sparse_tvd(...)``: both
  distributions are coarse-grained onto the ids they share plus one "other" bucket with
  the rest of each one's mass (``1 - sum(p)`` over the shared ids). These are exact
  divergences of the coarse-grained pair and lower bounds of the full-vocabulary ones
  (coarse-graining never increases an f-divergence). A zero bucket against a nonzero one
  is floored at 1e-12 so KL stays finite.

DuckDB reads the shards directly and does not check their page CRCs: ``connect`` checks
each shard's size against the manifest, and ``logitstore verify`` checks every byte.
Answers are as trustworthy as the last ``verify``; the Python reader checks pages itself.
"""

from __future__ import annotations

import json

import duckdb

from logitstore import format as F
from logitstore.errors import CorruptCacheError
from logitstore.manifest import EXACTNESS_MEANING

MACROS = [
    "CREATE OR REPLACE MACRO support_entropy(lps) AS "
    "  ln(list_sum(list_transform(lps, lambda x: exp(x)))) - "
    "  list_sum(list_transform(lps, lambda x: exp(x) * x)) / list_sum(list_transform(lps, lambda x: exp(x)))",
    "CREATE OR REPLACE MACRO top1_margin(lps) AS CASE WHEN len(lps) > 1 THEN lps[1] - lps[2] END",
    # probabilities of the shared ids, in one order for both sides, and each side's other bucket
    "CREATE OR REPLACE MACRO _shared(ids_p, ids_q) AS list_sort(list_intersect(ids_p, ids_q))",
    "CREATE OR REPLACE MACRO _probs(shared, ids, lps) AS "
    "  list_transform(shared, lambda i: exp(lps[list_position(ids, i)]))",
    "CREATE OR REPLACE MACRO _with_other(pr) AS list_append(pr, greatest(1.0 - coalesce(list_sum(pr), 0.0), 0.0))",
    "CREATE OR REPLACE MACRO _kl_lists(pr, qr) AS coalesce(list_sum(list_transform(range(1, len(pr) + 1), "
    "  lambda j: CASE WHEN pr[j] > 0 THEN pr[j] * ln(pr[j] / greatest(qr[j], 1e-12)) ELSE 0.0 END)), 0.0)",
    "CREATE OR REPLACE MACRO _coarse(ids_a, lps_a, ids_b, lps_b) AS "
    "  _with_other(_probs(_shared(ids_a, ids_b), ids_a, lps_a))",
    "CREATE OR REPLACE MACRO sparse_kl(ids_p, lps_p, ids_q, lps_q) AS "
    "  _kl_lists(_coarse(ids_p, lps_p, ids_q, lps_q), _coarse(ids_q, lps_q, ids_p, lps_p))",
    "CREATE OR REPLACE MACRO _mid(pr, qr) AS list_transform(range(1, len(pr) + 1), lambda j: (pr[j] + qr[j]) / 2)",
    "CREATE OR REPLACE MACRO _js_lists(pr, qr) AS "
    "0.5 * _kl_lists(pr, _mid(pr, qr)) + 0.5 * _kl_lists(qr, _mid(pr, qr))",
    "CREATE OR REPLACE MACRO sparse_js(ids_p, lps_p, ids_q, lps_q) AS "
    "  _js_lists(_coarse(ids_p, lps_p, ids_q, lps_q), _coarse(ids_q, lps_q, ids_p, lps_p))",
    "CREATE OR REPLACE MACRO _tvd_lists(pr, qr) AS "
    "  0.5 * list_sum(list_transform(range(1, len(pr) + 1), lambda j: abs(pr[j] - qr[j])))",
    "CREATE OR REPLACE MACRO sparse_tvd(ids_p, lps_p, ids_q, lps_q) AS "
    "  _tvd_lists(_coarse(ids_p, lps_p, ids_q, lps_q), _coarse(ids_q, lps_q, ids_p, lps_p))",
]

#: the sequences view: every per-sequence column of the format (logitstore/format.py), in its order
SEQUENCE_VIEW_COLUMNS = tuple(name for name, *_ in F.SEQUENCE_COLUMNS)


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def connect(cache, con: duckdb.DuckDBPyConnection | None = None, *, prefix: str = "") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views, the manifest table and the macros of the open ``cache`` (a
    ``logitstore.reader.Cache``; it is passed in, not imported, so the reader can offer ``Cache.sql``); every
    view and table name starts with ``prefix``."""
    files = _shard_files(cache)
    con = con or duckdb.connect()
    if cache.mirror is not None:  # DuckDB reads the objects through the same fsspec filesystem, by range requests
        con.register_filesystem(cache.mirror.fs)
    con.execute("SET lambda_syntax = 'DISABLE_SINGLE_ARROW'") if _has_setting(con, "lambda_syntax") else None
    for m in MACROS:
        con.execute(m)
    if files:
        src = "read_parquet([" + ", ".join(_sql_str(p) for p in files) + "])"
    else:  # a cache with no committed shard: the same views, over an empty table of its shard schema
        src = f"{prefix}logitstore_empty_shard"
        con.register(src, cache.schema.empty_table())
    if cache.selection is not None:
        sel = cache.selection
        import pyarrow as pa

        con.register("_logitstore_selection", pa.table({
            "seq_id": pa.array(sel.seq_ids, pa.string()),
            "weight": pa.array(sel.weights if sel.weights is not None else [None] * len(sel.seq_ids), pa.float64())}))
        con.execute(f"CREATE OR REPLACE TABLE {prefix}selection AS SELECT * FROM _logitstore_selection")
        con.unregister("_logitstore_selection")
        src = f"(SELECT * FROM {src} WHERE seq_id IN (SELECT seq_id FROM {prefix}selection))"
    con.execute(f"CREATE OR REPLACE VIEW {prefix}sequences AS SELECT {', '.join(SEQUENCE_VIEW_COLUMNS)} FROM {src}")
    con.execute(f"CREATE OR REPLACE VIEW {prefix}tokens AS {_tokens_sql(cache, src, con, prefix)}")
    m = cache.manifest.to_dict()
    con.execute(f"CREATE OR REPLACE TABLE {prefix}manifest (key VARCHAR, value VARCHAR)")
    con.executemany(f"INSERT INTO {prefix}manifest VALUES (?, ?)", [(k, json.dumps(v)) for k, v in m.items()])
    con.execute(f"CREATE OR REPLACE TABLE {prefix}exactness (field VARCHAR, exactness VARCHAR, meaning VARCHAR)")
    con.executemany(f"INSERT INTO {prefix}exactness VALUES (?, ?, ?)",
                    [(k, v, EXACTNESS_MEANING.get(v, "")) for k, v in cache.manifest.exactness.items()])
    return con


def _shard_files(cache) -> list[str]:
    """The shard files DuckDB reads (for a remote cache, their URLs), each checked against the manifest's size
    (cheap: DuckDB checks no page CRC)."""
    shards = cache.manifest.shards
    if cache.mirror is None:
        sizes = [p.stat().st_size if p.is_file() else None for p in cache.shard_paths]
        names = [str(p) for p in cache.shard_paths]
    else:
        listing = cache.mirror.shard_sizes()
        sizes = [listing.get(s.file.rsplit("/", 1)[-1]) for s in shards]
        names = [f"{cache.url}/{s.file}" for s in shards]
    for info, name, size in zip(shards, names, sizes):
        if size != info.bytes:
            raise CorruptCacheError(f"{name}: {'missing' if size is None else f'{size} bytes'}, the manifest says "
                                    f"{info.bytes}; run logitstore verify")
    return names


def _has_setting(con, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM duckdb_settings() WHERE name = ?", [name]).fetchone()[0])


def _tokens_sql(cache, src: str, con, prefix: str) -> str:
    """One row per position: unnest an index and subscript the per-position lists with it, so a query
    that names only scalar fields neither reads nor unpacks the entry lists (19x faster than unnesting
    every list at 2M positions; BENCHMARKS.md)."""
    codec = cache.codec
    from_ = f"(SELECT *, unnest(range(1, len(pos) + 1)) AS _i FROM {src})"
    if cache.id_map is not None:
        # the code -> token id table as a one-row constant list (1-based), joined once
        con.execute(f"CREATE OR REPLACE TABLE {prefix}logitstore_id_map AS SELECT list(token_id ORDER BY code) AS "
                    f"_id_map FROM read_parquet({_sql_str(str(cache.path / cache.manifest.id_map['file']))})")
        from_ += f", {prefix}logitstore_id_map"
    head = (_ids_sql(cache, F.id_column(codec.ids), "topk_ids"),
            _logprobs_sql(codec, F.value_column(codec.values)[0], "topk_logprobs"))
    counts = ("list_transform(sample_counts[_i], lambda x: x::INTEGER) AS sample_counts"
              if cache.rule.name == "sample" else "NULL::INTEGER[] AS sample_counts")
    if cache.rule.name == "topk_tail":
        tail = (_ids_sql(cache, F.id_column(codec.ids, "tail"), "tail_ids"),
                _logprobs_sql(codec, F.tail_value_column(codec.values), "tail_logprobs"),
                "list_transform(tail_counts[_i], lambda x: x::INTEGER) AS tail_counts")
    else:  # empty lists where a cache has no tail draws
        tail = ("[]::INTEGER[] AS tail_ids", "[]::FLOAT[] AS tail_logprobs", "[]::INTEGER[] AS tail_counts")
    norm = "proposal_log_norm[_i]::FLOAT" if cache.rule.tempered else "NULL::FLOAT"
    policy = ", ".join(f"{name}[_i]::FLOAT AS {name}" if cache.policy else f"NULL::FLOAT AS {name}"
                       for name in F.POLICY_FIELDS)  # NULL where the responses were not sampled from a policy
    return (f"SELECT seq_id, pos[_i] AS pos, input_ids[pos[_i] + 1] AS label, "
            f"label_logprob[_i]::FLOAT AS label_logprob, entropy[_i]::FLOAT AS entropy, "
            f"tail_mass[_i]::FLOAT AS tail_mass, loss_mask[_i] AS loss_mask, {', '.join(head)}, {counts}, "
            f"{', '.join(tail)}, {norm} AS proposal_log_norm, {policy} FROM {from_}")


def _ids_sql(cache, column: str, alias: str) -> str:
    """A position's token ids from ``column``: through the id map for ranked codes."""
    if cache.id_map is not None:
        return f"list_transform({column}[_i], lambda c: _id_map[c + 1]) AS {alias}"
    return f"{column}[_i] AS {alias}"


def _logprobs_sql(codec, column: str | None, alias: str) -> str:
    """A position's decoded logprobs from ``column`` (qdelta: ``logprob[j] = -step * (d[1] + ... + d[j])``)."""
    if column is None:
        return f"NULL::FLOAT[] AS {alias}"
    if codec.values == "qdelta":
        step = repr(float(codec.logprob_step))
        return (f"list_transform(range(1, len({column}[_i]) + 1), "
                f"lambda j: (-{step} * list_sum({column}[_i][1:j]))::FLOAT) AS {alias}")
    return f"list_transform({column}[_i], lambda x: x::FLOAT) AS {alias}"
