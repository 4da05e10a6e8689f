"""The build lock: a second writer is refused naming the holder, a dead holder's lock is taken over, the lock
lives exactly as long as its writer, and readers and ``verify`` ignore it.

Holders are real processes (this one, a child that keeps a writer open, a child killed with SIGKILL, a zombie);
the expected pid, host and start time are read from the operating system and the lock file, not from the code
under test.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import logitstore
from logitstore import TopK
from logitstore.errors import CacheLockedError, LogitstoreError
from logitstore.lock import LOCK_NAME, TORN_GRACE_S, BuildLock
from logitstore.verify import verify
from tests.conftest import make_sequences, write_cache
from tools.cli import main

VOCAB, RULE = 60, TopK(4)
ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


@pytest.fixture(scope="module")
def refs():
    return make_sequences(np.random.default_rng(3), 8, vocab=VOCAB, rule=RULE, min_tokens=3, max_tokens=12)


def _writer(path, **kw):
    return logitstore.CacheWriter(path, vocab_size=VOCAB, rule=RULE, **kw)


def _decoded(path):
    return {s.seq_id: (s.input_ids.tolist(), s.ids.tolist(), s.logprobs.tolist()) for s in logitstore.open(path)}


def _write_lock(path, **fields):
    path.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2020-01-01T00:00:00+00:00",
              "command": "logitstore build T D -o C", "proc_start": None} | fields
    (path / LOCK_NAME).write_text(json.dumps(record))
    return record


# ---------------------------------------------------------------- one writer at a time


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path, refs):
    path = tmp_path / "c"
    with _writer(path) as w:
        w.add(refs[0].to_record())
        held = json.loads((path / LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        assert held["command"].startswith(sys.executable)
        for resume in (False, True):  # with or without resume: the build in progress is what is reported
            with pytest.raises(CacheLockedError) as info:
                _writer(path, resume=resume).open()
            msg = str(info.value)
            assert isinstance(info.value, LogitstoreError) and isinstance(info.value, RuntimeError)
            assert "\n" not in msg
            for part in (f"process {os.getpid()}", f"host {socket.gethostname()}", held["started"], "--resume",
                         held["command"][:40]):
                assert part in msg, (part, msg)
        assert json.loads((path / LOCK_NAME).read_text()) == held  # the refused writer left the lock alone
    assert not (path / LOCK_NAME).exists()  # released on close
    with _writer(path, resume=True) as w:  # and then the cache can be continued
        w.add(refs[1].to_record())
    assert len(logitstore.open(path)) == 2


def test_the_lock_is_released_on_exceptions_and_refusals(tmp_path, refs):
    path = tmp_path / "c"
    with pytest.raises(RuntimeError, match="boom"):
        with _writer(path, shard_bytes=1) as w:
            w.add(refs[0].to_record())
            w.close()  # commit one shard, then fail
            raise RuntimeError("boom")
    assert not (path / LOCK_NAME).exists()
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with pytest.raises(logitstore.InvalidInputError, match="cannot resume"):  # refused resume: another rule
        logitstore.CacheWriter(path, vocab_size=VOCAB, rule=TopK(3), resume=True).open()
    with pytest.raises(logitstore.CacheExistsError):  # refused: exists, no resume
        _writer(path).open()
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before  # no lock left behind


def test_a_writer_that_created_the_directory_and_committed_nothing_removes_it(tmp_path, refs):
    path = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with _writer(path) as w:
            w.add(refs[0].to_record())
            raise RuntimeError("before the first commit")
    assert not path.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        with _writer(existing) as w:
            raise RuntimeError("x")
    assert existing.is_dir() and not (existing / LOCK_NAME).exists()  # not ours to remove


HOLDER = textwrap.dedent("""
    import sys, time
    import logitstore
    w = logitstore.CacheWriter(sys.argv[1], vocab_size=60, rule=logitstore.TopK(4), resume=True)
    w.open()
    print("open", flush=True)
    time.sleep(120)
