"""A writer killed with SIGKILL (no cleanup runs) loses at most the shard in progress.

A child process writes deterministic sequences and is killed after its second shard
commit; the cache must then read back exactly the committed prefix, verify clean apart
from the interrupted shard's temporary file, and resume to the same content as an
uninterrupted write. Then the same child is killed a dozen times at random points (a
seeded RNG picks them), resumed each time, and read concurrently while it writes; and an
in-process writer is read between its commits.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow.parquet as pq

import logitstore
from logitstore.lock import LOCK_NAME
from logitstore.verify import verify
from tests.conftest import make_sequences, read_manifest

CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    import logitstore

    def sequences(n):
        rng = np.random.default_rng(0)
        for i in range(n):
            z = rng.standard_normal((20, 64)) * 3
            lp = z - np.log(np.exp(z).sum(1, keepdims=True))
            e = logitstore.sparsify(lp, logitstore.TopK(4))
            tok = rng.integers(0, 64, 21)
            yield logitstore.SequenceRecord(input_ids=tok, record=i, scored=logitstore.Scored.of(
                e, label_logprob=lp[np.arange(20), tok[1:]], entropy=-(np.exp(lp) * lp).sum(1)))

    path, resume, pause = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
    n, log = int(sys.argv[4]), (open(sys.argv[5], "a", buffering=1) if len(sys.argv) > 5 else None)
    with logitstore.CacheWriter(path, vocab_size=64, rule=logitstore.TopK(4), shard_bytes=12_000,
                                row_group_positions=100, resume=resume) as w:
        for s in sequences(n):
            sid = logitstore.sequence_id(s.input_ids)
            if sid in w.committed_ids:
                continue
            w.add(s)
            if log:
                log.write(sid + "\\n")  # one write per added sequence: the parent counts the work done
            if pause:
                time.sleep(pause)
""")


def run_child(path, resume, slow, n=60, log=None, pause=0.02):
    args = [str(path), "1" if resume else "0", str(pause if slow else 0), str(n)] + ([str(log)] if log else [])
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], env={**os.environ, "PYTHONPATH": os.getcwd()})


def content(path):
    return {s.seq_id: (s.record, s.input_ids.tolist(), s.ids.tolist(), s.logprobs.tolist(), s.entropy.tolist())
            for s in logitstore.open(path)}


def test_sigkill_loses_at_most_the_shard_in_progress_and_resume_completes(tmp_path):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert run_child(full, False, False).wait(timeout=120) == 0
    want = content(full)
    assert len(want) == 60

    child = run_child(crashed, False, True)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once two shards are committed and a third is being written
        try:
            m = logitstore.open(crashed).manifest
            if len(m.shards) >= 2 and any(p.name.endswith(".tmp") for p in (crashed / "shards").iterdir()):
                break
        except logitstore.LogitstoreError:
            pass  # not started yet: no manifest
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)

    cache = logitstore.open(crashed)
    assert not cache.manifest.complete and len(cache.manifest.shards) >= 2
    got = content(crashed)
    # exactly a prefix of the records, each identical to the uninterrupted write
    assert sorted(r for r, *_ in got.values()) == list(range(len(got)))
    assert all(got[k] == want[k] for k in got)
    # the only problem verify sees is the interrupted shard's temporary file
    problems = verify(crashed)
    assert problems and all(p.file.endswith(".tmp") and "interrupted" in p.message for p in problems)

    assert run_child(crashed, True, False).wait(timeout=120) == 0
    assert verify(crashed) == []
    assert content(crashed) == want
    assert logitstore.open(crashed).manifest.complete


# ---------------------------------------------------------------- many kills at random points


def _lines(path):
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


def _shards(path):
    try:
        return read_manifest(path)["shards"]
    except FileNotFoundError:
        return []


def _ids_in(path, shards):
    """seq ids in the listed shard files, read with pyarrow alone."""
    return {sid for s in shards for sid in pq.read_table(path / s["file"], columns=["seq_id"]).column(0).to_pylist()}


def _check_reader_during_build(path, want):
    """A reader opened while the child writes: exactly the sequences of the manifest it opened, each as in the
    uninterrupted write, however many shards the child commits meanwhile."""
    try:
        cache = logitstore.open(path)
    except logitstore.CacheNotFoundError:
        return 0  # the child has not written its first manifest yet
    snapshot = [{"file": s.file} for s in cache.manifest.shards]
    got = content_of(cache)
    assert got.keys() == _ids_in(path, snapshot)
    assert all(got[k] == want[k] for k in got)
    return 1


def content_of(cache):
    return {s.seq_id: (s.record, s.input_ids.tolist(), s.ids.tolist(), s.logprobs.tolist(), s.entropy.tolist())
            for s in cache}


