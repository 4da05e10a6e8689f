"""CacheWriter (sharding, commit protocol, resume, duplicates, input validation) and the reader
(random access, subsets, scalar columns), checked against the files themselves (hashlib, pyarrow)
and the reference inputs."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

import logitstore
from logitstore import CacheExistsError, Codec, InvalidInputError, MassTopK, Sampled, TopK
from logitstore.verify import verify
from tests.conftest import (
    as_record,
    assert_sequence_matches,
    entropy,
    make_sequences,
    random_logprobs,
    read_manifest,
    reference_id_map,
    reference_seq_id,
    sha256_file,
    shard_files,
    write_cache,
)


def _totals(refs):
    return dict(
        sequences=len(refs),
        positions=sum(r.n for r in refs),
        targets=sum(int(r.loss_mask.sum()) for r in refs),
        entries=sum(int(r.n_entries.sum()) for r in refs),
    )


def _assert_cache_equals_refs(path, refs, rule, codec):
    cache = logitstore.open(path)
    got = list(cache)
    assert [s.seq_id for s in got] == [r.seq_id for r in refs]
    for s, r in zip(got, refs):
        assert_sequence_matches(s, r, codec, rule, rule.k)


# ---------------------------------------------------------------- manifest and shards


def test_manifest_describes_the_cache(ranked_cache):
    m = read_manifest(ranked_cache.path)
    # a top-k cache is written as version 2, the oldest that describes it (3 is for systematic draws)
    assert m["format"] == "logitstore" and m["format_version"] == 2 and logitstore.FORMAT_VERSION == 3
    # FORMAT.md: the last key is the sha256 of the canonical JSON (sorted keys, no whitespace) of all the others
    assert list(m)[-1] == "checksum"
    body = {k: v for k, v in m.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert m["checksum"] == hashlib.sha256(canonical.encode("ascii")).hexdigest()
    assert m["complete"] is True
    assert m["vocab_size"] == ranked_cache.vocab
    assert m["rule"] == {"rule": "mass", "p": 0.9, "k": 24}
    assert m["codec"] == {"values": "qdelta", "logprob_step": 5 / 128, "ids": "ranked", "scalars": "fp32",
                          "zstd_level": 1}
    assert m["duplicates_skipped"] == 0
    want = _totals(ranked_cache.refs)
    for key, value in want.items():
        assert sum(s[key] for s in m["shards"]) == value
        assert m["totals"][key] == value
    assert m["totals"]["bytes"] == sum(os.path.getsize(f) for f in shard_files(ranked_cache.path))


def test_shards_rotate_and_manifest_matches_files(ranked_cache):
    """Small shard_bytes: several shards, each listed with counts, size and sha256 that match the file."""
    path, refs = ranked_cache.path, ranked_cache.refs
    m = read_manifest(path)
    files = shard_files(path)
    assert len(m["shards"]) >= 3
    assert [s["file"] for s in m["shards"]] == [f"shards/shard-{i:06d}.parquet" for i in range(len(files))]
    assert [f"shards/{f.name}" for f in files] == [s["file"] for s in m["shards"]]
    id_map_sha = sha256_file(path / "id_map.parquet")
    assert m["id_map"] == {"file": "id_map.parquet", "sha256": id_map_sha, "size": ranked_cache.vocab}
    by_id = ranked_cache.by_id
    seen = []
    several_row_groups = False
    for i, (info, f) in enumerate(zip(m["shards"], files)):
        assert info["bytes"] == os.path.getsize(f)
        assert info["sha256"] == sha256_file(f)
        pf = pq.ParquetFile(f)
        several_row_groups |= pf.metadata.num_row_groups > 1
        t = pf.read()
        ids = t.column("seq_id").to_pylist()
        seen += ids
        assert info["sequences"] == t.num_rows == len(ids)
        mine = [by_id[s] for s in ids]
        assert info["positions"] == int(pc.sum(pc.list_value_length(t.column("pos"))).as_py() or 0) \
            == sum(r.n for r in mine)
        inner = pc.list_flatten(t.column("topk_codes"))
        assert info["entries"] == int(pc.sum(pc.list_value_length(inner)).as_py() or 0) \
            == sum(int(r.n_entries.sum()) for r in mine)
        assert info["targets"] == int(pc.sum(pc.list_flatten(t.column("loss_mask"))).as_py() or 0) \
            == sum(int(r.loss_mask.sum()) for r in mine)
        # each shard describes itself
        meta = json.loads(pf.schema_arrow.metadata[b"logitstore"])
        assert meta["format"] == "logitstore" and meta["format_version"] == 2 and meta["shard"] == i
        assert meta["rule"] == m["rule"] and meta["codec"] == m["codec"] and meta["vocab_size"] == m["vocab_size"]
        assert meta["id_map_sha256"] == id_map_sha
    assert several_row_groups
    assert seen == [r.seq_id for r in refs]


def test_id_map_ranks_first_row_group_by_frequency(tmp_path):
    """Codes rank token ids by descending frequency among the first row group's entries."""
    rng = np.random.default_rng(3)
    vocab, rule = 600, TopK(6)  # > 256 codes: the low-byte-major code order matters
    refs = make_sequences(rng, 6, vocab=vocab, rule=rule, max_tokens=12, min_tokens=3, scale=1.0)
    write_cache(tmp_path / "c", refs, vocab=vocab, rule=rule)  # one flush: the first row group holds all
    entries = []
    for r in refs:
        valid = np.arange(r.ids.shape[1])[None, :] < r.n_entries[:, None]
        entries += r.ids[valid].tolist()
    want = reference_id_map(entries, vocab)
    t = pq.read_table(tmp_path / "c" / "id_map.parquet")
    assert t.column("code").to_pylist() == list(range(vocab))
    assert t.column("token_id").to_pylist() == want
    # the stored codes map back to the reference ids
    codes = pq.read_table(shard_files(tmp_path / "c")[0], columns=["topk_codes"]).column(0).to_pylist()
    code_of = {tok: code for code, tok in enumerate(want)}
    for r, per_pos in zip(refs, codes):
        for i, c in enumerate(per_pos):
            assert c == [code_of[t] for t in r.ids[i, :r.n_entries[i]].tolist()]


