"""logitstore merge against a plain numpy mixture of the teachers' full distributions; refusals; routing."""

from __future__ import annotations

import math

import numpy as np
import pytest

import logitstore
from logitstore.merge import merge as merge_caches
from logitstore.verify import verify
from tests.conftest import random_logprobs
from tools.cli import main

V = 40
FP32 = logitstore.Codec(values="fp32", ids="raw")


def full_teachers(rng, n_teachers: int, lengths: list[int], vocab: int = V):
    """Token sequences and, per teacher, full [T-1, V] float64 logprobs of each."""
    toks = [rng.integers(0, vocab, size=t) for t in lengths]
    return toks, [[random_logprobs(rng, t - 1, vocab, scale=2.0) for t in lengths] for _ in range(n_teachers)]


def write_teacher(path, toks, lps, rule, *, vocab: int = V, codec=FP32, correct=None, tokenizer=None, keep=None):
    """A cache of one teacher: the rule's entries of its full distributions (``logitstore.sparsify``, the reference)."""
    with logitstore.CacheWriter(path, vocab_size=vocab, rule=rule, codec=codec,
                                tokenizer=tokenizer or {"name": "toy", "fingerprint": "f0", "vocab_size": vocab}) as w:
        for j, (tok, lp) in enumerate(zip(toks, lps)):
            if keep is not None and j not in keep:
                continue
            e = logitstore.sparsify(lp, rule)
            w.add(logitstore.SequenceRecord(input_ids=tok, correct=None if correct is None else correct[j],
                                            scored=logitstore.Scored.of(
                                                e, label_logprob=lp[np.arange(len(lp)), tok[1:]],
                                                entropy=-(np.exp(lp) * lp).sum(1))))
    return path


def dense(seq, vocab: int = V) -> np.ndarray:
    """A decoded sequence's entries as a dense [N, V] probability matrix (0 off the entries)."""
    out = np.zeros((len(seq.pos), vocab))
    for i in range(len(seq.pos)):
        n = seq.n_entries[i]
        out[i, seq.ids[i, :n]] = np.exp(seq.logprobs[i, :n].astype(np.float64))
    return out


@pytest.mark.parametrize("weights", [(1.0, 1.0), (3.0, 1.0)])
def test_full_support_merge_is_the_exact_mixture(tmp_path, weights):
    """k = V: every id is in every support, so the merged entries are the mixture itself."""
    rng = np.random.default_rng(0)
    toks, (lp_a, lp_b) = full_teachers(rng, 2, [7, 12, 3])
    a = write_teacher(tmp_path / "a", toks, lp_a, logitstore.TopK(V))
    b = write_teacher(tmp_path / "b", toks, lp_b, logitstore.TopK(V))
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "m"), "--weights", ",".join(map(str, weights)),
                 "-q"]) == 0
    w = np.array(weights) / sum(weights)
    merged = {s.seq_id: s for s in logitstore.open(tmp_path / "m")}
    assert len(merged) == 3
    for tok, la, lb in zip(toks, lp_a, lp_b):
        s = merged[logitstore.sequence_id(tok)]
        mix = w[0] * np.exp(la) + w[1] * np.exp(lb)
        np.testing.assert_allclose(dense(s), mix, atol=2e-6)
        np.testing.assert_allclose(s.label_logprob, np.log(mix[np.arange(len(mix)), tok[1:]]), atol=2e-6)
        true_h = -(mix * np.log(mix)).sum(1)
        bound = np.minimum(w[0] * -(np.exp(la) * la).sum(1) + w[1] * -(np.exp(lb) * lb).sum(1)
                           - (w * np.log(w)).sum(), math.log(V))
        np.testing.assert_allclose(s.entropy, bound, rtol=1e-5)
        assert (s.entropy >= true_h - 1e-5).all()
        assert (s.tail_mass < 1e-5).all()
    assert verify(tmp_path / "m") == []


