"""Disk full and I/O errors while a cache is written: the last committed manifest stays valid, nothing
half-written is left, the error is a one-line ``CacheWriteError`` that says how to go on, and a resume
completes to exactly what an uninterrupted write gives.

Faults are injected at the lowest level the writer reaches (pyarrow's ``ParquetWriter.write_table`` and
``close``, ``os.fsync``, ``os.replace``), after two shards are committed and a third is in progress.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import logitstore
from logitstore import MassTopK
from logitstore.errors import CacheWriteError, LogitstoreError
from logitstore.lock import LOCK_NAME
from logitstore.verify import verify
from tests.conftest import make_sequences, read_manifest, write_cache

VOCAB, RULE = 300, MassTopK(0.9, 10)
WRITER = dict(shard_bytes=5000, row_group_positions=30)


@pytest.fixture(scope="module")
def refs():
    return make_sequences(np.random.default_rng(31), 36, vocab=VOCAB, rule=RULE, min_tokens=6, max_tokens=24,
                          mask_prob=0.2)


@pytest.fixture(scope="module")
def reference(refs, tmp_path_factory):
    """The decoded content of an uninterrupted write."""
    path = tmp_path_factory.mktemp("ref") / "c"
    write_cache(path, refs, vocab=VOCAB, rule=RULE, **WRITER)
    return decoded(path)


def decoded(path):
    return {s.seq_id: tuple(np.asarray(getattr(s, f)).tolist() for f in
                            ("input_ids", "pos", "loss_mask", "ids", "logprobs", "label_logprob", "entropy",
                             "tail_mass")) + (s.record, s.mean_entropy, s.teacher_nll, s.token_accuracy)
            for s in logitstore.open(path)}


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class Fault:
    """Replaces ``owner.attr`` with a version that raises ``OSError(code)`` on its first call, once armed, whose
    ``when(*args)`` holds."""

    def __init__(self, monkeypatch, owner, attr, code, when=lambda *a: True):
        self.armed = self.fired = False
        real = getattr(owner, attr)

        def failing(*args, **kwargs):
            if self.armed and not self.fired and when(*args):
                self.fired = True
                raise OSError(code, os.strerror(code))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, attr, failing)


FAULTS = {  # name -> (owner, attribute, errno, condition on the call's arguments)
    "row group write, mid-shard": (pq.ParquetWriter, "write_table", errno.ENOSPC, lambda *a: True),
    "shard footer on close": (pq.ParquetWriter, "close", errno.ENOSPC, lambda *a: True),
    "shard fsync": (os, "fsync", errno.EIO, lambda fd: ".shard-" in _fd_path(fd)),
    "manifest write (after the shard rename)": (os, "fsync", errno.ENOSPC,
                                                lambda fd: _fd_path(fd).endswith(".manifest.json.tmp")),
    "manifest rename": (os, "replace", errno.EIO, lambda src, dst: str(dst).endswith("manifest.json")),
    "shards/ fsync after the shard rename": (os, "fsync", errno.EIO, lambda fd: _fd_path(fd).endswith("/shards")),
    "cache dir fsync after the manifest rename": (os, "fsync", errno.EIO,
                                                  lambda fd: os.path.isdir(_fd_path(fd))
                                                  and not _fd_path(fd).endswith("/shards")),
}


def _leftovers(path: Path) -> list[str]:
    return [p.name for p in path.rglob("*") if p.name.endswith(".tmp") or p.name == LOCK_NAME]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_write_failure_leaves_the_last_commit_and_a_resume_completes(tmp_path, refs, reference, monkeypatch,
                                                                       fault):
    owner, attr, code, when = FAULTS[fault]
    f = Fault(monkeypatch, owner, attr, code, when)
    path = tmp_path / "c"
    with pytest.raises(CacheWriteError) as info:
        with logitstore.CacheWriter(path, vocab_size=VOCAB, rule=RULE, **WRITER) as w:
            for r in refs:
                w.add(r.to_record())
                if len(w.manifest.shards) >= 2 and list((path / "shards").glob(".*.tmp")):
                    f.armed = True
    assert f.fired
    monkeypatch.undo()
    err = info.value
    assert isinstance(err, LogitstoreError) and isinstance(err, OSError) and err.errno == code
    msg = str(err)
    assert "\n" not in msg and str(path) in msg and os.strerror(code) in msg
    assert "resumable" in msg and "--resume" in msg
    # the cache on disk: its last committed manifest, every listed shard sound, nothing else
    m = read_manifest(path)
    assert m["complete"] is False and len(m["shards"]) >= 2
    assert verify(path) == [] and _leftovers(path) == []
    got = decoded(path)
    n = sum(s["sequences"] for s in m["shards"])
    assert list(got) == [r.seq_id for r in refs[:n]]  # a prefix, in order
    assert all(got[k] == reference[k] for k in got)
    # resume: the same content as an uninterrupted write
    with logitstore.CacheWriter(path, vocab_size=VOCAB, rule=RULE, resume=True, **WRITER) as w:
        for r in refs:
            if r.seq_id not in w.committed_ids:
                w.add(r.to_record())
    assert decoded(path) == reference
    assert verify(path) == [] and _leftovers(path) == [] and read_manifest(path)["complete"] is True


def test_a_failure_before_the_first_commit_leaves_nothing(tmp_path, refs, monkeypatch):
    f = Fault(monkeypatch, pq.ParquetWriter, "write_table", errno.ENOSPC)
    f.armed = True
    path = tmp_path / "new"
    with pytest.raises(CacheWriteError, match="nothing was committed"):
        with logitstore.CacheWriter(path, vocab_size=VOCAB, rule=RULE, **WRITER) as w:
            for r in refs:
                w.add(r.to_record())
    assert f.fired and not path.exists()


def test_a_failure_while_opening_a_resume_changes_nothing(tmp_path, refs, monkeypatch):
    path = tmp_path / "c"
    write_cache(path, refs[:10], vocab=VOCAB, rule=RULE, **WRITER)
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    f = Fault(monkeypatch, os, "replace", errno.ENOSPC, lambda src, dst: str(dst).endswith("manifest.json"))
    f.armed = True
    with pytest.raises(CacheWriteError, match="opening the cache failed"):
        logitstore.CacheWriter(path, vocab_size=VOCAB, rule=RULE, resume=True, **WRITER).open()
    assert f.fired
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before  # no lock, no temporary file


# ---------------------------------------------------------------- through the command line


def _jsonl(path, n):
    words = "teacher student cache token logit entropy shard manifest parquet query".split()
    rng = np.random.default_rng(5)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(8, 24))))}) + "\n"
                            for _ in range(n)))
    return path


def test_cli_build_on_a_full_disk_then_resume(tiny_teacher, tmp_path, monkeypatch, capsys):
    from tools.cli import main

    data = _jsonl(tmp_path / "d.jsonl", 40)
    args = ["build", str(tiny_teacher), str(data), "--top-k", "4", "--values", "fp32", "-q", "--shard-mb", "0.004",
            "--row-group-positions", "60", "--token-budget", "512"]
    assert main(args + ["-o", str(tmp_path / "ref")]) == 0
    want = decoded(tmp_path / "ref")
    calls = {"n": 0}
    real = pq.ParquetWriter.write_table

    def write_table(self, *a, **kw):  # the disk fills up at the 7th row group
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *a, **kw)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_table)
    out = tmp_path / "c"
    capsys.readouterr()
    assert main(args + ["-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers may draw a loading bar before it)
    assert err.startswith("logitstore build: ") and "No space left on device" in err and "--resume" in err
    m = read_manifest(out)
    assert 0 < len(m["shards"]) and not m["complete"] and verify(out) == [] and _leftovers(out) == []
    monkeypatch.undo()
    assert main(args + ["-o", str(out), "--resume"]) == 0
    assert verify(out) == [] and _leftovers(out) == []
    assert_same_build(decoded(out), want)


def assert_same_build(got, want):
    """Two builds of the same data: the same sequences, tokens and positions; teacher values equal up to the float
    noise of different batch compositions (a resume batches the remaining records differently)."""
    assert got.keys() == want.keys()
    for k in want:
        assert got[k][:3] == want[k][:3]  # input_ids, pos, loss_mask
        for i in (4, 5, 6, 7):  # logprobs, label_logprob, entropy, tail_mass
            np.testing.assert_allclose(np.array(got[k][i], float), np.array(want[k][i], float), atol=1e-4)
        lp = np.array(want[k][4])
        clear = (np.diff(lp, axis=1) < -1e-3).all(axis=1)  # positions without near-ties: the same ids
        np.testing.assert_array_equal(np.array(got[k][3])[clear], np.array(want[k][3])[clear])