def test_context_manager_commits_on_exit(tmp_path):
    rng = np.random.default_rng(0)
    rule = TopK(4)
    refs = make_sequences(rng, 3, vocab=50, rule=rule, max_tokens=8)
    with logitstore.CacheWriter(tmp_path / "c", vocab_size=50, rule=rule) as w:
        assert read_manifest(tmp_path / "c")["complete"] is False  # written on open, incomplete
        for r in refs:
            w.add(r.to_record())
    m = read_manifest(tmp_path / "c")
    assert m["complete"] is True and sum(s["sequences"] for s in m["shards"]) == 3
    assert [p for p in (tmp_path / "c").rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")] == []
    _assert_cache_equals_refs(tmp_path / "c", refs, rule, Codec())


def test_no_tmp_files_after_close(ranked_cache):
    leftovers = [p for p in ranked_cache.path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert leftovers == []
    assert sorted(p.name for p in ranked_cache.path.iterdir()) == ["id_map.parquet", "manifest.json", "shards"]


# ---------------------------------------------------------------- interruption and resume

RULE, VOCAB = MassTopK(0.8, 12), 400
WRITER = dict(shard_bytes=7_000, row_group_positions=25)


@pytest.fixture(scope="module")
def resume_refs():
    rng = np.random.default_rng(2024)
    return make_sequences(rng, 24, vocab=VOCAB, rule=RULE, max_tokens=30, mask_prob=0.2)


def _interrupted_write(path, refs):
    """Add sequences until some shards are committed and a shard is in progress, then fail.
    Returns (number of sequences committed, the shard list at that point)."""
    with pytest.raises(RuntimeError, match="boom"):
        with logitstore.CacheWriter(path, vocab_size=VOCAB, rule=RULE, **WRITER) as w:
            for r in refs:
                w.add(r.to_record())
                tmp = list((path / "shards").glob(".*.tmp"))
                if len(w.manifest.shards) >= 2 and tmp:
                    committed = read_manifest(path)["shards"]
                    raise RuntimeError("boom")
            pytest.fail("the test data never reached two committed shards plus one in progress")
    n = sum(s["sequences"] for s in committed)
    return n, committed


def test_exception_inside_with_drops_the_shard_in_progress(tmp_path, resume_refs):
    path = tmp_path / "c"
    n, committed = _interrupted_write(path, resume_refs)
    assert list((path / "shards").glob("*.tmp")) == [] and list((path / "shards").glob(".*")) == []
    m = read_manifest(path)
    assert m["complete"] is False
    assert m["shards"] == committed
    assert sorted(f"shards/{f.name}" for f in shard_files(path)) == [s["file"] for s in committed]
    assert 0 < n < len(resume_refs)
    # what was committed is readable, sound and equal to the first n reference sequences
    _assert_cache_equals_refs(path, resume_refs[:n], RULE, Codec())
    assert verify(path) == []


def test_resume_continues_an_interrupted_write(tmp_path, resume_refs):
    path = tmp_path / "c"
    n, committed = _interrupted_write(path, resume_refs)
    old = {s["file"]: sha256_file(path / s["file"]) for s in committed}
    committed_ids = set()
    for s in committed:  # read independently of the writer
        committed_ids |= set(pq.read_table(path / s["file"], columns=["seq_id"]).column(0).to_pylist())
    with logitstore.CacheWriter(path, vocab_size=VOCAB, rule=RULE, resume=True, **WRITER) as w:
        assert w.committed_ids == committed_ids == {r.seq_id for r in resume_refs[:n]}
        for r in resume_refs:
            if r.seq_id not in w.committed_ids:
                assert w.add(r.to_record()) is True
    m = read_manifest(path)
    assert m["complete"] is True and m["duplicates_skipped"] == 0
    assert m["shards"][: len(committed)] == committed  # old shards untouched, new ones appended
    assert len(m["shards"]) > len(committed)
    assert [s["file"] for s in m["shards"]] == [f"shards/shard-{i:06d}.parquet" for i in range(len(m["shards"]))]
    for f, digest in old.items():
        assert sha256_file(path / f) == digest
    for key, value in _totals(resume_refs).items():
        assert sum(s[key] for s in m["shards"]) == value
    _assert_cache_equals_refs(path, resume_refs, RULE, Codec())
    assert verify(path) == []
    # the same content as an uninterrupted write, value for value
    write_cache(tmp_path / "ref", resume_refs, vocab=VOCAB, rule=RULE, **WRITER)
    a, b = list(logitstore.open(path)), list(logitstore.open(tmp_path / "ref"))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for field in ("seq_id", "mean_entropy", "teacher_nll", "token_accuracy"):
            assert getattr(x, field) == getattr(y, field)
        for field in ("input_ids", "pos", "loss_mask", "ids", "logprobs", "label_logprob", "entropy", "tail_mass"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))


def test_resume_skips_and_counts_already_committed_sequences(tmp_path, resume_refs):
    path = tmp_path / "c"
    n, _ = _interrupted_write(path, resume_refs)
    with logitstore.CacheWriter(path, vocab_size=VOCAB, rule=RULE, resume=True, **WRITER) as w:
        added = [w.add(r.to_record()) for r in resume_refs]
    assert added == [False] * n + [True] * (len(resume_refs) - n)
    assert read_manifest(path)["duplicates_skipped"] == n
    _assert_cache_equals_refs(path, resume_refs, RULE, Codec())


def test_resume_a_complete_cache_appends(tmp_path, resume_refs):
    path = tmp_path / "c"
    write_cache(path, resume_refs[:10], vocab=VOCAB, rule=RULE, **WRITER)
    with logitstore.CacheWriter(path, vocab_size=VOCAB, rule=RULE, resume=True, **WRITER) as w:
        assert w.committed_ids == {r.seq_id for r in resume_refs[:10]}
        for r in resume_refs[10:]:
            assert w.add(r.to_record())
    _assert_cache_equals_refs(path, resume_refs, RULE, Codec())
    assert verify(path) == []


def test_resume_on_a_new_path_starts_a_cache(tmp_path, resume_refs):
    with logitstore.CacheWriter(tmp_path / "new", vocab_size=VOCAB, rule=RULE, resume=True) as w:
        assert w.committed_ids == set()
        w.add(resume_refs[0].to_record())
    _assert_cache_equals_refs(tmp_path / "new", resume_refs[:1], RULE, Codec())


@pytest.mark.parametrize(
    "field,change",
    [
        ("vocab_size", dict(vocab_size=VOCAB + 1)),
        ("rule", dict(rule=MassTopK(0.9, 12))),
        ("rule", dict(rule=TopK(12))),
        ("codec", dict(codec=Codec(values="fp32"))),
        ("codec", dict(codec=Codec(logprob_step=0.01))),
        ("teacher", dict(teacher={"id": "another-teacher"})),
        ("tokenizer", dict(tokenizer={"fingerprint": "abc"})),
        ("temperature", dict(temperature=2.0)),
    ],
)
def test_resume_with_different_settings_is_refused(tmp_path, resume_refs, field, change):
    path = tmp_path / "c"
    write_cache(path, resume_refs[:4], vocab=VOCAB, rule=RULE, **WRITER)
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    kw = dict(vocab_size=VOCAB, rule=RULE, resume=True, **WRITER) | change
    with pytest.raises(InvalidInputError, match=field) as exc:
        with logitstore.CacheWriter(path, **kw):
            pass
    assert "cannot resume" in str(exc.value)
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before  # nothing touched


def test_existing_cache_without_resume_is_refused(tmp_path, resume_refs):
    path = tmp_path / "c"
    write_cache(path, resume_refs[:3], vocab=VOCAB, rule=RULE)
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with pytest.raises(CacheExistsError, match="resume"):
        with logitstore.CacheWriter(path, vocab_size=VOCAB, rule=RULE):
            pass
    assert issubclass(CacheExistsError, FileExistsError)
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    other = tmp_path / "not-a-cache"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CacheExistsError):
        with logitstore.CacheWriter(other, vocab_size=VOCAB, rule=RULE):
            pass
    assert (other / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- duplicates and sequence ids


def test_duplicate_seq_ids_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(1)
    rule = TopK(4)
    a, b = make_sequences(rng, 2, vocab=50, rule=rule, min_tokens=3, max_tokens=8)
    b.seq_id = a.seq_id  # different content, same id
    with logitstore.CacheWriter(tmp_path / "c", vocab_size=50, rule=rule) as w:
        assert w.add(a.to_record()) is True
        assert w.add(a.to_record()) is False
        assert w.add(b.to_record()) is False
    assert read_manifest(tmp_path / "c")["duplicates_skipped"] == 2
    _assert_cache_equals_refs(tmp_path / "c", [a], rule, Codec())


def test_default_seq_id_is_the_content_hash(tmp_path):
    rng = np.random.default_rng(4)
    rule = TopK(3)
    refs = make_sequences(rng, 3, vocab=30, rule=rule, min_tokens=4, max_tokens=9)
    refs[1].sample = 2  # generated sample: '/2' is hashed too
    twin = copy.deepcopy(refs[1])  # same tokens, another sample -> another id
    twin.sample = 3
    refs.append(twin)
    for r in refs:
        r.explicit_id = False
        r.seq_id = reference_seq_id(r.input_ids, r.sample)
        assert logitstore.sequence_id(r.input_ids, f"/{r.sample}" if r.sample else b"") == r.seq_id
    assert len({r.seq_id for r in refs}) == 4
    write_cache(tmp_path / "c", refs, vocab=30, rule=rule)
    got = pq.read_table(shard_files(tmp_path / "c")[0], columns=["seq_id"]).column(0).to_pylist()
    assert got == [r.seq_id for r in refs]
    assert all(len(s) == 16 and int(s, 16) >= 0 for s in got)


# ---------------------------------------------------------------- input validation


def _valid_kwargs():
    lp = np.array([[-0.5, -1.5, -2.5], [-0.3, -2.0, -3.0]], np.float32)
    return dict(
        input_ids=np.array([1, 4, 7]), ids=np.array([[4, 2, 9], [7, 0, 1]]), logprobs=lp,
        label_logprob=np.array([-1.5, -0.3]), entropy=np.array([1.2, 0.8]),
        tail_mass=1 - np.exp(lp.astype(np.float64)).sum(axis=1), seq_id="valid",
    )


def _mutate(**changes):
    def f(kw):
        kw.update(changes)
        return kw
    return f


def _setitem(key, index, value):
    def f(kw):
        a = np.array(kw[key], copy=True)
        a[index] = value
        kw[key] = a
        return kw
    return f


BAD_INPUTS = {
    "entry id >= vocab": (_setitem("ids", (0, 1), 10), "entry ids"),
    "negative entry id": (_setitem("ids", (1, 2), -1), "entry ids"),
    "input id >= vocab": (_setitem("input_ids", 0, 10), "input_ids"),
    "unsorted logprobs": (_setitem("logprobs", (0, 2), -1.0), "sorted"),
    "positive logprob": (_setitem("logprobs", (0, 0), 0.5), "logprobs"),
    "NaN logprob": (_setitem("logprobs", (1, 1), np.nan), "logprobs"),
    "-inf logprob on a valid entry": (_setitem("logprobs", (1, 2), -np.inf), "logprobs"),
    "NaN entropy": (_setitem("entropy", 1, np.nan), "entropy"),
    "negative entropy": (_setitem("entropy", 0, -0.5), "entropy"),
    "inf entropy": (_setitem("entropy", 0, np.inf), "entropy"),
    "positive label_logprob": (_setitem("label_logprob", 0, 0.3), "label_logprob"),
    "NaN label_logprob": (_setitem("label_logprob", 0, np.nan), "label_logprob"),
    "tail_mass > 1": (_setitem("tail_mass", 0, 1.5), "tail_mass"),
    "tail_mass < 0": (_setitem("tail_mass", 0, -0.2), "tail_mass"),
    "positions not increasing": (_mutate(positions=[2, 1]), "positions"),
    "positions repeated": (_mutate(positions=[1, 1]), "positions"),
    "position 0": (_mutate(positions=[0, 1]), "positions"),
    "position >= T": (_mutate(positions=[1, 3]), "positions"),
    "ids 1-D": (_mutate(ids=np.array([4, 2, 9])), "ids"),
    "ids and logprobs shapes differ": (_mutate(ids=np.array([[4, 2], [7, 0]])), "ids"),
    "N differs from positions": (_mutate(positions=[1]), "positions"),
    "K beyond rule k": (_mutate(ids=np.array([[4, 2, 9, 3], [7, 0, 1, 3]]),
                                logprobs=np.array([[-0.5, -1.5, -2.5, -3], [-0.3, -2.0, -3.0, -4]])), "rule"),
    "label_logprob length": (_mutate(label_logprob=np.array([-0.5])), "label_logprob"),
    "entropy length": (_mutate(entropy=np.array([1.0, 1.0, 1.0])), "entropy"),
    "tail_mass length": (_mutate(tail_mass=np.array([0.5])), "tail_mass"),
    "loss_mask length": (_mutate(loss_mask=np.array([True])), "loss_mask"),
    "n_entries 0": (_mutate(n_entries=np.array([0, 3])), "n_entries"),
    "n_entries > K": (_mutate(n_entries=np.array([4, 3])), "n_entries"),
    "counts under topk": (_mutate(counts=np.ones((2, 3), np.uint16)), "counts"),
    "empty seq_id": (_mutate(seq_id=""), "seq_id"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_are_refused(tmp_path, case):
    mutate, word = BAD_INPUTS[case]
    with logitstore.CacheWriter(tmp_path / "c", vocab_size=10, rule=TopK(3)) as w:
        with pytest.raises(InvalidInputError, match=word):
            w.add(as_record(**mutate(_valid_kwargs())))
        assert w.add(as_record(**_valid_kwargs())) is True  # the writer is still usable, the bad sequence left no trace
    cache = logitstore.open(tmp_path / "c")
    assert [s.seq_id for s in cache] == ["valid"]
    assert read_manifest(tmp_path / "c")["duplicates_skipped"] == 0
    assert verify(tmp_path / "c") == []


def test_valid_inputs_are_accepted(tmp_path):
    """The base of the cases above is valid, and garbage beyond n_entries is ignored."""
    kw = _valid_kwargs()
    kw["n_entries"] = np.array([2, 3])
    kw["ids"][0, 2] = 99  # out of vocab, but padding
    kw["logprobs"][0, 2] = 5.0  # positive and unsorted, but padding
    kw["tail_mass"][0] = 1 - np.exp([-0.5, -1.5]).sum()
    with logitstore.CacheWriter(tmp_path / "c", vocab_size=10, rule=TopK(3), codec=Codec(values="fp32")) as w:
        assert w.add(as_record(**kw))
    s = logitstore.open(tmp_path / "c")["valid"]
    np.testing.assert_array_equal(s.ids, [[4, 2, -1], [7, 0, 1]])
    np.testing.assert_array_equal(s.logprobs, np.array([[-0.5, -1.5, -np.inf], [-0.3, -2.0, -3.0]], np.float32))


@pytest.mark.parametrize("case", ["missing", "shape", "zero on a valid entry"])
def test_sampled_counts_are_validated(tmp_path, case):
    kw = _valid_kwargs()
    good = np.array([[3, 2, 1], [5, 1, 1]], np.uint16)
    bad = {"missing": None, "shape": good[:, :2], "zero on a valid entry": np.array([[3, 0, 1], [5, 1, 1]])}
    kw["counts"] = bad[case]
    with logitstore.CacheWriter(tmp_path / "c", vocab_size=10, rule=Sampled(8)) as w:
        with pytest.raises(InvalidInputError, match="counts"):
            w.add(as_record(**kw))
        assert w.add(as_record(**(_valid_kwargs() | {"counts": good})))
    got = logitstore.open(tmp_path / "c")["valid"].counts  # padded to k = draws = 8 with 0
    np.testing.assert_array_equal(got, np.pad(good, ((0, 0), (0, 5))))


def test_duplicate_ids_in_a_position_are_refused(tmp_path):
    kw = _setitem("ids", (0, 1), 4)(_valid_kwargs())
    with logitstore.CacheWriter(tmp_path / "c", vocab_size=10, rule=TopK(3)) as w:
        with pytest.raises(InvalidInputError):
            w.add(as_record(**kw))


def test_counts_beyond_draws_are_refused(tmp_path):
    kw = _valid_kwargs() | {"counts": np.array([[6, 2, 1], [1, 1, 1]], np.uint16)}  # 9 > 8 draws
    with logitstore.CacheWriter(tmp_path / "c", vocab_size=10, rule=Sampled(8)) as w:
        with pytest.raises(InvalidInputError):
            w.add(as_record(**kw))


def test_bad_writer_arguments(tmp_path):
    for kw, word in ((dict(vocab_size=0), "vocab_size"), (dict(shard_bytes=0), "shard_bytes"),
                     (dict(row_group_positions=0), "row_group_positions")):
        with pytest.raises(InvalidInputError, match=word):
            logitstore.CacheWriter(tmp_path / "c", **({"vocab_size": 10, "rule": TopK(2)} | kw))


# ---------------------------------------------------------------- torch inputs


def test_torch_tensors_are_accepted(tmp_path):
    rng = np.random.default_rng(11)
    vocab, rule = 80, Sampled(20, 8)
    refs = make_sequences(rng, 4, vocab=vocab, rule=rule, min_tokens=2, max_tokens=15, subset=True, mask_prob=0.3)
    with logitstore.CacheWriter(tmp_path / "c", vocab_size=vocab, rule=rule) as w:
        for r in refs:
            kw = r.add_kwargs()
            kw = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                  for k, v in kw.items()}
            kw["logprobs"] = kw["logprobs"].float()  # float32, as a teacher gives them
            assert isinstance(kw["input_ids"], torch.Tensor) and kw["input_ids"].dtype == torch.int64
            assert w.add(as_record(**kw))
    _assert_cache_equals_refs(tmp_path / "c", refs, rule, Codec())


def test_bfloat16_torch_logprobs(tmp_path):
    """A bf16 tensor (no numpy dtype) is upcast exactly: the stored values are the bf16 values, quantised."""
    kw = _valid_kwargs()
    bf = torch.tensor([[-0.51, -1.53, -2.57], [-0.31, -2.03, -3.07]]).to(torch.bfloat16)  # not bf16-exact inputs
    assert not np.array_equal(bf.double().numpy(), np.array([[-0.51, -1.53, -2.57], [-0.31, -2.03, -3.07]]))
    kw["logprobs"] = bf
    kw["tail_mass"] = 1 - bf.double().exp().sum(1).numpy()
    with logitstore.CacheWriter(tmp_path / "c", vocab_size=10, rule=TopK(3), codec=Codec(values="fp32")) as w:
        w.add(as_record(**kw))
    s = logitstore.open(tmp_path / "c")["valid"]
    valid = np.isfinite(s.logprobs)
    want = bf.double().numpy()  # bf16 -> float64 is exact
    np.testing.assert_array_equal(s.logprobs[valid].astype(np.float64), want[valid])
    assert verify(tmp_path / "c") == []


# ---------------------------------------------------------------- reader


def test_iteration_order_and_sizes(ranked_cache):
    cache = logitstore.open(ranked_cache.path)
    refs = ranked_cache.refs
    assert len(cache) == len(refs)
    assert cache.num_positions == sum(r.n for r in refs)
    _assert_cache_equals_refs(ranked_cache.path, refs, ranked_cache.rule, ranked_cache.codec)


def test_random_access_by_seq_id(ranked_cache):
    cache = logitstore.open(ranked_cache.path)
    order = np.random.default_rng(0).permutation(len(ranked_cache.refs))
    for i in order:
        r = ranked_cache.refs[i]
        assert r.seq_id in cache
        assert_sequence_matches(cache[r.seq_id], r, ranked_cache.codec, ranked_cache.rule, ranked_cache.rule.k)


def test_iter_sequences_returns_exactly_the_subset(ranked_cache):
    cache = logitstore.open(ranked_cache.path)
    rng = np.random.default_rng(5)
    refs = ranked_cache.refs
    for size in (1, 5, len(refs) // 2, len(refs)):
        subset = [refs[i].seq_id for i in rng.choice(len(refs), size=size, replace=False)]
        got = list(cache.iter_sequences(seq_ids=subset))
        assert sorted(s.seq_id for s in got) == sorted(subset)
        for s in got:
            assert_sequence_matches(s, ranked_cache.by_id[s.seq_id], ranked_cache.codec, ranked_cache.rule,
                                    ranked_cache.rule.k)
    assert list(cache.iter_sequences(seq_ids=[])) == []


def test_unknown_seq_id_raises_keyerror(ranked_cache):
    cache = logitstore.open(ranked_cache.path)
    assert "no-such-id" not in cache
    with pytest.raises(KeyError, match="no-such-id"):
        cache["no-such-id"]
    with pytest.raises(KeyError):
        list(cache.iter_sequences(seq_ids=[ranked_cache.refs[0].seq_id, "no-such-id"]))


def test_scalars_reads_only_the_requested_columns(ranked_cache):
    cache = logitstore.open(ranked_cache.path)
    t = cache.scalars(["seq_id", "mean_entropy"])
    assert t.column_names == ["seq_id", "mean_entropy"]
    assert t.num_rows == len(ranked_cache.refs)
    got = dict(zip(t.column("seq_id").to_pylist(), t.column("mean_entropy").to_pylist()))
    for r in ranked_cache.refs:
        want = r.aggregates(ranked_cache.rule)[0]
        if want is None:
            assert got[r.seq_id] is None
        else:
            assert abs(got[r.seq_id] - want) <= 1e-5 * abs(want) + 1e-6
    full = cache.scalars()
    assert full.column_names == list(logitstore.format.SCALAR_COLUMNS)
    by_id = {row["seq_id"]: row for row in full.to_pylist()}
    for r in ranked_cache.refs:
        row = by_id[r.seq_id]
        assert row["n_tokens"] == r.input_ids.size and row["n_positions"] == r.n
        assert row["n_targets"] == int(r.loss_mask.sum()) and row["record"] == r.record
        assert row["correct"] == r.correct
    with pytest.raises(InvalidInputError, match="topk_codes"):
        cache.scalars(["seq_id", "topk_codes"])


def test_correct_and_mask_only_sequences(ranked_cache):
    cache = logitstore.open(ranked_cache.path)
    assert cache["seq-0006"].correct is True and cache["seq-0007"].correct is False
    assert cache["seq-0000"].correct is None
    s = cache["seq-0006"]  # every position masked out: no targets, NULL aggregates
    assert s.n_targets == 0 and s.n_positions == 8
    assert s.mean_entropy is None and s.teacher_nll is None and s.token_accuracy is None


def test_reading_does_not_import_torch(ranked_cache):
    code = ("import sys, logitstore; c = logitstore.open(sys.argv[1]); list(c); c.scalars(); "
            "c[next(iter(c.index))]; assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code, str(ranked_cache.path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr


def test_empty_cache(tmp_path):
    with logitstore.CacheWriter(tmp_path / "c", vocab_size=10, rule=TopK(2)):
        pass
    m = read_manifest(tmp_path / "c")
    assert m["complete"] is True and m["shards"] == []
    cache = logitstore.open(tmp_path / "c")
    assert len(cache) == 0 and list(cache) == [] and cache.num_positions == 0
    t = cache.scalars(["seq_id", "teacher_nll"])
    assert t.num_rows == 0 and t.column_names == ["seq_id", "teacher_nll"]
    assert verify(tmp_path / "c") == []


def test_open_missing_path(tmp_path):
    with pytest.raises(logitstore.CacheNotFoundError):
        logitstore.open(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError):
        logitstore.open(tmp_path / "nothing")


def test_the_writer_owns_its_buffer_when_the_caller_reuses_its_arrays(tmp_path):
    """A backend may fill the same output arrays for every sequence; what was added must not change."""
    rng = np.random.default_rng(5)
    vocab, k, n = 50, 4, 6
    tok = np.zeros(n + 1, np.int32)
    ids = np.zeros((n, k), np.int32)
    lps = np.zeros((n, k), np.float32)
    lab, ent, tail = np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)
    expected = []
    with logitstore.CacheWriter(tmp_path / "c", vocab_size=vocab, rule=TopK(k)) as w:
        for _ in range(3):
            lp = random_logprobs(rng, n, vocab)
            order = np.argsort(-lp, axis=1)[:, :k]
            tok[:] = rng.integers(0, vocab, n + 1)
            ids[:] = order
            lps[:] = np.take_along_axis(lp, order, 1)
            lab[:] = lp[np.arange(n), tok[1:]]
            ent[:] = entropy(lp)
            tail[:] = 1 - np.exp(lps.astype(np.float64)).sum(1)
            w.add(as_record(input_ids=tok, ids=ids, logprobs=lps, label_logprob=lab, entropy=ent, tail_mass=tail))
            expected.append((tok.copy(), ids.copy(), lps.copy(), ent.copy()))
        # the caller scribbles over its arrays
        tok[:] = 0
        ids[:] = 0
        lps[:] = -1.0
        ent[:] = 9.0
    got = list(logitstore.open(tmp_path / "c"))
    assert len(got) == 3
    for s, (t, i, lp_, e) in zip(got, expected):
        np.testing.assert_array_equal(s.input_ids, t)
        np.testing.assert_array_equal(s.ids, i)
        assert np.abs(s.logprobs - lp_).max() <= Codec().logprob_step / 2 + 1e-6
        np.testing.assert_allclose(s.entropy, e)


def test_a_value_the_codec_cannot_hold_is_refused_at_add_and_loses_nothing(tmp_path):
    """The qdelta range is checked when a sequence is added, so a later flush never drops accepted sequences."""
    rule = TopK(2)
    ok = dict(input_ids=np.array([1, 2, 3, 4]), ids=np.array([[1, 2]] * 3), logprobs=np.array([[-0.1, -3.0]] * 3),
              label_logprob=np.full(3, -1.0), entropy=np.ones(3), tail_mass=np.full(3, 0.05))
    bad = dict(ok, input_ids=np.array([5, 6, 7, 8]), logprobs=np.array([[-0.1, -3000.0]] * 3))
    with logitstore.CacheWriter(tmp_path / "c", vocab_size=10, rule=rule) as w:
        assert w.add(as_record(**ok))
        with pytest.raises(logitstore.InvalidInputError, match="qdelta"):
            w.add(as_record(**bad))
    cache = logitstore.open(tmp_path / "c")
    assert len(cache) == 1 and next(iter(cache)).input_ids.tolist() == [1, 2, 3, 4]
