"""trainers.data: the streaming loader against plain references.

The references are independent of the module: the reader's own plain iteration of the
cache (``logitstore.open``) for the decoded values, the shards' row groups read with
pyarrow for the storage order, and per-token loops that lay a batch out by the
documented rule (index t holds the teacher entry of pos = t + 1; greedy packing).
"""

from __future__ import annotations

import logging
from itertools import islice

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import logitstore
from logitstore import Codec, InvalidInputError, Sampled
from logitstore.selection import Selection, cache_fingerprint, save_selection
from tests.conftest import make_sequence, make_sequences, write_cache
from trainers.data import StreamingLoader

# ---------------------------------------------------------------- references


def decoded(path) -> dict:
    """seq_id -> the reader's decoded Sequence, by plain iteration."""
    return {s.seq_id: s for s in logitstore.open(path)}


def storage_row_groups(path) -> list[list[str]]:
    """The seq_ids of every row group of every shard, in storage order (pyarrow only)."""
    c = logitstore.open(path)
    out = []
    for f in c.shard_paths:
        pf = pq.ParquetFile(f)
        out += [pf.read_row_group(i, columns=["seq_id"]).column(0).to_pylist() for i in range(pf.num_row_groups)]
    return out


def layout(ids, seqs, max_length, pack):
    """Rows of (seq_id, first column, length) by the documented rule, with plain loops."""
    rows, fill = [], 0
    for sid in ids:
        n = int(seqs[sid].n_tokens) if max_length is None else min(int(seqs[sid].n_tokens), max_length)
        if pack and rows and fill + n <= max_length:
            rows[-1].append((sid, fill, n))
            fill += n
        else:
            rows.append([(sid, 0, n)])
            fill = n
    return rows


def expected_batch(ids, seqs, k, *, max_length=None, pack=False, weights=None, scores=None, values=True,
                   sampled=False):
    """The collated batch the loader must produce for the sequences ``ids``, built token by token."""
    rows = layout(ids, seqs, max_length, pack)
    B, T = len(rows), max(1, max(o + n for r in rows for _, o, n in r))
    e = {name: np.zeros((B, T), np.int64) for name in ("input_ids", "attention_mask", "position_ids",
                                                         "segment_ids", "labels")}
    e.update(target_mask=np.zeros((B, T), bool), topk_ids=np.zeros((B, T, k), np.int64),
             topk_valid=np.zeros((B, T, k), bool), tail_mass=np.zeros((B, T), np.float32),
             teacher_entropy=np.zeros((B, T), np.float32), label_logprob=np.zeros((B, T), np.float32),
             weight=np.zeros((B, T), np.float32), correct=np.full((B, T), -1, np.int8),
             pos=np.full((B, T), -1, np.int32))
    if values:
        e["topk_logprobs"] = np.full((B, T, k), -np.inf, np.float32)
    if sampled:
        e["counts"] = np.zeros((B, T, k), np.float32)
    for name in (scores or {}).get("names", []):
        e[f"score_{name}"] = np.full((B, T), np.nan, np.float32)
    for r, row in enumerate(rows):
        for seg, (sid, o, n) in enumerate(row, 1):
            s = seqs[sid]
            for t in range(n):
                e["input_ids"][r, o + t] = s.input_ids[t]
                e["attention_mask"][r, o + t] = 1
                e["position_ids"][r, o + t] = t
                e["segment_ids"][r, o + t] = seg
                e["weight"][r, o + t] = 1.0 if weights is None else weights[sid]
                e["correct"][r, o + t] = -1 if s.correct is None else int(s.correct)
            for i, p in enumerate(s.pos):
                if p >= n:
                    continue
                c = o + p - 1
                e["pos"][r, c] = p
                e["target_mask"][r, c] = s.loss_mask[i]
                e["labels"][r, c] = s.input_ids[p]
                e["tail_mass"][r, c] = s.tail_mass[i]
                e["teacher_entropy"][r, c] = s.entropy[i]
                e["label_logprob"][r, c] = s.label_logprob[i]
                for j in range(s.n_entries[i]):
                    e["topk_ids"][r, c, j] = s.ids[i, j]
                    e["topk_valid"][r, c, j] = True
                    if values:
                        e["topk_logprobs"][r, c, j] = s.logprobs[i, j]
                    if sampled:
                        e["counts"][r, c, j] = s.counts[i, j]
            for name in (scores or {}).get("names", []):
                for (ssid, p), v in scores[name].items():
                    if ssid == sid and 1 <= p < n:
                        e[f"score_{name}"][r, o + p - 1] = v
    return e


