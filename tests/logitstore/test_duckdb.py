"""The shards are plain Parquet: DuckDB (pure SQL, no logitstore) and ``datasets`` read them, and what
they read decodes to the reference values."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pytest

from logitstore import TopK
from tests.conftest import CODECS, assert_logprobs_within_bound, make_sequences, padded_reference, write_cache


def _sql(query: str) -> list[tuple]:
    con = duckdb.connect()
    try:
        return con.sql(query).fetchall()
    finally:
        con.close()


def _shards(cache) -> str:
    return f"read_parquet('{cache.path}/shards/*.parquet')"


def _close(got, want, rtol=1e-5, atol=1e-6) -> bool:
    if want is None:
        return got is None
    return got is not None and abs(got - want) <= atol + rtol * abs(want)


def test_sequence_scalars_in_sql(ranked_cache):
    rows = _sql(f"SELECT seq_id, record, n_tokens, n_positions, n_targets, mean_entropy, teacher_nll, "
                f"token_accuracy, correct, len(input_ids) FROM {_shards(ranked_cache)}")
    assert len(rows) == len(ranked_cache.refs)
    by_id = ranked_cache.by_id
    assert {r[0] for r in rows} == set(by_id)
    for sid, record, n_tok, n_pos, n_tgt, me, nll, acc, correct, n_ids in rows:
        ref = by_id[sid]
        assert (record, n_tok, n_pos, n_tgt, n_ids) == (ref.record, ref.input_ids.size, ref.n,
                                                        int(ref.loss_mask.sum()), ref.input_ids.size)
        want_me, want_nll, want_acc = ref.aggregates(ranked_cache.rule)
        assert _close(me, want_me) and _close(nll, want_nll) and _close(acc, want_acc)
        assert correct == ref.correct


def test_sql_filter_on_aggregates(ranked_cache):
    nll = [r.aggregates(ranked_cache.rule)[1] for r in ranked_cache.refs]
    v = sorted(x for x in nll if x is not None)
    m = len(v) // 2
    assert v[m] - v[m - 1] > 1e-4 * v[m]  # a threshold well between two values: float32 rounding cannot matter
    threshold = (v[m - 1] + v[m]) / 2
    (count,), = _sql(f"SELECT count(*) FROM {_shards(ranked_cache)} WHERE teacher_nll > {threshold!r}")
    assert count == sum(1 for x in v if x > threshold) == len(v) - m
    assert 0 < count < len(nll)


def test_decode_ranked_qdelta_in_pure_sql(ranked_cache):
    """Ids through the id map, logprobs as a prefix sum of the deltas times the step, labels from input_ids."""
    step = ranked_cache.codec.logprob_step
    path = ranked_cache.path
    rows = _sql(f"""
        WITH m AS (SELECT (SELECT list(token_id ORDER BY code) FROM read_parquet('{path}/id_map.parquet')) AS id_map),
             t AS (SELECT seq_id, input_ids, unnest(pos) AS pos, unnest(entropy) AS entropy,
                          unnest(label_logprob) AS label_logprob, unnest(topk_codes) AS codes,
                          unnest(topk_logprob_deltas) AS d
                   FROM {_shards(ranked_cache)})
        SELECT seq_id, pos, input_ids[pos + 1] AS label, entropy, label_logprob,
               list_transform(codes, lambda c: m.id_map[c + 1]) AS topk_ids,
               CAST(list_transform(list_reduce(d, lambda acc, x: list_append(acc, coalesce(acc[-1], 0) + x),
                                               []::INTEGER[]),
                                   lambda q: -q * {step!r}) AS DOUBLE[]) AS topk_logprobs
        FROM t, m
    """)
    by_id = ranked_cache.by_id
    assert sorted((r[0], r[1]) for r in rows) == sorted(
        (ref.seq_id, int(p)) for ref in ranked_cache.refs for p in ref.positions)
    for sid, pos, label, ent, label_lp, ids, lps in rows:
        ref = by_id[sid]
        i = int(np.searchsorted(ref.positions, pos))
        n = int(ref.n_entries[i])
        assert label == ref.input_ids[pos]
        assert ent == np.float32(ref.entropy[i]) and label_lp == np.float32(ref.label_logprob[i])
        assert ids == ref.ids[i, :n].tolist()
        assert len(lps) == n
        assert_logprobs_within_bound(np.array(lps), ref.logprobs[i, :n], ranked_cache.codec)


def test_raw_fp32_columns_read_directly(raw_fp32_cache):
    rows = _sql(f"SELECT seq_id, unnest(pos), unnest(topk_ids), unnest(topk_logprobs), unnest(tail_mass) "
                f"FROM {_shards(raw_fp32_cache)}")
    by_id = raw_fp32_cache.by_id
    assert len(rows) == sum(r.n for r in raw_fp32_cache.refs)
    for sid, pos, ids, lps, tail in rows:
        ref = by_id[sid]
        i = int(np.searchsorted(ref.positions, pos))
        n = int(ref.n_entries[i])
        assert ids == ref.ids[i, :n].tolist()
        np.testing.assert_array_equal(np.array(lps, np.float32), ref.logprobs[i, :n])
        assert tail == np.float32(ref.tail_mass[i])


def test_sample_counts_in_sql(sampled_cache):
    path = sampled_cache.path
    rows = _sql(f"""
        WITH m AS (SELECT list(token_id ORDER BY code) AS id_map FROM read_parquet('{path}/id_map.parquet'))
        SELECT seq_id, pos, list_transform(codes, lambda c: m.id_map[c + 1]), counts
        FROM (SELECT seq_id, unnest(pos) AS pos, unnest(topk_codes) AS codes, unnest(sample_counts) AS counts
              FROM {_shards(sampled_cache)}), m
    """)
    assert len(rows) == sum(r.n for r in sampled_cache.refs)
    for sid, pos, ids, counts in rows:
        ref = sampled_cache.by_id[sid]
        i = int(np.searchsorted(ref.positions, pos))
        ref_ids, _, ref_counts, valid = padded_reference(ref, sampled_cache.rule.k)
        assert ids == ref_ids[i][valid[i]].tolist()
        assert counts == ref_counts[i][valid[i]].tolist()
        assert sum(counts) <= sampled_cache.rule.draws


@pytest.mark.parametrize("codec_name,column", [("fp16", "topk_logprobs"), ("fp16-scalars", "entropy")])
def test_fp16_columns_in_sql(tmp_path, codec_name, column):
    rng = np.random.default_rng(0)
    rule = TopK(4)
    refs = make_sequences(rng, 3, vocab=100, rule=rule, min_tokens=3, max_tokens=10)
    write_cache(tmp_path / "c", refs, vocab=100, rule=rule, codec=CODECS[codec_name])
    rows = _sql(f"SELECT seq_id, unnest({column}) FROM read_parquet('{tmp_path}/c/shards/*.parquet')")
    assert len(rows) == sum(r.n for r in refs)


def test_datasets_loads_the_shards(ranked_cache, tmp_path):
    datasets = pytest.importorskip("datasets")
    files = sorted(str(p) for p in (ranked_cache.path / "shards").glob("*.parquet"))
    assert len(files) >= 3
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == len(ranked_cache.refs)
    assert ds["seq_id"] == [r.seq_id for r in ranked_cache.refs]
    assert ds["n_positions"] == [r.n for r in ranked_cache.refs]
    row = ds[int(np.argmax([r.n for r in ranked_cache.refs]))]
    ref = ranked_cache.by_id[row["seq_id"]]
    assert row["pos"] == ref.positions.tolist()
    assert row["input_ids"] == ref.input_ids.tolist()
    assert [len(c) for c in row["topk_codes"]] == ref.n_entries.tolist()
    np.testing.assert_array_equal(np.array(row["entropy"], np.float32), ref.entropy.astype(np.float32))
    assert math.isclose(sum(row["entropy"][j] for j in range(ref.n) if ref.loss_mask[j]) / max(1, ref.loss_mask.sum()),
                        ref.aggregates(ranked_cache.rule)[0] or 0.0, rel_tol=1e-5, abs_tol=1e-6)
