"""A cache gathered from parts (``logitstore.parts``), against the reference sequences written into them,
and the ``exactness`` table of the query layer."""

import numpy as np
import pytest

import logitstore
from logitstore import Codec, MassTopK, TopK
from logitstore.errors import InvalidInputError
from logitstore.parts import commit_parts, part_name
from logitstore.verify import verify
from tests.conftest import assert_sequence_matches, make_sequences, write_cache

V = 300


def _parts(tmp_path, rule=TopK(6), counts=None, shard_bytes=2000):
    rng = np.random.default_rng(0)
    seqs = make_sequences(rng, 30, vocab=V, rule=rule, max_tokens=30, min_tokens=2)
    counts = np.arange(V)[::-1] if counts is None else counts  # one id ranking for every part
    cache = tmp_path / "c"
    for b, chunk in enumerate((seqs[:12], seqs[12:20], seqs[20:])):
        write_cache(cache / part_name(b), chunk, vocab=V, rule=rule, id_counts=counts, shard_bytes=shard_bytes,
                    row_group_positions=40)
    return cache, seqs


def test_gathered_parts_read_as_one_cache(tmp_path):
    cache, seqs = _parts(tmp_path)
    m = commit_parts(cache, build={"note": "test"}, duplicates_skipped=3, complete=True)
    assert m.complete and m.duplicates_skipped == 3 and m.sequences == 30
    assert len({s.file.split("/shards/")[0] for s in m.shards}) == 3
    assert max(m.shard_numbers()) >= 1 and m.shard_numbers().count(0) == 3  # numbered within each part
    assert verify(cache) == []
    c = logitstore.open(cache)
    got = {s.seq_id: s for s in c.iter_sequences()}
    assert list(got) == [s.seq_id for s in seqs]  # part order, then each part's order
    for ref in seqs:
        assert_sequence_matches(got[ref.seq_id], ref, Codec(), TopK(6), 6)
    assert c.sql("SELECT count(*) FROM tokens").fetchall()[0][0] == sum(len(s.positions) for s in seqs)


def test_parts_that_disagree_are_refused(tmp_path):
    cache, _ = _parts(tmp_path)
    rng = np.random.default_rng(1)
    write_cache(cache / part_name(7), make_sequences(rng, 3, vocab=V, rule=MassTopK(0.5, 6)), vocab=V,
                rule=MassTopK(0.5, 6), id_counts=np.arange(V)[::-1])
    with pytest.raises(InvalidInputError, match="block-000007 disagrees with parts/block-000000 on rule"):
        commit_parts(cache, build={}, complete=True)
    cache2, _ = _parts(tmp_path / "x")
    write_cache(cache2 / part_name(9), make_sequences(rng, 3, vocab=V, rule=TopK(6)), vocab=V, rule=TopK(6),
                id_counts=np.arange(V))  # another id ranking
    with pytest.raises(InvalidInputError, match="id_map"):
        commit_parts(cache2, build={}, complete=True)


def test_exactness_table_says_what_is_a_bound(tmp_path):
    rng = np.random.default_rng(2)
    write_cache(tmp_path / "c", make_sequences(rng, 4, vocab=V, rule=TopK(4)), vocab=V, rule=TopK(4),
                exactness={"entropy": "bound"})
    c = logitstore.open(tmp_path / "c")
    rows = dict(c.sql("SELECT field, exactness FROM exactness").fetchall())
    assert rows == {"topk_logprobs": "quantised", "label_logprob": "exact", "entropy": "bound", "tail_mass": "exact"}
    meaning = c.sql("SELECT meaning FROM exactness WHERE field = 'entropy'").fetchall()[0][0]
    assert "upper bound" in meaning
