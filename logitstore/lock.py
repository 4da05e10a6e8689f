"""The build lock: one writer per cache directory, and a crashed writer never blocks the next one.

A ``CacheWriter`` holds ``CACHE/build.lock`` for its whole lifetime (a training run holds
``OUT/run.lock`` the same way: ``BuildLock(dir, name=..., holder="training run")``). The file is created
atomically (``O_CREAT | O_EXCL``: of two writers racing for it, exactly one succeeds) and
holds JSON ``{"pid", "host", "started", "command", "proc_start"}`` naming its holder; the
holder removes it on close and on failure. A writer that finds the file judges the holder:

- on this host and still running: refused with ``CacheLockedError`` naming the holder;
- on this host and gone (killed, crashed, power lost): the lock is *stale*; it is taken over
  with a logged warning, so resuming after a crash needs no manual step (takeovers are serialised by
  an ``flock`` on ``.build.lock.takeover`` beside it, so only the stale file is ever removed). "Gone" means no
  such pid, a zombie, or a pid reused by another process (``proc_start`` is the boot id and
  the process start time from ``/proc``, recorded where the platform has them);
- on another host: whether it still runs cannot be told from here, so refused with
  ``CacheLockedError``, whose message says to delete the file if no build runs there.

A lock file that does not parse (its writer died between creating and filling it) is stale
once it is older than ``TORN_GRACE_S``. Readers and ``verify`` ignore the lock: readers see
the last committed manifest whatever a writer is doing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from logitstore.errors import CacheLockedError

logger = logging.getLogger(__name__)

LOCK_NAME = "build.lock"
#: seconds after which an unparsable (torn) lock file counts as stale
TORN_GRACE_S = 5.0
_MAX_COMMAND = 400  # characters of the holder's command line kept in the lock


@dataclasses.dataclass(frozen=True)
class LockInfo:
    """Who holds a lock."""

    pid: int
    host: str
    started: str  # UTC, ISO 8601
    command: str
    proc_start: str | None = None  # "<boot id>:<start time in clock ticks>" where /proc has them

    def describe(self) -> str:
        return f"process {self.pid} on host {self.host}, started {self.started}, command: {self.command}"


def this_process() -> LockInfo:
    """The ``LockInfo`` of the calling process."""
    import datetime as _dt

    command = " ".join(shlex.quote(a) for a in ([sys.executable] + sys.argv if sys.argv and sys.argv[0] else
                                                   [sys.executable]))
    if len(command) > _MAX_COMMAND:
        command = command[:_MAX_COMMAND - 3] + "..."
    return LockInfo(pid=os.getpid(), host=socket.gethostname(),
                    started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    command=command, proc_start=_proc_start(os.getpid()))


def read_lock(cache_dir: str | os.PathLike, name: str = LOCK_NAME) -> LockInfo | None:
    """The holder recorded in ``cache_dir``'s lock file ``name``; None when there is none, it cannot be read or it
    does not parse."""
    try:
        return _parse((Path(cache_dir) / name).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def check_unlocked(cache_dir: str | os.PathLike, name: str = LOCK_NAME, holder: str = "build") -> None:
    """Raise ``CacheLockedError`` now if a live writer holds ``cache_dir`` (a stale lock passes).

    For callers that want to fail before expensive work (loading a teacher); the writer's own
    ``BuildLock.acquire`` is what actually excludes a second writer.
    """
    path = Path(cache_dir) / name
    info = read_lock(cache_dir, name)
    if info is not None and not _is_stale(info):
        raise CacheLockedError(_locked_message(path, info, holder))


class BuildLock:
    """The lock file ``name`` of one directory (a cache's ``build.lock`` by default; ``holder`` says in messages what
    holds it). ``acquire`` takes it (or raises), ``release`` gives it back."""

    def __init__(self, cache_dir: str | os.PathLike, *, name: str = LOCK_NAME, holder: str = "build",
                 timeout_s: float = 10.0):
        self.path = Path(cache_dir) / name
        self.holder = holder
        self.timeout_s = timeout_s  # how long to wait for a torn lock file to be completed or go stale
        self.held = False
        self._data = b""

    def __enter__(self) -> BuildLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Create the lock file, taking over a stale one; ``CacheLockedError`` if a live writer holds it."""
        if self.held:
            return
        me = this_process()
        data = json.dumps(dataclasses.asdict(me)).encode("utf-8")
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._judge_existing(deadline)  # raises if held; returns when worth another try
                continue
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            os.close(fd)
            self.held, self._data = True, data
            return

    def release(self) -> None:
        """Remove the lock file if it is still ours (idempotent)."""
        if not self.held:
            return
        self.held = False
        try:
            current = self.path.read_bytes()
        except FileNotFoundError:
            logger.warning("%s vanished while held; another process removed it", self.path)
            return
        if current == self._data:
            self.path.unlink(missing_ok=True)
        else:  # another writer judged us dead and took over: its lock is not ours to remove
            holder = _parse_or_none(current)
            logger.warning("%s is held by %s, not by this writer; leaving it", self.path,
                           holder.describe() if holder else "an unreadable holder")

    # ------------------------------------------------------------ internals
    def _judge_existing(self, deadline: float) -> None:
        try:
            raw = self.path.read_bytes()
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        except OSError as exc:  # a directory or an unreadable file under the lock's name
            raise CacheLockedError(f"{self.path}: cannot read this lock file ({exc.strerror or exc}); if no "
                                   f"{self.holder} of {self.path.parent} is running, remove it and rerun") from None
        info = _parse_or_none(raw)
        if info is None:
            age = time.time() - mtime
            if age < TORN_GRACE_S:
                if time.monotonic() > deadline:
                    raise CacheLockedError(
                        f"{self.path}: another writer is creating this lock file (unreadable, {age:.1f} s old); "
                        f"if no {self.holder} of {self.path.parent} is running, delete the file and rerun")
                time.sleep(0.05)  # a writer is between creating and filling it
                return
            logger.warning("taking over %s: its content is unreadable and %.0f s old (a writer died while "
                           "creating it)", self.path, age)
        elif not _is_stale(info):
            raise CacheLockedError(_locked_message(self.path, info, self.holder))
        else:
            logger.warning("taking over the stale %s lock %s: %s is gone (killed or crashed); it resumes from its "
                           "last commit", self.holder, self.path, info.describe())
        self._take_over(raw)

    def _take_over(self, raw: bytes) -> None:
        """Remove the stale lock ``raw`` if it is still the lock file; the caller's loop then races for a new one.

        Takeovers are serialised by an exclusive ``flock`` on a guard file beside the lock, so that a takeover
        never removes anything but the stale lock it judged: of writers that all read the same stale lock,
        the first removes it and one of them creates the next (``O_EXCL``); the others find that new lock
        under the guard, leave it, and judge it again. (Moving the lock aside first and putting it back when
        it was not the stale one left a moment without a lock file, in which a third writer could create its
        own: two holders.) A writer killed under the guard releases its ``flock`` with its death.
        """
        import fcntl

        guard = self.path.with_name(f".{self.path.name}.takeover")
        fd = os.open(guard, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # held for a read and an unlink only
            except OSError as exc:  # a filesystem without flock (ENOLCK, EOPNOTSUPP): no safe takeover here
                guard.unlink(missing_ok=True)  # no one can hold it here
                raise CacheLockedError(
                    f"{self.path}: its holder is gone, but this filesystem cannot lock {guard.name} "
                    f"({exc.strerror or exc}) to take it over safely; if no {self.holder} of {self.path.parent} "
                    f"is running, delete {self.path} and rerun") from None
            try:
                if not os.path.samestat(os.fstat(fd), os.stat(guard)):
                    return  # the guard was removed while we waited for it: try again with the current one
            except FileNotFoundError:
                return
            try:
                if self.path.read_bytes() == raw:  # still the stale lock: no live writer can change it meanwhile
                    self.path.unlink()
            except FileNotFoundError:
                pass
            guard.unlink(missing_ok=True)  # under the flock, so no one else holds this guard
        finally:
            os.close(fd)


def _parse(raw: bytes) -> LockInfo:
    d = json.loads(raw.decode("utf-8"))
    if not isinstance(d, dict) or not isinstance(d.get("pid"), int) or not isinstance(d.get("host"), str):
        raise ValueError("not a lock record")
    return LockInfo(pid=d["pid"], host=d["host"], started=str(d.get("started", "?")),
                    command=str(d.get("command", "?")), proc_start=d.get("proc_start"))


def _parse_or_none(raw: bytes) -> LockInfo | None:
    try:
        return _parse(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def _locked_message(path: Path, info: LockInfo, holder: str = "build") -> str:
    d = path.parent
    if info.host != socket.gethostname():
        return (f"{d} is locked by another {holder}: {info.describe()}. This host ({socket.gethostname()}) cannot "
                f"tell whether it still runs; if no {holder} of {d} runs there, delete {path} and rerun "
                "(with --resume to continue it)")
    return (f"{d} is being written by another {holder}: {info.describe()}. Wait for it to finish or stop it, "
            f"then rerun with --resume (the lock of a killed {holder} is taken over automatically)")


def _is_stale(info: LockInfo) -> bool:
    """True when the holder is on this host and no longer runs."""
    if info.host != socket.gethostname():
        return False
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # a process of another user has this pid: judge it by /proc
    except OverflowError:
        return True  # not a pid of this system
    now = _proc_start(info.pid, with_state=True)
    if now is None:
        return False  # no /proc: the pid exists, assume it is the holder
    state, start = now
    if state in ("gone", "Z"):
        return True  # exited meanwhile, or dead and waiting to be reaped by its parent
    return info.proc_start is not None and start != info.proc_start  # the pid now belongs to another process


def _proc_start(pid: int, with_state: bool = False):
    """``"<boot id>:<start ticks>"`` of a process from /proc (with its state letter if asked); None without
    /proc; under ``with_state``, ``("gone", None)`` when /proc exists but has no such process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ("gone", None) if with_state else None
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    start = f"{boot}:{fields[19]}"  # field 22 of proc(5); fields[0] is field 3 (state)
    return (fields[0], start) if with_state else start