def assert_batch(batch, ids, seqs, k, **kw):
    assert batch["seq_ids"] == list(ids)
    want = expected_batch(ids, seqs, k, **kw)
    got = {key: v for key, v in batch.items() if key not in ("seq_ids", "epoch")}
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        g = got[key].numpy()
        assert g.dtype == w.dtype and g.shape == w.shape, (key, g.dtype, g.shape, w.dtype, w.shape)
        np.testing.assert_array_equal(g, w, err_msg=key)


def ids_of(batches) -> list[list[str]]:
    return [b["seq_ids"] for b in batches]


def round_robin(plans: list[list]) -> list:
    """DataLoader's documented order: worker 0, 1, ... in turn, an exhausted worker's turn skipped."""
    out, i = [], 0
    while any(i < len(p) for p in plans):
        out += [p[i] for p in plans if i < len(p)]
        i += 1
    return out


@pytest.fixture(scope="module")
def cache(ranked_cache):
    return ranked_cache.path


@pytest.fixture(scope="module")
def seqs(cache):
    return decoded(cache)


def selection_file(path, tmp, ids, weights=None):
    m = logitstore.open(path).manifest
    f = tmp / "sel.json"
    save_selection(f, Selection(cache=str(path), cache_fingerprint=cache_fingerprint(m), seq_ids=ids, weights=weights))
    return f


# ---------------------------------------------------------------- the plan


def test_each_sequence_once_per_epoch_across_ranks_and_workers(cache, seqs):
    assert len(storage_row_groups(cache)) >= 6  # several shards and row groups
    parts = []
    for rank in range(2):
        loader = StreamingLoader(cache, batch_size=3, rank=rank, world_size=2, num_workers=2, buffer_size=4, epochs=1)
        plans = [loader.epoch_plan(0, worker=w) for w in range(2)]
        parts += [[s for b in p for s in b] for p in plans]
        got = ids_of(loader)  # DataLoader with 2 worker processes
        assert got == round_robin(plans)
    flat = [s for p in parts for s in p]
    assert len(flat) == len(set(flat)) and set(flat) == set(seqs)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_storage_order_without_shuffle_and_contiguous_parts(cache):
    storage = [s for rg in storage_row_groups(cache) for s in rg]
    loader = StreamingLoader(cache, batch_size=4, shuffle=False, world_size=3, rank=0, num_workers=2)
    parts = [[s for b in loader.epoch_plan(1, rank=r, worker=w) for s in b] for r in range(3) for w in range(2)]
    assert [s for p in parts for s in p] == storage
    one = StreamingLoader(cache, batch_size=4, shuffle=False, epochs=1)
    assert [s for b in ids_of(one) for s in b] == storage
    assert ids_of(one) == []  # the stream is finished: a second pass continues after it


