"""One storage layer: every output is a local directory or an fsspec URL (s3://, gs://, memory://).

A `Store` is a root location plus what every command needs from it, with the same
guarantees on local disk and on object stores (docs/storage.md):

- `put_bytes` / `put_file`: an object appears complete or not at all. Local disk:
  temp file in the same directory, fsync, rename. Object stores have no rename, but
  a PUT is atomic (a reader sees the old object, the new one, or none): the object
  is written in one PUT, or one multipart upload for large files (completed only
  once every part is in).
- `lock`: one writer per output. Local disk: flock (released by the kernel when the
  process dies). S3: a lock object created with a conditional PUT (`If-None-Match: *`,
  which only one creator wins), refreshed by a heartbeat and taken over when its
  holder is provably dead (same host, pid gone) or silent for `LOCK_STALE_S`.
- `list`: one listing of one prefix (paginated by the store); never a listing of
  the whole bucket.
- Every attempt has a deadline: the client connects within `CONNECT_TIMEOUT_S` and
  waits at most `READ_TIMEOUT_S` for each read, so an endpoint that accepts connections
  and then says nothing (a stalled proxy or load balancer) fails the attempt instead of
  hanging. The client's own hidden retries are off (botocore's) or few (s3fs's), so
  every retry is counted here: transient errors (connection refused or reset,
  timeouts, 5xx, throttling) are retried with exponential backoff while the next
  attempt can still start within `retry_seconds`; an operation therefore ends within
  about `retry_seconds` plus one attempt. Permanent errors (access denied, no such
  bucket or object) are raised at once. `CURATE_STORAGE_TIMEOUT` and
  `CURATE_STORAGE_RETRY_SECONDS` override the per-attempt read timeout and the budget.
- `check`: wrong credentials, a missing bucket or an unreachable endpoint become one
  line (`StorageError`) before any work starts.

Credentials come from the environment the store's library reads (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_ENDPOINT_URL, ~/.aws/..., GOOGLE_APPLICATION_CREDENTIALS)
or from `storage_options` (the config's `storage_options:` mapping). Neither is ever
printed, logged, or written into run.json or a fingerprint: `Store.url` is the URL the
user wrote, and messages name only it and, for S3-compatible servers, the endpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import fsspec.asyn

T = TypeVar("T")
_log = logging.getLogger("curation.storage")

RETRY_SECONDS = 120.0  # a store that stays down longer fails the operation (and so the shard)
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 20.0  # per read of a response; a multipart part's upload is not a read
MIN_SEND_RATE = 256 * 1024  # bytes/s below which an upload counts as stalled
S3FS_ATTEMPTS = 2  # s3fs's own retries of a read stream (pyarrow and tar readers have no outer loop)
LOCK_HEARTBEAT_S = 10.0
LOCK_STALE_S = 60.0  # a lock object not refreshed for this long belongs to a dead driver


class StorageError(Exception):
    """A store that cannot be used (credentials, bucket, endpoint); one line, no secrets."""


class StoreUnavailable(Exception):
    """The output's store failed several shards of a run in a row: the run stops instead of failing
    every shard left (each after its retry budget). Committed shards are kept; the same command resumes."""


class LockHeld(Exception):
    """Another live process holds the lock."""


def is_url(path: str | os.PathLike) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def transient(e: BaseException) -> bool:
    """Worth retrying: the store or the network may recover. Permanent errors are not retried."""
    if isinstance(
        e, FileNotFoundError | PermissionError | FileExistsError | IsADirectoryError | NotADirectoryError
    ):
        return False
    if isinstance(e, ConnectionError | TimeoutError):
        return True
    name = type(e).__name__
    if any(k in name for k in ("Connection", "Timeout", "Throttl", "SlowDown", "ServerError", "Incomplete")):
        return True  # botocore/aiohttp errors that are not OSError subclasses
    if isinstance(e, OSError):
        # s3fs maps 5xx, throttling and unknown codes to a plain OSError(EIO); local I/O errors
        # (ENOSPC, EROFS) carry their own errno and are not retried.
        return e.errno in (None, 5) or any(
            k in str(e) for k in ("SlowDown", "ServiceUnavailable", "InternalError", "503", "500")
        )
    return False


def retrying(fn: Callable[[], T], seconds: float, what: str) -> T:
    """Call `fn`, retrying transient errors with exponential backoff (jittered) for up to `seconds`.

    Each attempt is bounded by the client's timeouts, so the whole call ends within about
    `seconds` plus one attempt; the message says how long it really took and how many attempts.
    """
    start = time.monotonic()
    deadline = start + seconds
    delay = 0.2
    attempts = 0
    while True:
        attempts += 1
        try:
            return fn()
        except Exception as e:
            if not transient(e) or time.monotonic() + delay > deadline:
                if transient(e):
                    took = time.monotonic() - start
                    raise StorageError(
                        f"{what}: still failing after {attempts} attempt{'s' * (attempts > 1)} "
                        f"in {took:.0f}s: {_one_line(e)}"
                    ) from e
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 10.0)


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise StorageError(f"{name}={text!r} is not a number of seconds") from None
    if not 0 < value < 1e6:
        raise StorageError(f"{name}={text!r} must be a positive number of seconds")
    return value


def retry_seconds() -> float:
    """The retry budget of one storage operation (CURATE_STORAGE_RETRY_SECONDS overrides it)."""
    return _env_seconds("CURATE_STORAGE_RETRY_SECONDS", RETRY_SECONDS)


def s3_client_options() -> dict[str, Any]:
    """Deadlines for every S3 request curate makes: through a Store and through fsspec.open alike."""
    return {
        "config_kwargs": {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": _env_seconds("CURATE_STORAGE_TIMEOUT", READ_TIMEOUT_S),
            # botocore's hidden retries (5 attempts of a read timeout) multiply with s3fs's and
            # ours: a stalled endpoint then held one call for 417 s. Ours are the only counted ones.
            "retries": {"total_max_attempts": 1},
            # botocore's default pool of 10 connections caps concurrent reads (get_many, get_to_local).
            "max_pool_connections": 64,
        },
    }


_installed_defaults: dict[str, Any] = {}


def install_s3_defaults() -> None:
    """Make `s3_client_options` the default of every s3fs filesystem fsspec builds in this process
    (readers that open a URL with fsspec.open too); explicit storage_options still win."""
    global _installed_defaults
    conf = fsspec.config.conf.setdefault("s3", {})
    for key, value in _installed_defaults.items():
        if conf.get(key) is value:  # ours from an earlier call (the environment may have changed)
            del conf[key]
    _installed_defaults = {k: v for k, v in s3_client_options().items() if k not in conf}
    conf.update(_installed_defaults)
    with contextlib.suppress(ImportError):
        import s3fs

        s3fs.S3FileSystem.retries = S3FS_ATTEMPTS  # a class attribute: not an init argument


def _quiet_async_loop() -> None:
    """Route what fsspec's event loop reports (a retried request's task whose exception nobody
    awaited, an unclosed session at exit) to the debug log: the operation itself already
    succeeded or failed with one line, and 58 asyncio tracebacks on stderr broke that promise."""
    loop = fsspec.asyn.get_loop()
    if getattr(loop.get_exception_handler(), "__name__", "") != "_log_loop_exception":
        loop.set_exception_handler(_log_loop_exception)


def _log_loop_exception(loop: Any, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    _log.debug("storage event loop: %s", context.get("message"), exc_info=exc)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {msg}"


@dataclass
class Store:
    """A root location (local directory or URL) and atomic operations on paths relative to it."""

    url: str  # as the user wrote it; safe to print
    fs: fsspec.AbstractFileSystem = field(repr=False)
    root: str  # the root as the filesystem names it (no protocol for s3fs)
    retry_seconds: float = field(default_factory=retry_seconds)

    @property
    def local(self) -> bool:
        return "file" in _protocols(self.fs)

    @property
    def s3(self) -> bool:
        return "s3" in _protocols(self.fs)

    # ------------------------------------------------------------------ names
    def path(self, rel: str = "") -> str:
        """The filesystem path of `rel` (for this store's `fs`)."""
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str = "") -> str:
        """`rel` as a URL (or local path) a user can pass back to curate."""
        base = self.url.rstrip("/")
        return f"{base}/{rel}" if rel else base

    def child(self, rel: str) -> Store:
        return Store(self.url_of(rel), self.fs, self.path(rel), self.retry_seconds)

    # ------------------------------------------------------------------ reads
    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return retrying(fn, self.retry_seconds, f"{what} {self.url}")

    def _deadline(self, nbytes: int = 0) -> dict[str, float]:
        """An overall deadline for one request on an async filesystem (fsspec's sync bridge gives
        up after `timeout` seconds and cancels it): a connect, a read, and `nbytes` sent at no less
        than MIN_SEND_RATE. Needed where the client's read timeout never fires (a PUT waiting on a
        silent endpoint hung past 10 minutes); reads of unknown length rely on that read timeout."""
        if isinstance(self.fs, fsspec.asyn.AsyncFileSystem):
            per_attempt = CONNECT_TIMEOUT_S + _env_seconds("CURATE_STORAGE_TIMEOUT", READ_TIMEOUT_S)
            return {"timeout": per_attempt + nbytes / MIN_SEND_RATE}
        return {}

    def exists(self, rel: str) -> bool:
        return self._retry(lambda: self.fs.exists(self.path(rel), **self._deadline()), "checking")

    def get_bytes(self, rel: str) -> bytes:
        return self._retry(lambda: self.fs.cat_file(self.path(rel)), "reading")

    def get_many(self, rels: list[str]) -> dict[str, bytes]:
        """Several small objects at once (concurrent requests on object stores); missing ones are left out."""
        if not rels:
            return {}
        paths = [self.path(r) for r in rels]
        # cat_ranges, not cat: cat expands glob characters, and an output may be named `runs/exp[1]`.
        got = self._retry(lambda: self.fs.cat_ranges(paths, None, None, on_error="return"), "reading")
        return {r: data for r, data in zip(rels, got) if not isinstance(data, BaseException)}

    def info(self, rel: str = "") -> dict[str, Any]:
        """The object's metadata as the filesystem reports it (size, ETag on S3; type "directory" for a prefix)."""
        return self._retry(lambda: self.fs.info(self.path(rel), **self._deadline()), "reading")

    def get_json(self, rel: str) -> Any:
        return json.loads(self.get_bytes(rel))

    def read_ranges(self, ranges: list[tuple[str, int, int]]) -> list[bytes]:
        """The bytes of each (rel, offset, size), in order: one ranged read each, concurrent on object
        stores. A range past the object's end is an error, not a short read."""
        if not ranges:
            return []
        paths = [self.path(rel) for rel, _, _ in ranges]
        starts = [offset for _, offset, _ in ranges]
        ends = [offset + size for _, offset, size in ranges]
        got = self._retry(lambda: self.fs.cat_ranges(paths, starts, ends, on_error="raise"), "reading")
        for (rel, offset, size), data in zip(ranges, got):
            if len(data) != size:
                raise StorageError(f"{self.url_of(rel)}: {size} bytes at {offset} asked, {len(data)} read")
        return got

    def list(self, rel: str) -> list[str]:
        """Names of the objects directly under `rel` (one listing of that prefix; [] if none)."""

        def ls() -> list[str]:
            path = self.path(rel)
            with contextlib.suppress(Exception):
                self.fs.invalidate_cache(path)  # another process may have added objects since
            try:
                entries = self.fs.ls(path, detail=False, **self._deadline())
            except FileNotFoundError:
                return []
            return [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]

        return self._retry(ls, "listing")

    def get_to_local(self, rels: list[str], folder: Path) -> list[Path]:
        """Copy objects into a local folder (concurrently on object stores); local stores return their paths."""
        if self.local:
            return [Path(self.path(r)) for r in rels]
        folder.mkdir(parents=True, exist_ok=True)
        targets = [folder / r.replace("/", "__") for r in rels]
        sources = [self.path(r) for r in rels]
        if rels and any(_globbed(s) for s in sources):  # a bulk get would glob the names
            for source, target in zip(sources, targets):
                self._retry(lambda s=source, t=target: self.fs.get_file(s, str(t)), "reading")
        elif rels:
            self._retry(lambda: self.fs.get(sources, [str(t) for t in targets]), "reading")
        return targets

    # ------------------------------------------------------------------ writes
    def put_bytes(self, rel: str, data: bytes) -> None:
        """Write one object atomically: complete or absent, never partial."""
        if self.local:
            path = Path(self.path(rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            return
        self._retry(lambda: self.fs.pipe_file(self.path(rel), data, **self._deadline(len(data))), "writing")

    def put_json(self, rel: str, data: Any) -> None:
        self.put_bytes(rel, json.dumps(data, indent=1, default=str).encode())

    def staging(self) -> Path:
        """This process's local folder for files being written before `put_file` commits them.

        Local stores: inside the output (so the commit is a rename on one filesystem).
        Object stores: this machine's temp folder (the object is uploaded whole).
        Each process stages in a folder of its own (host, pid and the pid's start time), so the
        first call of a process can remove what killed processes of this host left behind
        without touching a live one's files.
        """
        base = Path(self.path(".tmp")) if self.local else Path(tempfile.gettempdir()) / "curate-staging"
        folder = base / _process_tag()
        if folder not in _prepared_staging:
            base.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(base)
            _prepared_staging.add(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def put_file(self, local: Path, rel: str) -> None:
        """Commit a finished local file as `rel`, atomically; the local file is gone afterwards.

        Object stores: one PUT, or a multipart upload for large files (s3fs switches at
        2 x its block size), which becomes visible only when completed.
        """
        if self.local:
            with open(local, "rb") as f:
                os.fsync(f.fileno())
            target = Path(self.path(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, target)
            return
        try:
            size = local.stat().st_size
            self._retry(
                lambda: self.fs.put_file(str(local), self.path(rel), **self._deadline(size)), "writing"
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                local.unlink()

    def remove(self, rel: str) -> None:
        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(rel), **self._deadline())

        self._retry(rm, "removing")

    def remove_many(self, rels: list[str]) -> None:
        """Remove several objects (batched deletes on object stores: S3 takes 1,000 a request)."""
        if not rels:
            return
        if self.local:
            for rel in rels:
                self.remove(rel)
            return

        paths = [self.path(r) for r in rels]
        if any(_globbed(p) for p in paths):  # a bulk rm would glob the names
            for rel in rels:
                self.remove(rel)
            return

        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(paths)

        self._retry(rm, "removing")

    def makedirs(self) -> None:
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Fail with one line if this store cannot be used: wrong credentials, no bucket, no endpoint."""
        if self.local:
            return
        if self.s3:
            bucket = self.root.split("/", 1)[0]
            endpoint = _s3_endpoint(self.fs)
            where = f"s3://{bucket}" + (f" at {endpoint}" if endpoint else "")
            try:
                self._retry_short(lambda: self.fs.call_s3("head_bucket", Bucket=bucket, **self._deadline()))
            except PermissionError:
                raise StorageError(
                    f"access denied to {where}: check the credentials (AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY / AWS_PROFILE, or storage_options)"
                ) from None
            except FileNotFoundError:
                raise StorageError(f"bucket {bucket!r} does not exist ({where}); create it first") from None
            except StorageError as e:
                raise StorageError(f"cannot use {where}: {e}") from None
            except Exception as e:
                raise StorageError(f"cannot use {where}: {_one_line(e)}") from None
            return
        try:
            self._retry_short(lambda: self.fs.ls(self.root.split("/", 1)[0] or self.root, detail=False))
        except FileNotFoundError:
            pass  # the root will be created by the first write
        except Exception as e:
            raise StorageError(f"cannot use {self.url}: {_one_line(e)}") from None

    def _retry_short(self, fn: Callable[[], T]) -> T:
        return retrying(fn, min(self.retry_seconds, 10.0), f"checking {self.url}")

    # ------------------------------------------------------------------ lock
    @contextlib.contextmanager
    def lock(self, rel: str, held_message: str, *, remove: bool = False) -> Iterator[None]:
        """Hold `rel` as this output's lock; LockHeld(held_message) if a live process holds it.
        `remove`: a local lock file is removed on release (a lock file beside an output, not in it)."""
        if self.local:
            with _flock(Path(self.path(rel)), held_message, remove=remove):
                yield
            return
        lock = _ObjectLock(self, rel)
        lock.acquire(held_message)
        try:
            yield
        finally:
            lock.release()

    def is_locked(self, rel: str) -> bool:
        if self.local:
            path = Path(self.path(rel))
            if not path.exists():
                return False
            with open(path) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(f, fcntl.LOCK_UN)
            return False
        try:
            holder = self.get_json(rel)
        except FileNotFoundError:
            return False
        except (ValueError, UnicodeDecodeError):
            holder = None
        try:
            return _ObjectLock(self, rel).holder_alive(holder, "locked")
        except LockHeld:
            return True  # a malformed lock of unknown age: say a run may be in progress


def _start_ticks(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot, /proc), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
    if fields[0] in ("Z", "X"):
        return None  # a zombie nobody reaped (a container's init may not) has stopped running
    return fields[19]  # field 22 overall: the start time


def _process_tag() -> str:
    """This process's staging folder name (computed per pid: a forked child gets its own)."""
    pid = os.getpid()
    return f"{socket.gethostname()}-{pid}-{_start_ticks(pid) or 0}"


_prepared_staging: set[Path] = set()
STALE_STAGING_S = 24 * 3600.0  # entries of an unknown layout (an older curate) older than this


def remove_stale_staging(base: Path) -> list[Path]:
    """Remove the staging folders under `base` of processes of this host that no longer run (a
    `kill -9` leaves its half-written files behind), and entries of an older layout untouched
    for STALE_STAGING_S. Folders of live processes and of other hosts are kept."""
    removed = []
    host = socket.gethostname()
    for entry in list(base.iterdir()) if base.is_dir() else []:
        parts = entry.name.rsplit("-", 2)
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            owner, pid, ticks = parts
            if owner != host or _start_ticks(int(pid)) == ticks:
                continue  # another host's (it may be alive), or a live process of ours
        else:
            try:
                if time.time() - entry.lstat().st_mtime < STALE_STAGING_S:
                    continue
            except FileNotFoundError:
                continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def open_store(location: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> Store:
    """The store for a local path or URL. Nothing is contacted yet (see `Store.check`)."""
    text = str(location)
    install_s3_defaults()
    if not is_url(text):
        local = text.removeprefix("file://")
        return Store(text, fsspec.filesystem("file"), os.path.abspath(local).rstrip("/") or "/")
    _quiet_async_loop()
    options = dict(storage_options or {})
    protocol, rest = text.split("://", 1)
    if "//" in rest.rstrip("/"):
        # S3 keeps `/dbl` as a key while its listings normalise the prefix to `dbl/`: a run written there
        # would be found by single requests and missed by listings (status 0/2, run 2 done).
        fixed = "/".join(p for p in rest.split("/") if p)
        raise StorageError(
            f"{text}: an empty path segment (//) is not a location; write {protocol}://{fixed}"
        )
    if protocol not in fsspec.available_protocols():
        raise StorageError(f"{text}: unknown storage protocol {protocol}:// (s3://, gs://, memory://, ...)")
    if protocol in ("s3", "s3a"):
        # Listings are always re-read: another process (a worker, a second command) writes here.
        options.setdefault("use_listings_cache", False)
        defaults = s3_client_options()
        options["config_kwargs"] = {**defaults["config_kwargs"], **options.get("config_kwargs", {})}
        # A fresh client per store: fsspec's instance cache is keyed by these options, not by the
        # environment the credentials and endpoint come from (which may change within one process).
        options.setdefault("skip_instance_cache", True)
    try:
        fs, root = fsspec.core.url_to_fs(text, **options)
    except ImportError as e:
        raise StorageError(f"{text}: no filesystem for {protocol}:// is installed ({e})") from None
    except (ValueError, TypeError) as e:
        raise StorageError(f"{text}: {_one_line(e)} (check storage_options)") from None
    return Store(text.rstrip("/"), fs, root.rstrip("/"))


def _globbed(path: str) -> bool:
    """Whether fsspec's bulk calls (cat, get, rm of a list) would expand `path` as a glob pattern."""
    return any(c in path for c in "*?[")


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _s3_endpoint(fs: Any) -> str | None:
    with contextlib.suppress(Exception):
        return (
            (fs.client_kwargs or {}).get("endpoint_url")
            or fs.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL"))
        )
    return None


@contextlib.contextmanager
def _flock(path: Path, held_message: str, *, remove: bool = False) -> Iterator[None]:
    """An exclusive flock on `path`, released by the kernel if the process dies. `remove`: the file is
    unlinked on release; a taker that locked the file just unlinked (its inode is no longer `path`'s)
    tries again, so two processes never hold two files of one name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a")  # noqa: SIM115 (kept open while held, closed by `with f` below)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise LockHeld(held_message) from None
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    with f:
        try:
            f.truncate(0)
            f.write(str(os.getpid()))
            f.flush()  # a full disk fails here: the lock file still goes (remove) and the lock is released
            yield
        finally:
            if remove:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            fcntl.flock(f, fcntl.LOCK_UN)


class _ObjectLock:
    """A lock object on a store without flock.

    S3: created with `If-None-Match: *` (exactly one creator wins). The holder rewrites it
    every LOCK_HEARTBEAT_S with `If-Match` on its own ETag; a holder that is provably dead
    (same host, its pid gone) or silent for LOCK_STALE_S is removed with `If-Match` on the
    dead holder's ETag, so of two drivers taking over a stale lock exactly one wins.
    Other object stores: created if absent (a check, then a write: two drivers starting
    in the same instant can both win; docs/storage.md says so).
    """

    def __init__(self, store: Store, rel: str) -> None:
        self.store, self.rel = store, rel
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.bucket, _, self.key = store.path(rel).partition("/")

    def _body(self) -> bytes:
        return json.dumps(
            {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
        ).encode()

    @staticmethod
    def heartbeat(holder: Any) -> float | None:
        """The holder's last heartbeat, if the lock object says it in a way that can be believed."""
        beat = holder.get("heartbeat") if isinstance(holder, dict) else None
        believable = isinstance(beat, int | float) and not isinstance(beat, bool) and math.isfinite(beat)
        # A heartbeat from the future (9e18) is not believed either.
        return float(beat) if believable and beat <= time.time() + LOCK_STALE_S else None

    def age(self) -> float | None:
        """Seconds since the lock object was last written, by the store's clock (None: unknown)."""
        with contextlib.suppress(Exception):
            info = self.store.info(self.rel)
            when = info.get("LastModified") or info.get("mtime") or info.get("created")
            stamp = when.timestamp() if hasattr(when, "timestamp") else float(when)
            if math.isfinite(stamp):
                return max(0.0, time.time() - stamp)
        return None

    def holder_alive(self, holder: Any, held_message: str) -> bool:
        """`alive` for what the lock object holds; a malformed one (a heartbeat of "soon", 1e400, a list)
        is judged by the object's own age, and refused in one line naming it when that is unknown too."""
        if self.heartbeat(holder) is not None:
            return self.alive(holder)
        age = self.age()
        if age is None:
            raise LockHeld(
                f"{held_message}: its lock object {self.store.url_of(self.rel)} is malformed and its age "
                "unknown; if nothing is writing there, delete it"
            )
        return age <= LOCK_STALE_S

    @staticmethod
    def alive(holder: dict) -> bool:
        beat = _ObjectLock.heartbeat(holder)
        if beat is None or time.time() - beat > LOCK_STALE_S:
            return False
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder.get("pid", -1)), 0)
            except ProcessLookupError:
                return False
            except (PermissionError, ValueError, TypeError, OverflowError):
                return True
        return True

    def _s3(self, method: str, **kwargs: Any) -> dict:
        fs = self.store.fs
        return self.store._retry(
            lambda: fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs, **self.store._deadline()),
            "locking",
        )

    def _create(self) -> bool:
        """True if this call created the lock object."""
        if self.store.s3:
            try:
                self.etag = self._s3("put_object", Body=self._body(), IfNoneMatch="*")["ETag"]
                return True
            except FileExistsError:
                return False
        if self.store.exists(self.rel):
            return False
        self.store.put_bytes(self.rel, self._body())
        return True

    def acquire(self, held_message: str) -> None:
        for _ in range(5):
            if self._create():
                break
            try:
                etag = self._s3("head_object")["ETag"] if self.store.s3 else None
                holder = self.store.get_json(self.rel)
            except FileNotFoundError:
                continue  # released in between: try again
            except (ValueError, UnicodeDecodeError):
                holder = None
            if self.holder_alive(holder, held_message):
                beat = self.heartbeat(holder)
                if beat is None:
                    raise LockHeld(
                        f"{held_message} (lock object {self.store.url_of(self.rel)} written recently)"
                    )
                since = time.strftime("%H:%M:%S", time.localtime(beat))
                raise LockHeld(
                    f"{held_message} (host {holder.get('host')}, pid {holder.get('pid')}, alive at {since})"
                )
            self._remove(etag)  # a dead holder's lock; the next create decides who wins
        else:
            raise LockHeld(held_message)
        self._thread = threading.Thread(target=self._beat, daemon=True, name="curate-lock-heartbeat")
        self._thread.start()

    def _remove(self, etag: str | None) -> None:
        if not self.store.s3:
            self.store.remove(self.rel)
            return
        with contextlib.suppress(FileNotFoundError, OSError):  # OSError: the ETag changed (someone else won)
            self._s3("delete_object", IfMatch=etag)

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            with contextlib.suppress(Exception):
                if self.store.s3:
                    self.etag = self._s3("put_object", Body=self._body(), IfMatch=self.etag)["ETag"]
                elif self.store.get_json(self.rel).get("token") == self.token:
                    self.store.put_bytes(self.rel, self._body())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=LOCK_HEARTBEAT_S + 5)
        with contextlib.suppress(Exception):
            if self.store.s3:
                self._remove(self.etag)
            elif self.store.get_json(self.rel).get("token") == self.token:
                self.store.remove(self.rel)
