"""The policy's per-position fields (format version 2, caches built with --responses-from): written, read back,
shown by SQL, checked by the writer and by verify, carried by a materialized selection; absent elsewhere.

Every cache here is written from a random float64 teacher and a random float64 policy (references of
tests/conftest.py); what is read back is compared with those references, never with the code's own output.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import logitstore as ls
from logitstore.errors import CorruptCacheError, InvalidInputError
from logitstore.rules import TopK, sparsify
from logitstore.subset import make_selection, materialize
from logitstore.verify import verify
from tests.conftest import CODECS, entropy, random_logprobs, read_manifest, rewrite_shard, set_column, write_manifest

V1 = Path(__file__).resolve().parents[1] / "data" / "format-v1"
VOCAB = 90


def build(path, codec=CODECS["qdelta-ranked"], n_seqs=7, seed=0, policy=True):
    """A cache of random teachers and policies; returns {seq_id: (tokens, teacher lp [N, V], policy lp [N, V])}."""
    rng = np.random.default_rng(seed)
    refs = {}
    with ls.CacheWriter(path, vocab_size=VOCAB, rule=TopK(6), codec=codec, row_group_positions=30,
                        policy=policy) as w:
        for _ in range(n_seqs):
            n = int(rng.integers(2, 12))
            lp, plp = random_logprobs(rng, n - 1, VOCAB), random_logprobs(rng, n - 1, VOCAB, scale=1.5)
            tok = rng.integers(0, VOCAB, n)
            rows = np.arange(n - 1)
            extra = dict(policy_logprob=plp[rows, tok[1:]], policy_entropy=entropy(plp)) if policy else {}
            w.add(ls.SequenceRecord(input_ids=tok, scored=ls.Scored.of(
                sparsify(lp, TopK(6)), label_logprob=lp[rows, tok[1:]], entropy=entropy(lp)), **extra))
            refs[ls.sequence_id(tok)] = (tok, lp, plp)
    return refs


def close(got, want, codec):
    """Per-position floats: exact float32 (scalars fp32) or within fp16's relative 2^-11."""
    want = np.asarray(want, np.float64)
    if codec.scalars == "fp32":
        np.testing.assert_array_equal(np.asarray(got, np.float32), want.astype(np.float32))
    else:
        assert (np.abs(np.asarray(got, np.float64) - want) <= 2.0**-11 * np.abs(want) + 6e-8).all()


@pytest.mark.parametrize("codec", ["qdelta-ranked", "fp32-raw", "fp16-scalars"])
def test_policy_fields_round_trip(tmp_path, codec):
    codec = CODECS[codec]
    refs = build(tmp_path / "c", codec)
    assert verify(tmp_path / "c") == []
    cache = ls.open(tmp_path / "c")
    word = "exact" if codec.scalars == "fp32" else "quantised"
    assert cache.policy and cache.manifest.exactness["policy_logprob"] == cache.manifest.exactness["policy_entropy"] \
        == word
    for seq in cache:
        tok, lp, plp = refs[seq.seq_id]
        rows = np.arange(len(tok) - 1)
        close(seq.policy_logprob, plp[rows, tok[1:]], codec)
        close(seq.policy_entropy, entropy(plp), codec)
        close(seq.label_logprob, lp[rows, tok[1:]], codec)  # the teacher's column is the teacher's, not the policy's
    got = cache.sql("SELECT seq_id, pos, policy_logprob, policy_entropy FROM tokens").fetchall()
    assert len(got) == sum(len(t) - 1 for t, _, _ in refs.values())
    for sid, pos, p_lp, p_ent in got:
        tok, _, plp = refs[sid]
        assert abs(p_lp - plp[pos - 1, tok[pos]]) <= 2.0**-11 * abs(plp[pos - 1, tok[pos]]) + 1e-6
        assert abs(p_ent - entropy(plp[pos - 1])) <= 2.0**-11 * entropy(plp[pos - 1]) + 1e-6


def test_the_per_token_reverse_kl_estimate_is_one_query(tmp_path):
    refs = build(tmp_path / "c", CODECS["fp32-raw"])
    want = np.mean(np.concatenate([plp[np.arange(len(t) - 1), t[1:]] - lp[np.arange(len(t) - 1), t[1:]]
                                   for t, lp, plp in refs.values()]))
    got = ls.open(tmp_path / "c").sql("SELECT avg(policy_logprob - label_logprob) FROM tokens WHERE loss_mask")
    assert got.fetchall()[0][0] == pytest.approx(want, rel=1e-5)


def test_caches_without_a_policy_have_no_columns_and_null_views(tmp_path, ranked_cache):
    build(tmp_path / "c", policy=False)
    for path in (tmp_path / "c", ranked_cache.path):
        cache = ls.open(path)
        assert not cache.policy and "policy_logprob" not in cache.schema.names
        assert "policy_logprob" not in cache.manifest.exactness
        assert next(iter(cache)).policy_logprob is None
        assert cache.sql("SELECT count(*) FROM tokens WHERE policy_logprob IS NOT NULL OR policy_entropy IS NOT "
                         "NULL").fetchall() == [(0,)]


