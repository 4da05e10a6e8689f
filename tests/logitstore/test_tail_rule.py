"""Format version 2: the exact head + tail draws rule, tempered proposals, and version-1 caches still read.

Caches are written from the numpy reference ``logitstore.rules.sparsify`` (inverse-CDF draws over
float64 logprobs) and read back through the reader, the SQL views and ``verify``; every decoded
value is compared with the reference arrays (logprobs within the codec's bound).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import logitstore as ls
from logitstore.errors import CorruptCacheError, FormatVersionError, InvalidInputError
from logitstore.rules import Sampled, TopK, TopKTail, rule_from_dict, sparsify
from logitstore.verify import verify
from tests.conftest import CODECS, entropy, random_logprobs, read_manifest, rewrite_shard, set_column, write_manifest

V1 = Path(__file__).resolve().parents[1] / "data" / "format-v1"
VOCAB = 120


def build(path, rule, codec, n_seqs=8, seed=0):
    """A cache of random teachers; returns {seq_id: (tokens, full logprobs [N, V], entries)}."""
    rng = np.random.default_rng(seed)
    refs = {}
    with ls.CacheWriter(path, vocab_size=VOCAB, rule=rule, codec=codec, row_group_positions=40) as w:
        for _ in range(n_seqs):
            n = int(rng.integers(3, 14))
            lp = random_logprobs(rng, n - 1, VOCAB, scale=2.5)
            e = sparsify(lp, rule, rng)
            tok = rng.integers(0, VOCAB, n)
            w.add(ls.SequenceRecord(input_ids=tok, scored=ls.Scored.of(
                e, label_logprob=lp[np.arange(n - 1), tok[1:]], entropy=entropy(lp))))
            refs[ls.sequence_id(tok)] = (tok, lp, e)
    return refs


@pytest.mark.parametrize("rule", [TopKTail(5, 12), TopKTail(3, 20, 2.0), TopKTail(VOCAB, 4),
                                  TopKTail(3, 20, 2.0, systematic=True)],
                         ids=["k5-d12", "k3-d20-T2", "k=V", "k3-d20-T2-systematic"])
@pytest.mark.parametrize("codec", ["qdelta-ranked", "fp32-raw", "fp16", "fp16-scalars"])
def test_tail_draws_round_trip(tmp_path, rule, codec):
    codec = CODECS[codec]
    refs = build(tmp_path / "c", rule, codec)
    assert verify(tmp_path / "c") == []
    cache = ls.open(tmp_path / "c")
    # the oldest version that describes the cache: 3 only for systematic draws (FORMAT.md, "Versions")
    assert cache.manifest.format_version == (3 if rule.systematic else 2) and ls.FORMAT_VERSION == 3
    assert rule_from_dict(cache.manifest.rule) == rule
    bound = codec.logprob_error_bound() + 1e-6 if codec.values != "fp16" else None
    for s in cache:
        tok, lp, e = refs[s.seq_id]
        np.testing.assert_array_equal(s.n_tail, e.n_tail)
        for i in range(len(s.pos)):
            n = int(e.n_tail[i])
            np.testing.assert_array_equal(s.tail_ids[i, :n], e.tail_ids[i, :n])
            np.testing.assert_array_equal(s.tail_counts[i, :n], e.tail_counts[i, :n])
            assert (s.tail_ids[i, n:] == -1).all() and (s.tail_counts[i, n:] == 0).all()
            want = lp[i, e.tail_ids[i, :n]]  # the exact full-vocabulary logprobs of the drawn ids
            err = np.abs(s.tail_logprobs[i, :n] - want)
            assert (err <= (bound if bound is not None else 2.0**-11 * np.abs(want) + 1e-7)).all()
        if rule.tempered:
            head = np.argsort(-lp, 1)[:, :rule.k]
            rest = np.ones_like(lp, bool)
            np.put_along_axis(rest, head, False, 1)
            log_z = np.log(np.where(rest, np.exp(lp / rule.proposal_temperature), 0).sum(1))
            tol = 1e-6 if codec.scalars == "fp32" else 2.0**-10 * np.abs(log_z)
            assert (np.abs(s.proposal_log_norm - log_z) <= tol).all()
        else:
            assert s.proposal_log_norm is None


def test_the_tokens_view_has_the_tail_columns_decoded(tmp_path):
    rule = TopKTail(4, 10, 1.5)
    refs = build(tmp_path / "c", rule, ls.Codec())
    rows = ls.open(tmp_path / "c").sql("SELECT seq_id, pos, tail_ids, tail_logprobs, tail_counts, proposal_log_norm, "
                                       "typeof(tail_logprobs), typeof(tail_ids) FROM tokens").fetchall()
    assert len(rows) == sum(len(t) - 1 for t, _, _ in refs.values())
    for sid, pos, ids, lps, counts, log_z, t_lp, t_ids in rows:
        tok, lp, e = refs[sid]
        i = pos - 1
        n = int(e.n_tail[i])
        assert ids == e.tail_ids[i, :n].tolist() and counts == e.tail_counts[i, :n].tolist()
        np.testing.assert_allclose(lps, lp[i, e.tail_ids[i, :n]], atol=ls.Codec().logprob_error_bound() + 1e-6)
        assert log_z == pytest.approx(float(e.proposal_log_norm[i]), abs=1e-5)
        assert (t_lp, t_ids) == ("FLOAT[]", "INTEGER[]")


def test_caches_without_draws_show_empty_tail_lists(ranked_cache, sampled_cache):
    for c in (ranked_cache, sampled_cache):
        got = ls.open(c.path).sql("SELECT DISTINCT len(tail_ids), len(tail_logprobs), len(tail_counts), "
                                  "proposal_log_norm IS NULL FROM tokens").fetchall()
        assert got == [(0, 0, 0, True)]


def test_a_tempered_sampled_cache_round_trips(tmp_path):
    rule = Sampled(16, proposal_temperature=0.8)
    refs = build(tmp_path / "c", rule, ls.Codec(values="fp32", ids="raw"))
    assert verify(tmp_path / "c") == []
    for s in ls.open(tmp_path / "c"):
        tok, lp, e = refs[s.seq_id]
        np.testing.assert_allclose(s.proposal_log_norm, np.log(np.exp(lp / 0.8).sum(1)), atol=1e-5)
        assert s.tail_ids is None


@pytest.mark.parametrize("change, match", [
    (lambda sc: setattr(sc, "tail_ids", np.where(np.arange(sc.tail_ids.shape[1]) == 0, sc.ids[:, :1], sc.tail_ids)),
     "repeats another tail id or a head entry"),
    (lambda sc: setattr(sc, "tail_counts", sc.tail_counts * 2), "sum to tail_draws=12"),
    (lambda sc: sc.tail_logprobs.__setitem__((slice(None), 0), sc.tail_logprobs[:, 0] - 5), "sorted by logprob"),
    (lambda sc: setattr(sc, "tail_ids", None), "needs tail_ids, tail_logprobs and tail_counts"),
    (lambda sc: setattr(sc, "proposal_log_norm", np.zeros(len(sc.ids))), "proposal_log_norm is required"),
])
def test_the_writer_refuses_tail_draws_that_break_the_contract(tmp_path, change, match):
    rng = np.random.default_rng(1)
    lp = random_logprobs(rng, 6, VOCAB)
    e = sparsify(lp, TopKTail(4, 12), rng)
    sc = ls.Scored.of(e, label_logprob=lp[:, 0], entropy=entropy(lp))
    change(sc)
    with ls.CacheWriter(tmp_path / "c", vocab_size=VOCAB, rule=TopKTail(4, 12)) as w:
        with pytest.raises(InvalidInputError, match=match):
            w.add(ls.SequenceRecord(input_ids=np.arange(7), scored=sc))


def test_tail_draws_on_another_rule_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    lp = random_logprobs(rng, 6, VOCAB)
    e = sparsify(lp, TopKTail(4, 12), rng)
    with ls.CacheWriter(tmp_path / "c", vocab_size=VOCAB, rule=TopK(4)) as w:
        with pytest.raises(InvalidInputError, match="belong to rule topk_tail only"):
            w.add(ls.SequenceRecord(input_ids=np.arange(7), scored=ls.Scored.of(e, label_logprob=lp[:, 0],
                                                                                entropy=entropy(lp))))


def test_verify_finds_a_damaged_tail(tmp_path):
    build(tmp_path / "c", TopKTail(4, 12), ls.Codec(values="fp32", ids="raw"))

    def double_counts(t):
        counts = [[[c * 2 for c in pos] for pos in seq] for seq in t.column("tail_counts").to_pylist()]
        return set_column(t, "tail_counts", counts)

    rewrite_shard(tmp_path / "c", 0, double_counts)
    assert any("tail_counts" in p.message for p in verify(tmp_path / "c"))


@pytest.mark.parametrize("bad", [
    lambda: TopKTail(4, 0), lambda: TopKTail(4, -3), lambda: TopKTail(4, 70000), lambda: Sampled(8, 0, 0.0),
    lambda: TopKTail(4, 8, -1.0), lambda: TopKTail(4, 8, float("nan")), lambda: TopKTail(4, 8, float("inf")),
    lambda: TopKTail(4, 8, 1.0, 1), lambda: Sampled(8, systematic="yes"),
    lambda: rule_from_dict({"rule": "topk_tail", "k": 4, "tail_draws": 8, "design": "stratified"}),
    lambda: rule_from_dict({"rule": "topk", "k": 4, "design": "systematic"}),
])
def test_bad_rule_parameters_are_refused(bad):
    with pytest.raises(InvalidInputError):
        bad()


def test_the_design_of_the_draws_round_trips_and_is_absent_for_independent_draws():
    for rule in (TopKTail(4, 8, 2.0, systematic=True), Sampled(8, 4, 1.0, systematic=True), TopKTail(4, 8)):
        d = rule.to_dict()
        assert ("design" in d) == rule.systematic and d.get("design", "systematic") == "systematic"
        assert rule_from_dict(d) == rule


def test_values_none_needs_an_untempered_sampled_rule(tmp_path):
    for rule in (TopKTail(4, 8), Sampled(8, proposal_temperature=2.0)):
        with pytest.raises(InvalidInputError, match="only allowed under rule sample at proposal temperature 1"):
            ls.CacheWriter(tmp_path / "c", vocab_size=VOCAB, rule=rule, codec=ls.Codec(values="none"))


# ---------------------------------------------------------------- version 1 caches


@pytest.fixture
def v1(tmp_path):
    shutil.copytree(V1, tmp_path / "v1")
    return tmp_path / "v1"


@pytest.mark.parametrize("name", ["topk", "sample"])
def test_a_version_1_cache_reads_exactly_as_it_was_written(v1, name):
    ref = json.loads((v1 / "reference.json").read_text())[name]
    cache = ls.open(v1 / name)
    assert cache.manifest.format_version == 1 and verify(v1 / name) == []
    by_tokens = {tuple(s.input_ids.tolist()): s for s in cache}
    assert len(by_tokens) == len(ref) == 6
    bound = cache.codec.logprob_error_bound() + 1e-6
    for r in ref:
        s = by_tokens[tuple(r["input_ids"])]
        lp = np.array(r["logprobs"])
        np.testing.assert_allclose(s.label_logprob, lp[np.arange(len(lp)), r["input_ids"][1:]], atol=1e-6)
        np.testing.assert_allclose(s.entropy, entropy(lp), atol=1e-5)
        valid = np.isfinite(s.logprobs)
        got = np.take_along_axis(lp, np.where(valid, s.ids, 0), 1)
        assert (np.abs(np.where(valid, s.logprobs - got, 0)) <= bound).all()
        assert s.tail_ids is None and s.proposal_log_norm is None
    assert cache.sql("SELECT count(*), sum(len(tail_ids)) FROM tokens").fetchall() == [(6 * 8, 0)]


def test_a_version_1_cache_is_not_resumed_by_this_writer(v1):
    with pytest.raises(FormatVersionError, match="format_version 1 cache and this logitstore writes version 2 "):
        with ls.CacheWriter(v1 / "topk", vocab_size=64, rule=TopK(6), resume=True,
                            teacher={"id": "tiny-random", "revision": "r1", "dtype": "fp32"},
                            tokenizer={"name": "none", "fingerprint": "", "vocab_size": 64}):
            pass


def test_an_unknown_version_is_refused_by_name(v1):
    m = json.loads((v1 / "topk" / "manifest.json").read_text())
    m["format_version"] = 4
    (v1 / "topk" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatVersionError, match="format_version 4 is not readable.*upgrade logitstore"):
        ls.open(v1 / "topk")


def test_a_systematic_cache_is_refused_by_a_reader_that_predates_it(tmp_path, monkeypatch):
    """Version 3 (systematic draws) is refused by name where only versions 1 and 2 are read, never misread as
    independent draws; a version 2 cache is still resumed and a version 3 one resumed as version 3."""
    import logitstore.manifest as M

    build(tmp_path / "s", TopKTail(3, 12, 2.0, systematic=True), ls.Codec())
    build(tmp_path / "i", TopKTail(3, 12, 2.0), ls.Codec())
    monkeypatch.setattr(M, "READABLE_VERSIONS", (1, 2))
    monkeypatch.setattr(M, "FORMAT_VERSION", 2)
    with pytest.raises(FormatVersionError, match="format_version 3 is not readable.*upgrade logitstore"):
        ls.open(tmp_path / "s")
    assert ls.open(tmp_path / "i").manifest.format_version == 2
    monkeypatch.undo()
    for name, rule in (("s", TopKTail(3, 12, 2.0, systematic=True)), ("i", TopKTail(3, 12, 2.0))):
        with ls.CacheWriter(tmp_path / name, vocab_size=VOCAB, rule=rule, codec=ls.Codec(), resume=True) as w:
            assert w.manifest.format_version == (3 if rule.systematic else 2)
    # a version 2 manifest that claims systematic draws was made by no writer: refused as damaged, not read
    m = read_manifest(tmp_path / "s")
    m["format_version"] = 2
    write_manifest(tmp_path / "s", m)
    with pytest.raises(CorruptCacheError, match="format_version is 2, expected 3 or later"):
        ls.open(tmp_path / "s")


def test_materializing_a_selection_keeps_the_tail_draws(tmp_path):
    from logitstore.subset import make_selection, materialize

    build(tmp_path / "c", TopKTail(4, 12, 2.0), ls.Codec())
    sel = make_selection(tmp_path / "c", where="n_tokens > 6")
    m = materialize(sel, tmp_path / "m")
    assert m.sequences == len(sel.seq_ids) > 0 and verify(tmp_path / "m") == []
    src = {s.seq_id: s for s in ls.open(tmp_path / "c")}
    for s in ls.open(tmp_path / "m"):
        a = src[s.seq_id]
        u = s.tail_ids.shape[1]
        np.testing.assert_array_equal(s.tail_ids, a.tail_ids[:, :u])
        np.testing.assert_array_equal(s.tail_counts, a.tail_counts[:, :u])
        np.testing.assert_array_equal(s.tail_logprobs, a.tail_logprobs[:, :u])
        np.testing.assert_array_equal(s.proposal_log_norm, a.proposal_log_norm)