def test_shuffle_is_deterministic_and_keeps_row_groups_together(cache):
    rgs = storage_row_groups(cache)
    a = StreamingLoader(cache, batch_size=4, seed=3, buffer_size=1)
    flat = [s for b in a.epoch_plan(0) for s in b]
    # buffer_size=1: whole row groups in a permuted order, each one's rows in storage order
    chunks, i = [], 0
    while i < len(flat):
        rg = next(r for r in rgs if r[0] == flat[i])
        assert flat[i:i + len(rg)] == rg
        chunks.append(rg)
        i += len(rg)
    assert sorted(map(tuple, chunks)) == sorted(map(tuple, rgs)) and chunks != rgs
    plan = lambda **kw: StreamingLoader(cache, batch_size=4, buffer_size=8, **kw).epoch_plan(kw.pop("e", 0))  # noqa
    assert plan(seed=5) == plan(seed=5)
    assert plan(seed=5) != plan(seed=6)
    b = StreamingLoader(cache, batch_size=4, buffer_size=8, seed=5)
    assert b.epoch_plan(0) != b.epoch_plan(1)
    assert sorted(s for x in b.epoch_plan(1) for s in x) == sorted(s for x in b.epoch_plan(0) for s in x)
    # the window shuffle mixes row groups beyond buffer_size=1
    assert [s for x in b.epoch_plan(0) for s in x] != [s for x in StreamingLoader(
        cache, batch_size=4, buffer_size=1, seed=5).epoch_plan(0) for s in x]
    # iteration runs the epochs back to back, in the planned order
    it = ids_of(StreamingLoader(cache, batch_size=4, buffer_size=8, seed=5, epochs=2))
    assert it == b.epoch_plan(0) + b.epoch_plan(1)


# ---------------------------------------------------------------- collated values


@pytest.mark.parametrize("max_length", [None, 12])
def test_batches_equal_the_decoded_sequences(cache, seqs, ranked_cache, max_length, caplog):
    k = ranked_cache.rule.k
    with caplog.at_level(logging.INFO, logger="trainers.data"):
        loader = StreamingLoader(cache, batch_size=5, max_length=max_length, buffer_size=6, seed=1, epochs=1)
    n_long = sum(int(s.n_tokens) > max_length for s in seqs.values()) if max_length else 0
    assert loader.num_truncated == n_long and (n_long > 0) == (max_length is not None)
    assert (f"{n_long} of 30 sequences are longer" in caplog.text) == (max_length is not None)
    assert loader.k == k and loader.vocab_size == ranked_cache.vocab and loader.num_sequences == 30
    batches = list(loader)
    assert ids_of(batches) == loader.epoch_plan(0)
    assert [len(b["seq_ids"]) for b in batches] == [5] * 6
    for b in batches:
        assert b["epoch"] == 0
        assert_batch(b, b["seq_ids"], seqs, k, max_length=max_length)
    assert any(int(s.correct is not None) for s in seqs.values())


def test_packed_rows(cache, seqs, ranked_cache):
    k, ml = ranked_cache.rule.k, 30
    loader = StreamingLoader(cache, batch_size=3, max_length=ml, pack=True, buffer_size=7, seed=2, epochs=1)
    batches = list(loader)
    assert ids_of(batches) == loader.epoch_plan(0)
    assert [s for b in batches for s in b["seq_ids"]] == [s for b in loader.epoch_plan(0) for s in b]
    lens = {sid: min(int(s.n_tokens), ml) for sid, s in seqs.items()}
    packed = 0
    for i, b in enumerate(batches):
        assert_batch(b, b["seq_ids"], seqs, k, max_length=ml, pack=True)
        rows = layout(b["seq_ids"], seqs, ml, True)
        packed += sum(len(r) > 1 for r in rows)
        assert len(rows) <= 3
        if i + 1 < len(batches):  # a batch ends at 3 rows, and its next sequence did not fit the last one
            assert len(rows) == 3
            assert sum(n for _, _, n in rows[-1]) + lens[batches[i + 1]["seq_ids"][0]] > ml
    assert packed > 0


def test_packing_rule_on_exact_fits(tmp_path):
    rule = Sampled(16, 8)
    rng = np.random.default_rng(3)
    lens = [10, 20, 5, 25, 30, 31, 1, 29, 2]
    refs = [make_sequence(rng, vocab=100, n_tokens=n, rule=rule, seq_id=f"s{i}") for i, n in enumerate(lens)]
    write_cache(tmp_path / "c", refs, vocab=100, rule=rule, row_group_positions=40)
    loader = StreamingLoader(tmp_path / "c", batch_size=2, max_length=30, pack=True, shuffle=False, epochs=1)
    # rows [10+20] [5+25] | [30] [31 -> 30] | [1+29] [2]
    assert loader.epoch_plan(0) == [["s0", "s1", "s2", "s3"], ["s4", "s5"], ["s6", "s7", "s8"]]
    seqs = decoded(tmp_path / "c")
    batches = list(loader)
    assert [b["segment_ids"].amax(1).tolist() for b in batches] == [[2, 2], [1, 1], [2, 1]]
    for b in batches:
        assert_batch(b, b["seq_ids"], seqs, 8, max_length=30, pack=True, sampled=True)