def test_systematic_sampled_caches_merge_by_their_certain_heads(tmp_path):
    """Two caches of the build default's kind (systematic draws): each contributes the ids of p >= 1/D (drawn
    whatever the offset), so the merged entries are, per id of either head, the mixture's known part
    ``sum_i w_i p_i(x) [x in head_i]``, and the tail the exact rest; a position where no id is certain (a flat
    teacher) keeps one drawn id. Against the numpy mixture of the full distributions."""
    rng = np.random.default_rng(3)
    D = 16
    toks, (lp_a, lp_b) = full_teachers(rng, 2, [9, 14, 5])
    lp_a[1][2] = np.log(np.full(V, 1.0 / V))  # flat: no id reaches 1/16
    rule = logitstore.Sampled(D, systematic=True)
    a = write_teacher(tmp_path / "a", toks, lp_a, rule)
    b = write_teacher(tmp_path / "b", toks, lp_b, rule)
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "m"), "--weights", "3,1", "-q"]) == 0
    w = np.array([0.75, 0.25])
    merged = {s.seq_id: s for s in logitstore.open(tmp_path / "m")}
    assert logitstore.open(tmp_path / "m").manifest.rule == {"rule": "topk", "k": D}
    flat = 0
    for tok, la, lb in zip(toks, lp_a, lp_b):
        s = merged[logitstore.sequence_id(tok)]
        pa, pb = np.exp(la), np.exp(lb)
        for t in range(len(tok) - 1):
            ha, hb = pa[t] >= 1.0 / D, pb[t] >= 1.0 / D
            got = dense(s)[t]
            if not ha.any():  # one of teacher a's drawn ids (all equally likely) stands for its head
                flat += 1
                (x,) = set(np.flatnonzero(got)) - set(np.flatnonzero(hb)) or {int(np.argmax(got))}
                assert pa[t, x] == pytest.approx(1.0 / V)
                ha = np.arange(V) == x
            want = w[0] * pa[t] * ha + w[1] * pb[t] * hb
            assert (ha | hb).sum() <= D
            np.testing.assert_allclose(got, want, atol=2e-6)
            assert s.tail_mass[t] == pytest.approx(1.0 - want.sum(), abs=2e-6)
            assert s.label_logprob[t] == pytest.approx(math.log(w[0] * pa[t, tok[t + 1]] + w[1] * pb[t, tok[t + 1]]),
                                                       abs=2e-6)
    assert flat == 1 and verify(tmp_path / "m") == []
    independent = write_teacher(tmp_path / "i", toks, lp_b, logitstore.Sampled(D))
    assert main(["merge", str(a), str(independent), "-o", str(tmp_path / "x"), "-q"]) == 2
    assert not (tmp_path / "x").exists()


