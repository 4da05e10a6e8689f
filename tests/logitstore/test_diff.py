"""logitstore diff against a plain per-position computation; the numpy divergences equal the SQL macros."""

import json
import shutil

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

import logitstore
from logitstore.divergence import divergences
from logitstore.query import connect
from tests.conftest import make_sequences, random_logprobs, write_cache
from tools.cli import main


def plain(ids_p, lp_p, ids_q, lp_q):
    """Coarse-grained KL/JS/TVD of one position, with dicts and loops."""
    dp = {int(i): float(np.exp(x)) for i, x in zip(ids_p, lp_p) if i >= 0}
    dq = {int(i): float(np.exp(x)) for i, x in zip(ids_q, lp_q) if i >= 0}
    shared = sorted(set(dp) & set(dq))
    p = [dp[i] for i in shared] + [max(0.0, 1 - sum(dp[i] for i in shared))]
    q = [dq[i] for i in shared] + [max(0.0, 1 - sum(dq[i] for i in shared))]
    kl = lambda a, b: sum(x * np.log(x / max(y, 1e-12)) for x, y in zip(a, b) if x > 0)  # noqa: E731
    m = [(x + y) / 2 for x, y in zip(p, q)]
    return kl(p, q), kl(q, p), 0.5 * kl(p, m) + 0.5 * kl(q, m), 0.5 * sum(abs(x - y) for x, y in zip(p, q))


def two_teachers(tmp_path, rule_b=logitstore.TopK(6)):
    """The same token sequences, scored by two different random 'teachers'."""
    rng = np.random.default_rng(4)
    refs_a = make_sequences(rng, 8, vocab=80, rule=logitstore.TopK(6), max_tokens=14, min_tokens=2)
    refs_b = []
    for r in refs_a:
        lp = random_logprobs(rng, len(r.input_ids) - 1, 80)
        e = logitstore.sparsify(lp, rule_b)
        refs_b.append((r.seq_id, r.input_ids, e, lp))
    write_cache(tmp_path / "a", refs_a, vocab=80, rule=logitstore.TopK(6), codec=logitstore.Codec(values="fp32"))
    with logitstore.CacheWriter(tmp_path / "b", vocab_size=80, rule=rule_b, codec=logitstore.Codec(values="fp32")) as w:
        for sid, tok, e, lp in refs_b:
            w.add(logitstore.SequenceRecord(seq_id=sid, input_ids=tok, scored=logitstore.Scored.of(
                e, label_logprob=lp[np.arange(len(lp)), tok[1:]], entropy=-(np.exp(lp) * lp).sum(1))))
    return tmp_path / "a", tmp_path / "b"


def test_diff_equals_a_plain_computation(tmp_path):
    a, b = two_teachers(tmp_path, rule_b=logitstore.MassTopK(0.8, 10))
    assert main(["diff", str(a), str(b), "-o", str(tmp_path / "d"), "-q"]) == 0
    pos = pq.read_table(tmp_path / "d" / "positions.parquet").to_pylist()
    sa = {s.seq_id: s for s in logitstore.open(a)}
    sb = {s.seq_id: s for s in logitstore.open(b)}
    assert len(pos) == sum(len(s.pos) for s in sa.values())
    for row in pos:
        x, y = sa[row["seq_id"]], sb[row["seq_id"]]
        i = int(np.flatnonzero(x.pos == row["pos"])[0])
        kl_ab, kl_ba, js, tvd = plain(x.ids[i], x.logprobs[i], y.ids[i], y.logprobs[i])
        assert (row["kl_ab"], row["kl_ba"], row["js"], row["tvd"]) == pytest.approx((kl_ab, kl_ba, js, tvd), abs=1e-5)
        assert row["top1_agree"] == (x.ids[i, 0] == y.ids[i, 0])
    seqs = pq.read_table(tmp_path / "d" / "sequences.parquet").to_pylist()
    for row in seqs:
        mine = [r for r in pos if r["seq_id"] == row["seq_id"]]
        assert row["js"] == pytest.approx(np.mean([r["js"] for r in mine]), abs=1e-6)
        assert row["top1_agreement"] == pytest.approx(np.mean([r["top1_agree"] for r in mine]))
    meta = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert meta["sequences"] == len(sa) and meta["only_in_a"] == 0
    # queryable together with the caches
    con = connect(a)
    n = con.execute(f"SELECT count(*) FROM tokens t JOIN read_parquet('{tmp_path / 'd' / 'positions.parquet'}') d "
                    "USING (seq_id, pos)").fetchone()[0]
    assert n == len(pos)


def test_a_cache_against_itself_has_zero_divergence(tmp_path):
    a, _ = two_teachers(tmp_path)
    assert main(["diff", str(a), str(a), "-o", str(tmp_path / "d"), "-q"]) == 0
    t = pq.read_table(tmp_path / "d" / "positions.parquet")
    for c in ("kl_ab", "kl_ba", "js", "tvd"):
        assert np.abs(t.column(c).to_numpy()).max() < 1e-6
    assert all(t.column("top1_agree").to_pylist())


def test_numpy_divergences_equal_the_sql_macros():
    rng = np.random.default_rng(9)
    ids_p = np.stack([rng.permutation(30)[:7] for _ in range(20)])
    ids_q = np.stack([rng.permutation(30)[:5] for _ in range(20)])
    lp_p = np.sort(np.log(rng.dirichlet(np.ones(30), 20))[:, :7], -1)[:, ::-1]
    lp_q = np.sort(np.log(rng.dirichlet(np.ones(30), 20))[:, :5], -1)[:, ::-1]
    d = divergences(ids_p, lp_p, np.pad(ids_q, ((0, 0), (0, 2)), constant_values=-1),
                    np.pad(lp_q, ((0, 0), (0, 2)), constant_values=-np.inf))
    con = duckdb.connect()
    from logitstore.query import MACROS

    for m in MACROS:
        con.execute(m)
    for i in range(20):
        args = [ids_p[i].tolist(), lp_p[i].tolist(), ids_q[i].tolist(), lp_q[i].tolist()]
        kl, js, tvd = con.execute("SELECT sparse_kl(?,?,?,?), sparse_js(?,?,?,?), sparse_tvd(?,?,?,?)",
                                  args * 3).fetchone()
        assert (d["kl_pq"][i], d["js"][i], d["tvd"][i]) == pytest.approx((kl, js, tvd), abs=1e-9)


def test_diff_refuses_unrelated_or_mismatched_caches(tmp_path):
    a, b = two_teachers(tmp_path)
    rng = np.random.default_rng(5)
    write_cache(tmp_path / "other", make_sequences(rng, 3, vocab=80, rule=logitstore.TopK(6), max_tokens=9),
                vocab=80, rule=logitstore.TopK(6))
    # same ids, other tokens
    assert main(["diff", str(a), str(tmp_path / "other"), "-o", str(tmp_path / "d1"), "-q"]) == 2
    write_cache(tmp_path / "v", make_sequences(rng, 2, vocab=90, rule=logitstore.TopK(6), max_tokens=9),
                vocab=90, rule=logitstore.TopK(6))
    assert main(["diff", str(a), str(tmp_path / "v"), "-o", str(tmp_path / "d2"), "-q"]) == 2  # other vocabulary
    shutil.copytree(a, tmp_path / "d3")
    assert main(["diff", str(a), str(b), "-o", str(tmp_path / "d3"), "-q"]) == 2  # output exists