def test_sampled_cache_counts(sampled_cache):
    seqs = decoded(sampled_cache.path)
    loader = StreamingLoader(sampled_cache.path, batch_size=4, max_length=20, epochs=1, pack=True)
    for b in loader:
        assert_batch(b, b["seq_ids"], seqs, sampled_cache.rule.k, max_length=20, pack=True, sampled=True)


def test_cache_without_logprobs(tmp_path):
    rule = Sampled(24, 12)
    refs = make_sequences(np.random.default_rng(5), 9, vocab=150, rule=rule, max_tokens=20)
    write_cache(tmp_path / "c", refs, vocab=150, rule=rule, codec=Codec(values="none"), shard_bytes=4000,
                row_group_positions=30)
    seqs = decoded(tmp_path / "c")
    for b in StreamingLoader(tmp_path / "c", batch_size=4, epochs=1, num_workers=0):
        assert "topk_logprobs" not in b
        assert_batch(b, b["seq_ids"], seqs, 12, values=False, sampled=True)


def test_selection_with_weights(cache, seqs, ranked_cache, tmp_path):
    chosen = sorted(seqs)[::3]
    weights = {sid: 0.5 + i for i, sid in enumerate(chosen)}
    f = selection_file(cache, tmp_path, chosen, [weights[s] for s in chosen])
    for source in (f, logitstore.open(f)):
        loader = StreamingLoader(source, batch_size=3, world_size=2, rank=1, epochs=1)
        other = StreamingLoader(source, batch_size=3, world_size=2, rank=0, epochs=1)
        assert loader.num_sequences == len(chosen)
        seen = []
        for b in loader:
            assert_batch(b, b["seq_ids"], seqs, ranked_cache.rule.k, weights=weights)
            seen += b["seq_ids"]
        seen += [s for b in other.epoch_plan(0) for s in b]
        assert sorted(seen) == chosen


def test_scores_joined(cache, seqs, ranked_cache, tmp_path):
    rng = np.random.default_rng(0)
    rows = {"seq_id": [], "pos": [], "student_entropy": [], "kl_teacher_student": []}
    for sid in sorted(seqs)[::2]:
        for p in seqs[sid].pos[::2]:  # some positions missing
            rows["seq_id"].append(sid)
            rows["pos"].append(int(p))
            rows["student_entropy"].append(float(rng.random()))
            rows["kl_teacher_student"].append(float(rng.random()))
    order = rng.permutation(len(rows["pos"]))  # the loader must not rely on the file's order
    t = pa.table({k: [v[i] for i in order] for k, v in rows.items()}, schema=pa.schema([
        ("seq_id", pa.string()), ("pos", pa.int32()), ("student_entropy", pa.float32()),
        ("kl_teacher_student", pa.float32())]))
    (tmp_path / "scores").mkdir()
    pq.write_table(t, tmp_path / "scores" / "scores.parquet")
    ref = {name: {(s, p): np.float32(v) for s, p, v in zip(rows["seq_id"], rows["pos"], rows[name])}
           for name in ("student_entropy", "kl_teacher_student")}
    for cols in (("student_entropy",), ()):
        names = list(cols) or ["student_entropy", "kl_teacher_student"]
        loader = StreamingLoader(cache, batch_size=6, max_length=15, epochs=1, scores=tmp_path / "scores",
                                 score_columns=cols)
        for b in loader:
            assert_batch(b, b["seq_ids"], seqs, ranked_cache.rule.k, max_length=15, scores={**ref, "names": names})
    with pytest.raises(InvalidInputError, match=r"\['tvd'\].*available.*student_entropy"):
        StreamingLoader(cache, batch_size=2, scores=tmp_path / "scores", score_columns=["tvd"])
    with pytest.raises(InvalidInputError, match="no scores.parquet"):
        StreamingLoader(cache, batch_size=2, scores=tmp_path, score_columns=["tvd"])