""")


def _holder(path):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "open"
    return p


def test_a_live_holder_in_another_process_then_its_stale_lock_after_sigkill(tmp_path, refs, caplog):
    path = tmp_path / "c"
    write_cache(path, refs[:3], vocab=VOCAB, rule=RULE)
    child = _holder(path)
    try:
        with pytest.raises(CacheLockedError, match=f"process {child.pid} on host {socket.gethostname()}"):
            _writer(path, resume=True).open()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    stale = json.loads((path / LOCK_NAME).read_text())
    assert stale["pid"] == child.pid  # a killed holder cannot clean up: its lock stays, stale
    caplog.set_level(logging.WARNING, logger="logitstore.lock")
    with _writer(path, resume=True) as w:  # taken over, with a warning naming the dead holder
        assert json.loads((path / LOCK_NAME).read_text())["pid"] == os.getpid()
        w.add(refs[3].to_record())
    assert any("stale" in r.getMessage() and f"process {child.pid}" in r.getMessage() for r in caplog.records)
    assert not (path / LOCK_NAME).exists()
    assert len(logitstore.open(path)) == 4 and verify(path) == []


def test_cli_build_names_the_holder_before_loading_the_teacher(tmp_path, capsys):
    """The refusal comes before the teacher loads (this teacher path does not even exist), and the refused
    build removes nothing of the running one's directory."""
    path = tmp_path / "c"
    child = _holder(path)
    try:
        (tmp_path / "d.jsonl").write_text('{"text": "hello there"}\n')
        assert main(["build", str(tmp_path / "no-such-teacher"), str(tmp_path / "d.jsonl"), "-o", str(path),
                     "--top-k", "4", "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"process {child.pid}" in err and "being written by another build" in err
        assert (path / LOCK_NAME).exists() and (path / "manifest.json").exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)


# ---------------------------------------------------------------- judging a lock file


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_locks_are_taken_over(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="logitstore.lock")
    cases = {
        "dead pid": dict(pid=_dead_pid()),
        "pid reused by another process": dict(pid=os.getpid(), proc_start="another-boot:12345"),
    }
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    zombie.send_signal(signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline and open(f"/proc/{zombie.pid}/stat").read().split(") ")[1][0] != "Z":
        time.sleep(0.01)
    cases["zombie (killed, not yet reaped)"] = dict(pid=zombie.pid)
    try:
        for name, fields in cases.items():
            path = tmp_path / name.replace(" ", "_")
            _write_lock(path, **fields)
            lock = BuildLock(path)
            lock.acquire()
            assert json.loads((path / LOCK_NAME).read_text())["pid"] == os.getpid(), name
            lock.release()
            assert not (path / LOCK_NAME).exists(), name
    finally:
        zombie.wait()
    assert sum("taking over the stale build lock" in r.getMessage() for r in caplog.records) == len(cases)


def test_live_or_foreign_holders_are_refused_and_left_alone(tmp_path):
    from logitstore.lock import _proc_start

    cases = {
        "this process": dict(pid=os.getpid(), proc_start=_proc_start(os.getpid())),
        "live, no start time recorded": dict(pid=os.getppid()),
        "another host": dict(pid=_dead_pid(), host="elsewhere.example"),
    }
    for name, fields in cases.items():
        path = tmp_path / name.replace(" ", "_").replace(",", "")
        record = _write_lock(path, **fields)
        with pytest.raises(CacheLockedError) as info:
            BuildLock(path).acquire()
        msg = str(info.value)
        assert f"process {record['pid']} on host {record['host']}" in msg and record["started"] in msg, name
        assert record["command"] in msg
        if record["host"] != socket.gethostname():
            assert "cannot tell whether it still runs" in msg and f"delete {path / LOCK_NAME}" in msg
        assert json.loads((path / LOCK_NAME).read_text()) == record, name


def test_a_torn_lock_file_waits_then_goes_stale(tmp_path):
    path = tmp_path / "c"
    path.mkdir()
    (path / LOCK_NAME).write_bytes(b'{"pid": 12')  # a holder died between creating and filling it
    t0 = time.monotonic()
    with pytest.raises(CacheLockedError, match="unreadable"):
        BuildLock(path, timeout_s=0.3).acquire()  # fresh: perhaps being written right now
    assert 0.3 <= time.monotonic() - t0 < 5
    old = time.time() - TORN_GRACE_S - 1
    os.utime(path / LOCK_NAME, (old, old))
    lock = BuildLock(path, timeout_s=0.3)
    lock.acquire()
    assert json.loads((path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_taken_over_by_another_writer_is_not_released_by_the_old_holder(tmp_path):
    path = tmp_path / "c"
    path.mkdir()
    lock = BuildLock(path)
    lock.acquire()
    record = _write_lock(path, pid=_dead_pid())  # as if another writer had replaced it
    lock.release()
    assert json.loads((path / LOCK_NAME).read_text()) == record


CREATOR = textwrap.dedent("""
    import os, sys, time
    path, end = sys.argv[1], time.time() + float(sys.argv[2])
    print("ready", flush=True)
    while time.time() < end:  # a third writer that keeps trying to create the lock file
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            continue
        print("created", flush=True)
        break
    print("done", flush=True)
""")


def test_a_takeover_judged_on_an_old_stale_lock_never_lets_a_third_writer_in(tmp_path):
    # Writers B and C read the same stale lock; B took it over and holds the new one; C, slower, now takes over
    # what it judged, again and again, while a third writer keeps trying O_EXCL. The old code moved B's lock aside
    # and put it back, and in that moment the third writer created its own (two holders): this caught it within
    # about 2,000 of its tries.
    path = tmp_path / "c"
    stale = _write_lock(path, pid=_dead_pid())
    raw = (path / LOCK_NAME).read_bytes()
    b = BuildLock(path)
    b.acquire()
    held = (path / LOCK_NAME).read_bytes()
    assert json.loads(held)["pid"] == os.getpid() and json.loads(raw) == stale
    third = subprocess.Popen([sys.executable, "-c", CREATOR, str(path / LOCK_NAME), "1.5"], stdout=subprocess.PIPE,
                             text=True)
    assert third.stdout.readline().strip() == "ready"
    slow_c, takeovers = BuildLock(path), 0
    while third.poll() is None:
        slow_c._take_over(raw)
        takeovers += 1
    assert third.stdout.read().split() == ["done"] and takeovers > 100
    assert (path / LOCK_NAME).read_bytes() == held
    with pytest.raises(CacheLockedError, match=f"process {os.getpid()} on host"):
        BuildLock(path).acquire()
    b.release()
    assert [p.name for p in path.iterdir()] == []


GUARD_HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("guarding", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def test_takeovers_wait_for_the_guard_and_a_killed_guard_holder_blocks_nothing(tmp_path):
    path = tmp_path / "c"
    _write_lock(path, pid=_dead_pid())
    guard = path / f".{LOCK_NAME}.takeover"
    holder = subprocess.Popen([sys.executable, "-c", GUARD_HOLDER, str(guard), "1.0"], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "guarding"
    t0 = time.monotonic()
    lock = BuildLock(path)
    lock.acquire()  # waits for the guard holder to finish, then takes the stale lock over
    assert holder.wait(timeout=30) == 0 and time.monotonic() - t0 >= 0.5
    assert json.loads((path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert [p.name for p in path.iterdir()] == []

    _write_lock(path, pid=_dead_pid())
    killed = subprocess.Popen([sys.executable, "-c", GUARD_HOLDER, str(guard), "60"], stdout=subprocess.PIPE,
                              text=True)
    assert killed.stdout.readline().strip() == "guarding"
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert guard.exists()  # left behind, without its flock
    lock = BuildLock(path)
    lock.acquire()
    lock.release()
    assert [p.name for p in path.iterdir()] == []


def test_a_filesystem_without_flock_refuses_the_takeover_with_one_line(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    path = tmp_path / "c"
    record = _write_lock(path, pid=_dead_pid())
    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(CacheLockedError) as info:
        BuildLock(path).acquire()
    msg = str(info.value)
    assert "\n" not in msg and "cannot lock .build.lock.takeover" in msg and f"delete {path / LOCK_NAME}" in msg
    assert json.loads((path / LOCK_NAME).read_text()) == record  # the stale lock is left as it was
    assert [p.name for p in path.iterdir()] == [LOCK_NAME]


RACER = textwrap.dedent("""
    import os, sys, time
    from logitstore.lock import BuildLock
    from logitstore.errors import CacheLockedError
    path, go, done = sys.argv[1:4]
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    lock = BuildLock(path)
    try:
        lock.acquire()
    except CacheLockedError:
        print("refused", flush=True)
        sys.exit(0)
    print("held", flush=True)
    while not os.path.exists(done):  # hold it until every racer has had its try
        time.sleep(0.01)
    lock.release()
""")


@pytest.mark.parametrize("start", ["free", "stale"])
def test_racing_writers_exactly_one_wins(tmp_path, start):
    path = tmp_path / "c"
    path.mkdir()
    if start == "stale":
        _write_lock(path, pid=_dead_pid())
    go, done = tmp_path / "go", tmp_path / "done"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(path), str(go), str(done)], env=ENV,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 4  # all at the starting line
    go.touch()
    outcomes = sorted(p.stdout.readline().strip() for p in procs)
    done.touch()
    for p in procs:
        assert p.wait(timeout=60) == 0
    assert outcomes == ["held", "refused", "refused", "refused"]
    assert [p.name for p in path.iterdir()] == []  # released, and no takeover leftovers


# ---------------------------------------------------------------- readers and verify ignore the lock


def test_readers_and_verify_ignore_the_lock(tmp_path, refs, capsys):
    path = tmp_path / "c"
    write_cache(path, refs, vocab=VOCAB, rule=RULE, shard_bytes=2000)
    want = _decoded(path)
    with _writer(path, resume=True):  # a live writer holds the lock (nothing in progress)
        assert (path / LOCK_NAME).exists()
        assert verify(path) == []
        assert main(["verify", str(path), "-q"]) == 0
        assert _decoded(path) == want
        capsys.readouterr()
        assert main(["info", str(path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["sequences"] == len(refs)
