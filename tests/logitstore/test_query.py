"""The DuckDB layer against numpy: views equal the reader's decoded arrays, macros equal plain formulas."""

import json

import numpy as np
import pytest

import logitstore
from logitstore.query import connect
from tools.cli import main


@pytest.mark.parametrize("fixture", ["ranked_cache", "raw_fp32_cache", "sampled_cache"])
def test_views_equal_the_decoded_cache(fixture, request):
    built = request.getfixturevalue(fixture)
    cache = logitstore.open(built.path)
    con = connect(cache)
    seqs = {s.seq_id: s for s in cache}
    rows = con.sql("SELECT seq_id, record, n_tokens, n_positions, mean_entropy, teacher_nll, token_accuracy, "
                   "correct, input_ids FROM sequences").fetchall()
    assert len(rows) == len(seqs)
    for sid, record, n_tok, n_pos, me, nll, acc, correct, input_ids in rows:
        s = seqs[sid]
        assert (record, n_tok, n_pos, correct) == (s.record, s.n_tokens, s.n_positions, s.correct)
        assert input_ids == s.input_ids.tolist()
        for got, want in ((me, s.mean_entropy), (nll, s.teacher_nll), (acc, s.token_accuracy)):
            assert (got is None and want is None) or got == pytest.approx(want, rel=1e-6)
    toks = con.sql("SELECT seq_id, pos, label, label_logprob, entropy, tail_mass, loss_mask, topk_ids, "
                   "topk_logprobs, sample_counts FROM tokens").fetchall()
    assert len(toks) == cache.num_positions
    by_pos = {}
    for t in toks:
        by_pos.setdefault(t[0], []).append(t)
    for sid, s in seqs.items():
        got = sorted(by_pos.get(sid, []), key=lambda t: t[1])
        assert [t[1] for t in got] == s.pos.tolist()
        assert [t[2] for t in got] == s.labels.tolist()
        for i, t in enumerate(got):
            n = s.n_entries[i]
            assert t[7] == s.ids[i, :n].tolist()
            if s.logprobs is None:
                assert t[8] is None
            else:
                np.testing.assert_allclose(t[8], s.logprobs[i, :n], atol=1e-6)
            assert t[3] == pytest.approx(float(s.label_logprob[i]), abs=1e-6)
            assert t[4] == pytest.approx(float(s.entropy[i]), abs=1e-6)
            assert t[6] == bool(s.loss_mask[i])
            assert (t[9] is None) == (s.counts is None)
            if s.counts is not None:
                assert t[9] == s.counts[i, :n].tolist()


def test_sequence_filters_read_only_scalar_columns(ranked_cache):
    con = connect(ranked_cache.path)
    plan = "\n".join(r[1] for r in con.sql(
        "EXPLAIN SELECT seq_id FROM sequences WHERE mean_entropy < 2 AND correct").fetchall())
    assert "mean_entropy" in plan
    for list_column in ("topk_codes", "topk_logprob_deltas", "entropy\n", "input_ids", "label_logprob"):
        assert list_column not in plan, list_column


def test_manifest_table(ranked_cache):
    con = connect(ranked_cache.path)
    rule = json.loads(con.execute("SELECT value FROM manifest WHERE key = 'rule'").fetchone()[0])
    assert rule == logitstore.open(ranked_cache.path).manifest.rule
    totals = json.loads(con.execute("SELECT value FROM manifest WHERE key = 'totals'").fetchone()[0])
    assert totals["positions"] == logitstore.open(ranked_cache.path).num_positions


def _coarse(ids_a, lp_a, ids_b):
    shared = sorted(set(ids_a) & set(ids_b))
    pr = np.array([np.exp(lp_a[list(ids_a).index(i)]) for i in shared])
    return np.append(pr, max(1.0 - pr.sum(), 0.0))


def _kl(p, q):
    return float(sum(pi * np.log(pi / max(qi, 1e-12)) for pi, qi in zip(p, q) if pi > 0))