# ---------------------------------------------------------------- resume


def consume(loader, n):
    out = ids_of(islice(iter(loader), n))
    return out, loader.state_dict()


@pytest.mark.parametrize("workers,pack", [(0, False), (2, False), (2, True)])
def test_resume_continues_exactly(cache, seqs, tmp_path, workers, pack):
    f = selection_file(cache, tmp_path, sorted(seqs)[1:])  # 29 sequences: the two workers' parts differ
    kw = dict(batch_size=2, buffer_size=5, seed=4, num_workers=workers, epochs=2,
              max_length=25 if pack else None, pack=pack)
    full = ids_of(StreamingLoader(f, **kw))
    assert sorted(s for b in full for s in b) == sorted(sorted(seqs)[1:] * 2)
    if workers:
        plans = [StreamingLoader(f, **kw).epoch_plan(e, worker=w) for w in range(2) for e in range(2)]
        assert full == round_robin([plans[0] + plans[1], plans[2] + plans[3]])
        assert len(plans[0] + plans[1]) != len(plans[2] + plans[3])  # one worker runs out first
    for n in (0, 3, 8, len(full) - 1):
        head, state = consume(StreamingLoader(f, **kw), n)
        assert head == full[:n] and state["batches"] == n
        fresh = StreamingLoader(f, **kw)
        fresh.load_state_dict(state)
        assert ids_of(fresh) == full[n:]
    # twice in a row, and the values of the batches after a resume
    a, s1 = consume(StreamingLoader(f, **kw), 3)
    second = StreamingLoader(f, **kw)
    second.load_state_dict(s1)
    b, s2 = consume(second, 4)
    third = StreamingLoader(f, **kw)
    third.load_state_dict(s2)
    rest = list(third)
    assert a + b + ids_of(rest) == full and s2["batches"] == 7
    for batch in rest[:3]:
        assert_batch(batch, batch["seq_ids"], seqs, 24, max_length=kw["max_length"], pack=pack)


def test_resume_of_an_endless_stream(cache):
    kw = dict(batch_size=4, buffer_size=6, num_workers=2, world_size=2, rank=1)
    full = ids_of(islice(iter(StreamingLoader(cache, **kw)), 13))
    ref = StreamingLoader(cache, **kw)
    parts = [[b for e in range(5) for b in ref.epoch_plan(e, worker=w)] for w in range(2)]
    assert full == round_robin(parts)[:13]  # epochs back to back in each worker, several epochs deep
    head, state = consume(StreamingLoader(cache, **kw), 5)
    resumed = StreamingLoader(cache, **kw)
    resumed.load_state_dict(state)
    assert head + ids_of(islice(iter(resumed), 8)) == full


def test_resume_refuses_other_settings(cache):
    _, state = consume(StreamingLoader(cache, batch_size=2, seed=1), 2)
    for change, name in ((dict(seed=2), "seed"), (dict(batch_size=3), "batch_size"), (dict(num_workers=2),
                         "num_workers"), (dict(world_size=2), "world_size")):
        with pytest.raises(InvalidInputError, match=f"{name}: saved"):
            StreamingLoader(cache, **{"batch_size": 2, "seed": 1, **change}).load_state_dict(state)
    ok = StreamingLoader(cache, batch_size=2, seed=1)
    ok.load_state_dict(state)
    assert ok.state_dict() == state


def test_bad_arguments(cache):
    for kw, msg in ((dict(batch_size=0), "batch_size=0"), (dict(batch_size=2, pack=True), "pack=True needs"),
                    (dict(batch_size=2, rank=2, world_size=2), "rank=2"), (dict(batch_size=2, buffer_size=0),
                    "buffer_size=0"), (dict(batch_size=2, score_columns=["x"]), "without scores")):
        with pytest.raises(InvalidInputError, match=msg):
            StreamingLoader(cache, **kw)
