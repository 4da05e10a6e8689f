"""Caches in object stores (``s3://bucket/prefix``, ``gs://bucket/prefix``): the one filesystem layer.

Every remote byte goes through fsspec (``s3fs`` for S3 and S3-compatible stores, ``gcsfs`` for GCS). fsspec,
not ``pyarrow.fs``, because it is the one layer all three consumers of a remote cache can share: DuckDB takes an
fsspec filesystem as its own (``register_filesystem``), so ``sql`` reads shards by range requests without a
download and without DuckDB's ``httpfs`` extension (which it would fetch from the network); s3fs offers S3's
conditional create (``If-None-Match: *``) that the build lock needs and pyarrow's S3 filesystem does not expose;
and pyarrow reads an fsspec file directly. Endpoint and credentials come from the standard variables
(``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, profiles; for GCS ``GOOGLE_APPLICATION_CREDENTIALS`` and ``STORAGE_EMULATOR_HOST``).

Reading (``Mirror``). A remote cache is read through a local directory that looks like a cache: the manifest
and the id map are downloaded on open (the manifest is the commit, read once), the shards on first use, whole,
into a bounded disk cache shared by every process of the user (``LOGITSTORE_CACHE_DIR``, default
``~/.cache/logitstore/remote``; ``LOGITSTORE_CACHE_LIMIT``, default 20G). A shard's local name holds its
manifest checksum, so a rebuilt cache under the same URL never reuses a stale copy. A process reading a shard
holds a shared ``flock`` on it; eviction (least recently used first) deletes only a file whose exclusive
lock it gets, so a shard being read is never deleted (MosaicML streaming #988). ``prefetch`` downloads the
next shards on background threads.

Writing (``RemoteTarget``). A writer stages each shard in a local directory, uploads it whole under its final
name (an object appears only when its upload completes), then uploads the manifest as one object: the
manifest stays the commit, so a crash loses at most the shard in progress and a reader never sees a half-written
cache. The build lock is an object created with ``If-None-Match: *`` (``RemoteLock``); a store that does not
support conditional creates is refused unless the lock is turned off (``--no-lock``).

Errors (unreachable endpoint, no credentials, no such bucket, access denied) become one ``RemoteStoreError``
line naming the URL and what to fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from logitstore import format as F
from logitstore.errors import CacheLockedError, InvalidInputError, LogitstoreError

logger = logging.getLogger(__name__)

SCHEMES = ("s3", "gs", "gcs")
LOCK_OBJECT = "build.lock"
DEFAULT_LIMIT = 20 << 30
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class RemoteStoreError(LogitstoreError, OSError):
    """An object store could not be reached or used (endpoint, credentials, bucket, permissions)."""


def is_remote(path) -> bool:
    """Whether ``path`` is an object-store URL (``s3://``, ``gs://``, ``gcs://``)."""
    return isinstance(path, str) and re.match(r"^(s3|gs|gcs)://", path) is not None


def split_url(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket, key prefix)`` of ``url``; ``InvalidInputError`` without a bucket."""
    m = re.match(r"^(s3|gs|gcs)://([^/]+)(?:/(.*))?$", url)
    if m is None or not m.group(2):
        raise InvalidInputError(f"{url!r}: an object-store URL is s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    return m.group(1), m.group(2), (m.group(3) or "").strip("/")


def endpoint() -> str | None:
    """The S3 endpoint from the environment (None: the AWS default)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(url: str):
    """The fsspec filesystem for ``url``'s scheme, configured from the environment."""
    scheme, _, _ = split_url(url)
    if scheme == "s3":
        try:
            import s3fs
        except ImportError:
            raise InvalidInputError(f"{url}: s3:// caches need s3fs: pip install 'logitstore[remote]'") from None
        # a dead endpoint fails within seconds, not after botocore's long default retries
        cfg = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
        return s3fs.S3FileSystem(endpoint_url=endpoint(), config_kwargs=cfg)
    try:
        import gcsfs
    except ImportError:
        raise InvalidInputError(f"{url}: gs:// caches need gcsfs: pip install gcsfs") from None
    return gcsfs.GCSFileSystem()


def _bare(url: str) -> str:
    """``bucket/key`` as fsspec names it."""
    _, bucket, key = split_url(url)
    return f"{bucket}/{key}" if key else bucket


@contextlib.contextmanager
def translated(url: str, doing: str, fs=None) -> Iterator[None]:
    """Turn the store's exceptions while ``doing`` something with ``url`` into one ``RemoteStoreError`` line."""
    try:
        yield
    except (LogitstoreError, FileExistsError):  # FileExistsError: a conditional create refused (RemoteLock)
        raise
    except FileNotFoundError as exc:
        raise RemoteStoreError(_missing(url, doing, fs, exc)) from None
    except PermissionError as exc:
        raise RemoteStoreError(f"{url}: {doing}: access denied ({_short(exc)}); check AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY (or the profile) and the bucket's permissions") from None
    except Exception as exc:  # botocore/aiohttp errors have no common base class worth naming
        name = type(exc).__name__
        text = _short(exc)
        if name == "NoCredentialsError" or "Unable to locate credentials" in text:
            raise RemoteStoreError(f"{url}: {doing}: no credentials found; set AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
        if any(w in name for w in ("Connect", "Endpoint", "Timeout")) or "Could not connect" in text \
                or "Cannot connect" in text:
            where = endpoint() or "the AWS default endpoint"
            raise RemoteStoreError(f"{url}: {doing}: cannot reach the object store at {where} ({text}); check "
                                   "AWS_ENDPOINT_URL and the network") from None
        if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _STORE_MODULES:
            raise RemoteStoreError(f"{url}: {doing} failed ({name}: {text})") from None
        raise


_STORE_MODULES = {"botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google"}


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _bucket_exists(fs, url: str) -> bool:
    """Whether ``url``'s bucket exists (True when that cannot be told: the question only picks a message)."""
    try:
        fs.invalidate_cache()
        return bool(fs.exists(split_url(url)[1]))
    except Exception:  # noqa: BLE001 - any failure here leaves the caller's own error to report
        return True


def require_bucket(fs, url: str) -> None:
    """``RemoteStoreError`` (one line) unless ``url``'s bucket exists and can be reached."""
    with translated(url, "opening the bucket", fs):
        fs.invalidate_cache()
        if not fs.exists(split_url(url)[1]):
            raise RemoteStoreError(_missing(url, "opening the bucket", fs, FileNotFoundError()))


def _missing(url: str, doing: str, fs, exc: BaseException) -> str:
    _, bucket, _ = split_url(url)
    if fs is not None:
        if not _bucket_exists(fs, url):
            return f"{url}: {doing}: bucket {bucket!r} does not exist at {endpoint() or 'the AWS default endpoint'}; " \
                   "create it first, or check the URL and AWS_ENDPOINT_URL"
    return f"{url}: {doing}: not found ({_short(exc)})"


def parse_size(text: str) -> int:
    """``"20G"``, ``"512M"``, ``"1000000"`` -> bytes."""
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", str(text), re.IGNORECASE)
    if m is None:
        raise InvalidInputError(f"cache limit {text!r}: give bytes, or a number with K, M, G or T (e.g. 20G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def cache_root() -> Path:
    return Path(os.environ.get("LOGITSTORE_CACHE_DIR") or Path.home() / ".cache" / "logitstore" / "remote")


def cache_limit() -> int:
    v = os.environ.get("LOGITSTORE_CACHE_LIMIT")
    return DEFAULT_LIMIT if not v else parse_size(v)


def configure(cache_dir: str | None = None, limit: str | None = None) -> None:
    """Set the disk cache of this process and the processes it starts (DataLoader workers, distill rounds)."""
    if cache_dir:
        os.environ["LOGITSTORE_CACHE_DIR"] = str(Path(cache_dir).expanduser().resolve())
    if limit:
        parse_size(limit)
        os.environ["LOGITSTORE_CACHE_LIMIT"] = limit


def _url_key(url: str) -> str:
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- reading


class Mirror:
    """The local view of the remote cache at ``url``: ``dir`` holds its manifest and id map (downloaded by
    ``open``), and its shards as ``acquire`` fetches them into the shared, bounded disk cache."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        split_url(self.url)
        self.fs = filesystem(self.url)
        self.root = cache_root()
        self.dir = self.root / "caches" / _url_key(self.url)
        self.limit = cache_limit()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}
        self._mu = threading.Lock()

    def remote(self, rel: str) -> str:
        return f"{_bare(self.url)}/{rel}"

    def open(self) -> Path:
        """Download the manifest (always: it is the commit) and the id map it names; return the local directory.
        ``CacheNotFoundError`` when the URL holds no manifest."""
        from logitstore.errors import CacheNotFoundError

        if not download_meta(self.fs, self.url, self.dir, reuse_id_map=True):
            if not _bucket_exists(self.fs, self.url):
                raise RemoteStoreError(_missing(self.url, "reading the manifest", self.fs, FileNotFoundError()))
            raise CacheNotFoundError(f"{self.url}: not a logitstore cache (no {F.MANIFEST_NAME})")
        return self.dir

    def shard_sizes(self) -> dict[str, int]:
        """name -> bytes of the objects under the cache's ``shards/`` prefix (listed now; {} when there is none)."""
        with translated(self.url, "listing the shards", self.fs):
            try:
                entries = self.fs.ls(self.remote(F.SHARD_DIR), detail=True)
            except FileNotFoundError:
                return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"] for e in entries}

    def local_path(self, file: str, sha256: str) -> Path:
        """Where shard ``file`` (its manifest checksum ``sha256``) lives in the disk cache."""
        p = Path(file)
        return self.dir / p.parent / f"{sha256[:16]}-{p.name}"

    # ---------------------------------------------------------------- fetching, pinning, evicting
    def acquire(self, file: str, sha256: str, size: int) -> tuple[Path, int]:
        """Make shard ``file`` local and pin it: returns its path and a file descriptor holding a shared lock,
        which ``release`` gives back. While pinned, no process evicts it."""
        path = self.local_path(file, sha256)
        for _ in range(5):
            with self._mu:
                fut = self._pending.pop(str(path), None)
            if fut is not None:  # a prefetch of it: wait; if it failed, the download below retries and reports
                try:
                    fut.result()
                except (LogitstoreError, OSError) as exc:
                    logger.warning("prefetching %s/%s failed (%s); downloading it again", self.url, file, exc)
            if not path.is_file():
                self._download(file, path, size)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # evicted between the download and the open: fetch again
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.utime(path)  # recently used
                return path, fd
            os.close(fd)  # evicted before our lock: fetch again
        raise RemoteStoreError(f"{self.url}/{file}: evicted from the disk cache {self.root} before it could be "
                               "read, five times; raise LOGITSTORE_CACHE_LIMIT (--cache-limit)")

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)  # closing drops the shared lock

    def prefetch(self, items: Iterable[tuple[str, str, int]]) -> None:
        """Download these shards (``(file, sha256, bytes)``) in the background, if not already local."""
        for file, sha256, size in items:
            path = self.local_path(file, sha256)
            key = str(path)
            with self._mu:
                if path.is_file() or (key in self._pending and not self._pending[key].done()):
                    continue
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="logitstore-prefetch")
                self._pending[key] = self._pool.submit(self._download, file, path, size)

    def _download(self, file: str, path: Path, size: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.make_room(size)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with translated(self.url, f"downloading {file}", self.fs):
                self.fs.get_file(self.remote(file), str(tmp))
            got = tmp.stat().st_size
            if got != size:
                raise RemoteStoreError(f"{self.url}/{file}: downloaded {got} bytes, the manifest says {size} "
                                       "(the remote object was replaced or truncated); run logitstore verify on it")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def make_room(self, size: int) -> None:
        """Evict least recently used, unpinned shards of the disk cache until ``size`` more bytes fit the limit."""
        files = []
        for p in (self.root / "caches").glob(f"*/{F.SHARD_DIR}/*"):
            if p.name.startswith("."):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(s for _, s, _ in files)
        for _, s, p in sorted(files):
            if total + size <= self.limit:
                return
            if _evict(p):
                total -= s
        if total + size > self.limit:
            logger.warning("the disk cache %s holds %d bytes of shards being read; %d more exceed its limit of %d "
                           "(LOGITSTORE_CACHE_LIMIT / --cache-limit)", self.root, total, size, self.limit)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _evict(p: Path) -> bool:
    """Delete ``p`` if no process holds it (its exclusive lock can be taken); True when deleted."""
    try:
        fd = os.open(p, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        p.unlink(missing_ok=True)
    finally:
        os.close(fd)
    return True


def download_meta(fs, url: str, dest: Path, *, reuse_id_map: bool) -> bool:
    """Copy the manifest of the cache at ``url`` into ``dest``, and the id map it names (kept when
    ``reuse_id_map`` and a copy of the manifest's size is already there: it never changes). False when the URL
    holds no manifest (nothing is written then)."""
    from logitstore.jsonfile import read_json

    with translated(url, "reading the manifest", fs):
        try:
            data = fs.cat_file(f"{_bare(url)}/{F.MANIFEST_NAME}")
        except FileNotFoundError:
            return False
    _atomic_write(dest / F.MANIFEST_NAME, data)
    d = read_json(dest / F.MANIFEST_NAME, InvalidInputError)
    id_map = d.get("id_map") if isinstance(d, dict) else None
    if isinstance(id_map, dict) and isinstance(id_map.get("file"), str):
        local = dest / id_map["file"]
        if not (reuse_id_map and local.is_file() and local.stat().st_size == id_map.get("bytes", -1)):
            with translated(url, f"reading {id_map['file']}", fs):
                _atomic_write(local, fs.cat_file(f"{_bare(url)}/{id_map['file']}"))
    return True


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- writing


class RemoteLock:
    """A build lock object at ``URL/build.lock``, created only if absent (``If-None-Match: *``). A holder on this
    host that no longer runs is taken over, as with a local lock; one on another host is refused with what to do."""

    def __init__(self, url: str, fs, *, enabled: bool = True):
        self.url, self.fs, self.enabled = url.rstrip("/"), fs, enabled
        self.key = f"{_bare(self.url)}/{LOCK_OBJECT}"
        self.held = False
        self._data = b""

    def acquire(self) -> None:
        from logitstore.lock import this_process

        if not self.enabled or self.held:
            return
        data = json.dumps(dataclasses.asdict(this_process())).encode()
        for _ in range(3):
            try:
                with translated(self.url, "taking the build lock", self.fs):
                    self.fs.pipe_file(self.key, data, mode="create")
                self.held, self._data = True, data
                return
            except RemoteStoreError as exc:
                if not _conditional_refusal(exc):
                    if _unsupported(exc):
                        raise RemoteStoreError(
                            f"{self.url}: the object store does not support conditional creates (If-None-Match), "
                            "so two builds could write this cache at once; rerun with --no-lock if you are sure "
                            "only one build writes it") from None
                    raise
            except FileExistsError:
                pass
            raw = self._read()
            if raw is None:
                continue  # released meanwhile
            self._judge(raw)  # raises unless the holder is gone
            with translated(self.url, "taking over the stale build lock", self.fs):
                if self.fs.cat_file(self.key) == raw:
                    self.fs.rm_file(self.key)
        raise CacheLockedError(f"{self.url}: could not take the build lock {LOCK_OBJECT} after three tries")

    def check(self) -> None:
        """Raise ``CacheLockedError`` now if a live build holds the lock (before a build loads its teacher)."""
        raw = self._read() if self.enabled else None
        if raw is not None:
            self._judge(raw, warn=False)

    def _read(self) -> bytes | None:
        with translated(self.url, "reading the build lock", self.fs):
            try:
                return self.fs.cat_file(self.key)
            except FileNotFoundError:
                return None

    def _judge(self, raw: bytes, *, warn: bool = True) -> None:
        """Return when the holder recorded in ``raw`` is gone (a stale lock); else raise ``CacheLockedError``."""
        from logitstore.lock import _is_stale, _parse_or_none

        info = _parse_or_none(raw)
        if info is None or not _is_stale(info):
            who = info.describe() if info else "an unreadable holder"
            here = socket.gethostname()
            tail = ("wait for it to finish or stop it, then rerun with --resume" if info and info.host == here
                    else f"this host ({here}) cannot tell whether it still runs; if no build of this cache runs "
                         f"there, delete {self.url}/{LOCK_OBJECT} and rerun with --resume")
            raise CacheLockedError(f"{self.url} is being written by another build: {who}; {tail}")
        if warn:
            logger.warning("taking over the stale build lock %s/%s: %s is gone", self.url, LOCK_OBJECT,
                           info.describe())

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            with translated(self.url, "releasing the build lock", self.fs):
                if self.fs.cat_file(self.key) == self._data:
                    self.fs.rm_file(self.key)
        except (RemoteStoreError, FileNotFoundError) as exc:
            logger.warning("could not release %s/%s: %s", self.url, LOCK_OBJECT, exc)


def _conditional_refusal(exc: BaseException) -> bool:
    t = str(exc)
    return "PreconditionFailed" in t or "412" in t or "At least one of the pre-conditions" in t \
        or "FileExistsError" in t or "already exists" in t


def _unsupported(exc: BaseException) -> bool:
    t = str(exc)
    return any(w in t for w in ("NotImplemented", "501", "not supported", "Unsupported"))


class RemoteTarget:
    """Where a writer publishes: the remote cache at ``url``, staged through a local directory ``staging``."""

    def __init__(self, url: str, *, lock: bool = True):
        self.url = url.rstrip("/")
        split_url(self.url)
        self.fs = filesystem(self.url)
        self.staging = cache_root() / "staging" / _url_key(self.url)
        self.lock = RemoteLock(self.url, self.fs, enabled=lock)

    def remote(self, rel: str) -> str:
        return f"{_bare(self.url)}/{rel}"

    def prepare(self) -> Path:
        """Check the bucket, empty the staging directory, and copy the remote manifest and id map into it (when the
        URL already holds a cache); returns the staging directory."""
        import shutil

        require_bucket(self.fs, self.url)
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        download_meta(self.fs, self.url, self.staging, reuse_id_map=False)
        return self.staging

    def refuse_foreign(self) -> None:
        """``CacheExistsError`` when the URL holds objects but no manifest of ours."""
        from logitstore.errors import CacheExistsError

        if self.is_foreign():
            raise CacheExistsError(f"{self.url} holds objects that are not a logitstore cache; logitstore never "
                                   "writes into a prefix it did not create: choose a new output URL")

    def is_foreign(self) -> bool:
        """Whether the URL holds objects but no manifest of ours (then a writer refuses it)."""
        with translated(self.url, "listing the prefix", self.fs):
            try:
                entries = self.fs.ls(_bare(self.url), detail=False)
            except FileNotFoundError:
                return False
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}
        return bool(names - {F.MANIFEST_NAME, LOCK_OBJECT, F.SHARD_DIR, F.ID_MAP_NAME})

    def seq_ids(self, file: str) -> list[str]:
        """The seq_id column of the committed shard ``file``, read by range requests."""
        import pyarrow.parquet as pq

        with translated(self.url, f"reading {file}", self.fs), self.fs.open(self.remote(file), "rb") as f:
            return pq.read_table(f, columns=["seq_id"]).column(0).to_pylist()

    def upload(self, local: Path, rel: str) -> None:
        """Put ``local`` under ``rel`` as one object (it appears only once complete)."""
        with translated(self.url, f"uploading {rel}", self.fs):
            self.fs.put_file(str(local), self.remote(rel))

    def finish(self) -> None:
        """Drop the staging directory (everything in it is uploaded or given up)."""
        import shutil

        shutil.rmtree(self.staging, ignore_errors=True)

    def remove_uncommitted(self) -> None:
        """Delete what a writer that committed no shard put at the URL (its manifest and id map)."""
        with translated(self.url, "removing an empty cache", self.fs):
            for rel in (F.MANIFEST_NAME, F.ID_MAP_NAME):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self.remote(rel))

    def remove_strays(self, listed: set[str]) -> None:
        """Delete the shard objects the manifest does not list (uploads of shards whose commit did not happen)."""
        with translated(self.url, "listing the shards", self.fs):
            try:
                entries = self.fs.ls(self.remote(F.SHARD_DIR), detail=False)
            except FileNotFoundError:
                return
            for e in entries:
                name = e.rstrip("/").rsplit("/", 1)[-1]
                if re.fullmatch(r"shard-\d{6}\.parquet", name) and f"{F.SHARD_DIR}/{name}" not in listed:
                    logger.warning("removing %s/%s/%s (uploaded but never committed)", self.url, F.SHARD_DIR, name)
                    self.fs.rm_file(e)
            self.fs.invalidate_cache()


def check_publish(url: str, *, marker: str, force: bool) -> list[str]:
    """Before an upload of a directory to ``url``: the objects there now, after refusing a prefix that must not be
    replaced (any, without ``force``; with it, one without ``marker``, i.e. not an earlier upload of this kind)."""
    from logitstore.errors import CacheExistsError

    url = url.rstrip("/")
    fs = filesystem(url)
    require_bucket(fs, url)
    with translated(url, "listing the prefix", fs):
        existing = fs.find(_bare(url))
    if existing and not force:
        raise CacheExistsError(f"-o {url} exists ({len(existing)} objects); choose a new URL, or pass --force to "
                               "replace an earlier export there")
    if existing and f"{_bare(url)}/{marker}" not in existing:
        raise CacheExistsError(f"-o {url} holds objects that are not an earlier export of logitstore's (no {marker}); "
                               "--force replaces only those: choose a new URL")
    return existing


def publish_directory(local: Path, url: str, *, marker: str, force: bool) -> None:
    """Upload the finished directory ``local`` (an export) to ``url``, its ``marker`` file last, so a prefix with the
    marker is complete. What ``check_publish`` allows to be replaced is deleted first, its marker first of all."""
    url = url.rstrip("/")
    existing = check_publish(url, marker=marker, force=force)
    fs = filesystem(url)
    with translated(url, "uploading", fs):
        if existing:
            fs.rm_file(f"{_bare(url)}/{marker}")  # first: an interrupted replacement is not taken for complete
            rest = [e for e in existing if not e.endswith(f"/{marker}")]
            if rest:
                fs.rm(rest)
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != marker)
        for p in files + [local / marker]:
            fs.put_file(str(p), f"{_bare(url)}/{p.relative_to(local).as_posix()}")
        fs.invalidate_cache()


def check_output(url: str) -> bool:
    """Before a build loads its teacher: whether ``url`` holds a cache of ours (True) or may become one (False);
    ``RemoteStoreError`` for a missing bucket or a store that cannot be reached, ``CacheExistsError`` for a
    prefix holding objects of someone else."""

    t = RemoteTarget(url)
    require_bucket(t.fs, t.url)
    with translated(t.url, "reading the manifest", t.fs):
        has_manifest = t.fs.exists(t.remote(F.MANIFEST_NAME))
    t.lock.check()
    if not has_manifest:
        t.refuse_foreign()
    return has_manifest