def test_topk_merge_keeps_the_known_part_and_the_tail_as_mass(tmp_path):
    rng = np.random.default_rng(1)
    toks, (lp_a, lp_b) = full_teachers(rng, 2, [9, 15])
    a = write_teacher(tmp_path / "a", toks, lp_a, logitstore.TopK(5))
    b = write_teacher(tmp_path / "b", toks, lp_b, logitstore.TopK(3))
    rec = merge_caches([a, b], tmp_path / "m", weights=[1, 1])
    m = logitstore.open(tmp_path / "m")
    assert m.manifest.rule == {"rule": "topk", "k": 5} == rec["rule"]
    assert m.manifest.exactness["entropy"] == "bound" and m.manifest.exactness["topk_logprobs"] == "bound"
    assert m.manifest.exactness["label_logprob"] == "exact" and m.manifest.exactness["tail_mass"] == "exact"
    for tok, la, lb in zip(toks, lp_a, lp_b):
        s = m[logitstore.sequence_id(tok)]
        for i in range(len(tok) - 1):
            known: dict[int, float] = {}  # per teacher, only the ids its own top-k stored
            for lp, k in ((la[i], 5), (lb[i], 3)):
                for t in np.argsort(-lp, kind="stable")[:k]:
                    known[int(t)] = known.get(int(t), 0.0) + 0.5 * math.exp(lp[t])
            top = sorted(known.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
            n = s.n_entries[i]
            assert [int(x) for x in s.ids[i, :n]] == [t for t, _ in top]
            np.testing.assert_allclose(np.exp(s.logprobs[i, :n]), [v for _, v in top], rtol=1e-5)
            mix = 0.5 * np.exp(la[i]) + 0.5 * np.exp(lb[i])
            assert (np.exp(s.logprobs[i, :n]) <= mix[s.ids[i, :n]] + 1e-6).all()  # a lower bound of the mixture
            assert s.tail_mass[i] == pytest.approx(1 - sum(v for _, v in top), abs=1e-6)
            assert s.label_logprob[i] == pytest.approx(math.log(mix[tok[i + 1]]), abs=1e-6)
    assert verify(tmp_path / "m") == []


def test_quantised_inputs_merge_within_the_stated_bound(tmp_path):
    rng = np.random.default_rng(2)
    toks, (lp_a, lp_b) = full_teachers(rng, 2, [20])
    a = write_teacher(tmp_path / "a", toks, lp_a, logitstore.TopK(V), codec=logitstore.Codec())
    b = write_teacher(tmp_path / "b", toks, lp_b, logitstore.TopK(V), codec=logitstore.Codec())
    merge_caches([a, b], tmp_path / "m")
    s = next(iter(logitstore.open(tmp_path / "m")))
    mix = 0.5 * np.exp(lp_a[0]) + 0.5 * np.exp(lp_b[0])
    step = logitstore.Codec().logprob_step
    got = np.take_along_axis(np.log(mix), s.ids.astype(np.int64), 1)
    err = np.abs(s.logprobs - got)[np.isfinite(s.logprobs)]
    assert err.max() <= 1.5 * step + 1e-5  # 2 e_in + e_out, e = step / 2 (module docstring)
    assert verify(tmp_path / "m") == []


def test_missing_sequences_kept_or_dropped_and_counted(tmp_path):
    rng = np.random.default_rng(3)
    toks, (lp_a, lp_b) = full_teachers(rng, 2, [6, 8, 10])
    a = write_teacher(tmp_path / "a", toks, lp_a, logitstore.TopK(4))
    b = write_teacher(tmp_path / "b", toks, lp_b, logitstore.TopK(4), keep={0, 1})
    kept = merge_caches([a, b], tmp_path / "keep", missing="keep")
    assert (kept["in_all"], kept["partial_kept"], kept["sequences"]) == (2, 1, 3)
    only_a = logitstore.open(tmp_path / "keep")[logitstore.sequence_id(toks[2])]
    ref = logitstore.open(a)[logitstore.sequence_id(toks[2])]  # kept with its one teacher: a's values
    np.testing.assert_array_equal(only_a.ids, ref.ids)
    np.testing.assert_allclose(only_a.logprobs, ref.logprobs, atol=1e-6)
    dropped = merge_caches([a, b], tmp_path / "drop", missing="drop")
    assert (dropped["partial_dropped"], dropped["sequences"]) == (1, 2)
    assert logitstore.open(tmp_path / "drop").manifest.build["merge"]["partial_dropped"] == 1


def test_correct_routing_and_agreement_mask(tmp_path):
    rng = np.random.default_rng(4)
    toks, (lp_a, lp_b) = full_teachers(rng, 2, [6, 8, 10])
    a = write_teacher(tmp_path / "a", toks, lp_a, logitstore.TopK(4), correct=[True, False, None])
    b = write_teacher(tmp_path / "b", toks, lp_b, logitstore.TopK(4), correct=[True, True, False])
    rec = merge_caches([a, b], tmp_path / "c", how="correct")
    assert (rec["sequences"], rec["not_correct"]) == (2, 1)
    c = logitstore.open(tmp_path / "c")
    routed = c[logitstore.sequence_id(toks[1])]  # only b accepted it: b's distribution alone
    np.testing.assert_allclose(dense(routed), dense(logitstore.open(b)[routed.seq_id]), atol=1e-6)
    assert routed.correct is True
    both = c[logitstore.sequence_id(toks[0])]
    mix = 0.5 * np.exp(lp_a[0]) + 0.5 * np.exp(lp_b[0])
    np.testing.assert_allclose(both.label_logprob, np.log(mix[np.arange(5), toks[0][1:]]), atol=1e-6)
    merge_caches([a, b], tmp_path / "g", how="agreement")
    for tok, la, lb in zip(toks, lp_a, lp_b):
        g = logitstore.open(tmp_path / "g")[logitstore.sequence_id(tok)]
        np.testing.assert_array_equal(g.loss_mask, la.argmax(1) == lb.argmax(1))


def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    rng = np.random.default_rng(5)
    toks, (lp_a, lp_b) = full_teachers(rng, 2, [6, 8])
    a = write_teacher(tmp_path / "a", toks, lp_a, logitstore.TopK(4))
    b = write_teacher(tmp_path / "b", toks, lp_b, logitstore.TopK(4))
    t2, (lp_v,) = full_teachers(rng, 1, [6], vocab=50)
    other_vocab = write_teacher(tmp_path / "v", t2, lp_v, logitstore.TopK(4), vocab=50)
    other_tok = write_teacher(tmp_path / "t", toks, lp_b, logitstore.TopK(4),
                              tokenizer={"name": "x", "fingerprint": "f1", "vocab_size": V})
    sampled = write_teacher(tmp_path / "s", toks, lp_b, logitstore.Sampled(8))
    t3, (lp_u,) = full_teachers(rng, 1, [5])
    unrelated = write_teacher(tmp_path / "u", t3, lp_u, logitstore.TopK(4))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [([str(a)], "at least 2"), ([str(a), str(other_vocab)], "one tokenizer"),
             ([str(a), str(other_tok)], "one tokenizer"), ([str(a), str(sampled)], "exact entries"),
             ([str(a), str(b), "--weights", "1"], "one positive number"), ([str(a), str(b), "--weights", "1,-1"],
                                                                          "one positive number"),
             ([str(a), str(unrelated)], "share no seq_id")]
    for i, (argv, words) in enumerate(cases):
        out = tmp_path / f"o{i}"
        assert main(["merge", *argv, "-o", str(out), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err, (argv, err)
        assert not out.exists()
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "full"), "-q"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["x"]