@pytest.mark.parametrize("name", ["topk", "sample"])
def test_a_version_1_cache_reads_with_null_policy_columns(tmp_path, name):
    shutil.copytree(V1, tmp_path / "v1")
    cache = ls.open(tmp_path / "v1" / name)
    assert cache.manifest.format_version == 1 and not cache.policy
    assert cache.sql("SELECT count(*), count(policy_logprob) FROM tokens").fetchall()[0][1] == 0
    assert verify(tmp_path / "v1" / name) == []


@pytest.mark.parametrize("case,match", [
    ("missing", "policy_logprob and policy_entropy are required"),
    ("one", "policy_logprob and policy_entropy are required"),
    ("short", "policy_entropy has 2 values for 3 positions"),
    ("positive", "policy_logprob must be finite and <= 0"),
    ("nan", "policy_logprob must be finite"),
    ("negative_entropy", "policy_entropy must be finite and >= 0"),
])
def test_the_writer_refuses_bad_policy_values(tmp_path, case, match):
    rng = np.random.default_rng(3)
    lp = random_logprobs(rng, 3, VOCAB)
    tok = rng.integers(0, VOCAB, 4)
    p_lp, p_ent = np.full(3, -1.0), np.full(3, 2.0)
    kw = {"missing": {}, "one": {"policy_logprob": p_lp},
          "short": {"policy_logprob": p_lp, "policy_entropy": p_ent[:2]},
          "positive": {"policy_logprob": p_lp + 2, "policy_entropy": p_ent},
          "nan": {"policy_logprob": np.r_[p_lp[:2], np.nan], "policy_entropy": p_ent},
          "negative_entropy": {"policy_logprob": p_lp, "policy_entropy": -p_ent}}[case]
    with ls.CacheWriter(tmp_path / "c", vocab_size=VOCAB, rule=TopK(4), policy=True) as w:
        with pytest.raises(InvalidInputError, match=match):
            w.add(ls.SequenceRecord(input_ids=tok, scored=ls.Scored.of(
                sparsify(lp, TopK(4)), label_logprob=lp[np.arange(3), tok[1:]], entropy=entropy(lp)), **kw))


def test_policy_values_in_a_cache_without_a_policy_are_refused(tmp_path):
    rng = np.random.default_rng(4)
    lp, tok = random_logprobs(rng, 2, VOCAB), rng.integers(0, VOCAB, 3)
    with ls.CacheWriter(tmp_path / "c", vocab_size=VOCAB, rule=TopK(4)) as w:
        with pytest.raises(InvalidInputError, match="belong to a cache whose responses come from a policy"):
            w.add(ls.SequenceRecord(input_ids=tok, scored=ls.Scored.of(
                sparsify(lp, TopK(4)), label_logprob=lp[np.arange(2), tok[1:]], entropy=entropy(lp)),
                policy_logprob=np.zeros(2) - 1, policy_entropy=np.ones(2)))


def test_resuming_with_or_without_a_policy_is_refused(tmp_path):
    build(tmp_path / "c")
    with pytest.raises(InvalidInputError, match="policy fields: cache has them"):
        ls.CacheWriter(tmp_path / "c", vocab_size=VOCAB, rule=TopK(6), resume=True).open()
    build(tmp_path / "d", policy=False)
    with pytest.raises(InvalidInputError, match="policy fields: cache has none"):
        ls.CacheWriter(tmp_path / "d", vocab_size=VOCAB, rule=TopK(6), resume=True, policy=True).open()


def test_verify_finds_damaged_policy_values(tmp_path):
    build(tmp_path / "c", CODECS["fp32-raw"])

    def edit(t):
        vals = t.column("policy_logprob").to_pylist()
        vals[0] = [0.5] + vals[0][1:]
        ent = t.column("policy_entropy").to_pylist()
        ent[1] = [-1.0] + ent[1][1:]
        return set_column(set_column(t, "policy_logprob", vals), "policy_entropy", ent)

    rewrite_shard(tmp_path / "c", 0, edit)
    msgs = " ".join(p.message for p in verify(tmp_path / "c"))
    assert "policy_logprob must be finite and <= 0" in msgs and "policy_entropy outside" in msgs


def test_a_manifest_listing_one_policy_field_is_refused(tmp_path):
    build(tmp_path / "c")
    m = read_manifest(tmp_path / "c")
    del m["exactness"]["policy_entropy"]
    write_manifest(tmp_path / "c", m)
    with pytest.raises(CorruptCacheError, match="both or neither of policy_logprob, policy_entropy"):
        ls.open(tmp_path / "c")


def test_a_materialized_selection_keeps_the_policy_values(tmp_path):
    refs = build(tmp_path / "c", CODECS["fp32-raw"])
    sel = make_selection(tmp_path / "c", where="n_tokens > 4")
    m = materialize(sel, tmp_path / "m")
    assert m.has_policy and verify(tmp_path / "m") == []
    for seq in ls.open(tmp_path / "m"):
        tok, _, plp = refs[seq.seq_id]
        close(seq.policy_logprob, plp[np.arange(len(tok) - 1), tok[1:]], CODECS["fp32-raw"])