def test_a_dozen_sigkills_at_random_points_then_resume_equals_an_uninterrupted_write(tmp_path):
    N, KILLS = 800, 12  # room for 12 kills of at most 2 shards of work each, and the delay after each target
    full = tmp_path / "full"
    assert run_child(full, False, False, n=N).wait(timeout=120) == 0
    want = content(full)
    assert len(want) == N
    per_shard = max(s.sequences for s in logitstore.open(full).manifest.shards)  # one shard of work
    rng = np.random.default_rng(20240607)
    path, log = tmp_path / "crashed", tmp_path / "added.log"
    kills = readers = 0
    done_before: set[str] = set()  # sequences some earlier run added (committed or not)
    repeated, lost = [], []
    for run in range(4 * KILLS):
        before, start = _shards(path), len(_lines(log))
        child = run_child(path, run > 0, True, n=N, log=log, pause=0.002)
        target, delay = start + int(rng.integers(1, 2 * per_shard)), float(rng.uniform(0, 0.03))
        while child.poll() is None and len(_lines(log)) < target:
            time.sleep(0.002)
        if child.poll() is None and kills < KILLS:
            # the reader checks the cache with the writer stopped mid-build (lock held, a shard in progress), so
            # how long the check takes on a loaded machine does not change how far this run gets
            child.send_signal(signal.SIGSTOP)
            try:
                readers += _check_reader_during_build(path, want)
            finally:
                child.send_signal(signal.SIGCONT)
            time.sleep(delay)  # the kill lands anywhere: in add, a row group write, a commit, a manifest write
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            kills += 1
        else:
            assert child.wait(timeout=120) == 0
        this_run = _lines(log)[start:]
        repeated.append(len(set(this_run) & done_before))
        done_before |= set(this_run)
        after = _shards(path)
        assert after[:len(before)] == before  # committed shards are never rewritten or dropped
        if child.returncode == 0 or read_manifest(path)["complete"]:  # done (perhaps killed while exiting)
            break
        lost.append(len(set(this_run) - _ids_in(path, after)))  # work of this run that the kill threw away
        if after:  # the committed prefix reads back exactly; only the interrupted shard is reported
            partial = logitstore.open(path)
            assert not partial.manifest.complete
            got = content_of(partial)
            assert all(got[k] == want[k] for k in got)
            assert all(p.file.startswith("shards/") and "not listed in the manifest" in p.message
                       for p in verify(path))
            lock = path / LOCK_NAME
            assert not lock.exists() or json.loads(lock.read_text())["pid"] == child.pid  # stale, taken over next
    assert kills == KILLS and readers >= KILLS // 2, (kills, readers)
    assert max(lost) <= per_shard and max(repeated) <= per_shard, (lost, repeated, per_shard)
    assert sum(repeated) == sum(lost)  # every sequence a kill lost was redone once, nothing else was
    final = logitstore.open(path)
    assert final.manifest.complete and final.manifest.sequences == N
    assert content(path) == want
    assert verify(path) == []
    assert [p for p in path.rglob("*") if p.name.endswith(".tmp") or "lock" in p.name] == []


# ---------------------------------------------------------------- readers during an in-process build


def test_a_reader_opened_during_a_build_sees_the_last_committed_manifest(tmp_path):
    rule = logitstore.TopK(5)
    refs = make_sequences(np.random.default_rng(11), 40, vocab=90, rule=rule, min_tokens=8, max_tokens=20)
    by_id = {r.seq_id: r for r in refs}
    path = tmp_path / "c"
    readers = []  # (reader, the seq ids its manifest lists, read independently)
    with logitstore.CacheWriter(path, vocab_size=90, rule=rule, codec=logitstore.Codec(values="fp32"),
                                shard_bytes=3000, row_group_positions=30) as w:
        for r in refs:
            w.add(r.to_record())
            n = len(w.manifest.shards)
            if n in (0, 1, 3) and len(readers) < 3 and (not readers or len(readers[-1][0].manifest.shards) < n):
                cache = logitstore.open(path)
                readers.append((cache, _ids_in(path, read_manifest(path)["shards"])))
        assert len(w.manifest.shards) > 4  # the readers' snapshots are well behind the writer
        for cache, ids in readers:  # read while the writer is still open, with a shard in progress
            got = list(cache)
            assert {s.seq_id for s in got} == ids and len(cache) == len(ids)
            for s in got:
                ref = by_id[s.seq_id]
                np.testing.assert_array_equal(s.input_ids, ref.input_ids)
                np.testing.assert_array_equal(s.ids, ref.ids)
                np.testing.assert_array_equal(s.logprobs, ref.logprobs)
            assert all(sid in cache for sid in ids) and not any(r.seq_id in cache for r in refs if r.seq_id not in ids)
    assert [len(ids) for _, ids in readers][0] == 0 and len({len(ids) for _, ids in readers}) == 3