def test_macros_equal_plain_formulas_and_bound_the_full_divergences():
    rng = np.random.default_rng(3)
    con = connect_empty()
    V = 40
    for _ in range(30):
        zp, zq = rng.standard_normal(V) * 2, rng.standard_normal(V) * 2
        p, q = np.exp(zp - np.logaddexp.reduce(zp)), np.exp(zq - np.logaddexp.reduce(zq))
        kp, kq = int(rng.integers(1, 15)), int(rng.integers(1, 15))
        ip, iq = np.argsort(-p)[:kp], np.argsort(-q)[:kq]
        lp, lq = np.log(p[ip]), np.log(q[iq])
        args = [ip.tolist(), lp.tolist(), iq.tolist(), lq.tolist()]
        kl, js, tvd, se, m = con.execute(
            "SELECT sparse_kl(?, ?, ?, ?), sparse_js(?, ?, ?, ?), sparse_tvd(?, ?, ?, ?), support_entropy(?), "
            "top1_margin(?)", args * 3 + [lp.tolist(), lp.tolist()]).fetchone()
        pc, qc = _coarse(ip, lp, iq), _coarse(iq, lq, ip)
        mid = (pc + qc) / 2
        assert kl == pytest.approx(_kl(pc, qc), abs=1e-9)
        assert js == pytest.approx(0.5 * _kl(pc, mid) + 0.5 * _kl(qc, mid), abs=1e-9)
        assert tvd == pytest.approx(0.5 * np.abs(pc - qc).sum(), abs=1e-9)
        r = p[ip] / p[ip].sum()
        assert se == pytest.approx(float(-(r * np.log(r)).sum()), abs=1e-9)
        assert (m is None) if kp == 1 else m == pytest.approx(float(lp[0] - lp[1]), abs=1e-9)
        # coarse-graining never increases a divergence: lower bounds of the full-vocabulary values
        full_m = (p + q) / 2
        assert kl <= _kl(p, q) + 1e-9 and tvd <= 0.5 * np.abs(p - q).sum() + 1e-9
        assert js <= 0.5 * _kl(p, full_m) + 0.5 * _kl(q, full_m) + 1e-9
    # identical distributions: every divergence is 0
    same = [[1, 2], [-0.1, -2.5], [1, 2], [-0.1, -2.5]]
    assert con.execute("SELECT sparse_kl(?,?,?,?), sparse_js(?,?,?,?), sparse_tvd(?,?,?,?)", same * 3).fetchone() \
        == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)


def connect_empty():
    import duckdb

    from logitstore.query import MACROS

    con = duckdb.connect()
    for m in MACROS:
        con.execute(m)
    return con


def test_sql_command_formats(ranked_cache, capsys):
    path = str(ranked_cache.path)
    q = "SELECT seq_id, n_positions FROM sequences ORDER BY seq_id"
    assert main(["sql", path, q, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    want = sorted((s.seq_id, int(s.n_positions)) for s in logitstore.open(path))
    assert [(r["seq_id"], r["n_positions"]) for r in rows] == want
    assert main(["sql", path, q, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "seq_id,n_positions" and len(lines) == len(want) + 1
    assert main(["sql", path, "SELECT no_such_column FROM sequences"]) == 2
    assert "no_such_column" in capsys.readouterr().err


def test_tokens_view_of_an_ids_and_counts_cache(tmp_path):
    from logitstore import Codec, Sampled
    from tests.conftest import make_sequences, write_cache

    rng = np.random.default_rng(11)
    refs = make_sequences(rng, 4, vocab=120, rule=Sampled(24), max_tokens=12)
    write_cache(tmp_path / "c", refs, vocab=120, rule=Sampled(24), codec=Codec(values="none"))
    cache = logitstore.open(tmp_path / "c")
    rows = connect(cache).sql("SELECT seq_id, pos, topk_ids, topk_logprobs, sample_counts FROM tokens").fetchall()
    assert len(rows) == cache.num_positions > 0
    want = {(s.seq_id, int(p)): (s.ids[i, :s.n_entries[i]].tolist(), s.counts[i, :s.n_entries[i]].tolist())
            for s in cache for i, p in enumerate(s.pos)}
    for sid, pos, ids, lps, counts in rows:
        assert lps is None and (ids, counts) == want[(sid, pos)]
        assert sum(counts) == 24


def test_cache_sql_is_the_same_connection_as_the_views(ranked_cache):
    cache = logitstore.open(ranked_cache.path)
    n = cache.sql("SELECT count(*) FROM sequences").fetchall()[0][0]
    assert n == len(cache)
    rows = cache.sql("SELECT seq_id, sum(loss_mask::INT) FROM tokens GROUP BY seq_id").fetchall()
    assert dict(rows) == {s.seq_id: int(s.loss_mask.sum()) for s in cache if s.n_positions}


def test_sql_refuses_a_shard_whose_size_differs_and_errors_are_one_line(ranked_cache, tmp_path, capsys):
    import shutil

    from logitstore.errors import CorruptCacheError
    from tests.conftest import shard_files

    c = ranked_cache.copy_to(tmp_path / "c")
    f = shard_files(c.path)[0]
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CorruptCacheError, match="verify"):
        connect(c.path)
    assert main(["sql", str(c.path), "SELECT count(*) FROM sequences"]) == 2
    capsys.readouterr()
    good = str(ranked_cache.path)
    assert main(["sql", good, "SELECT seq_id::INTEGER FROM sequences"]) == 2  # a conversion error at fetch time
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "query failed" in err
    assert main(["sql", good, "SELECT uuid() AS u, INTERVAL 1 DAY AS d, 'x'::BLOB AS b", "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert set(row) == {"u", "d", "b"}
    shutil.rmtree(tmp_path / "c")
