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
- Transient errors (connection refused or reset, timeouts, 5xx, throttling) are
  retried with exponential backoff for up to `retry_seconds`; permanent ones
  (access denied, no such bucket or object) are raised at once.
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
import math
import os
import random
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

T = TypeVar("T")

RETRY_SECONDS = 120.0  # a store that stays down longer fails the operation (and so the shard)
LOCK_HEARTBEAT_S = 10.0
LOCK_STALE_S = 60.0  # a lock object not refreshed for this long belongs to a dead driver


class StorageError(Exception):
    """A store that cannot be used (credentials, bucket, endpoint); one line, no secrets."""


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
    """Call `fn`, retrying transient errors with exponential backoff (jittered) for up to `seconds`."""
    deadline = time.monotonic() + seconds
    delay = 0.2
    while True:
        try:
            return fn()
        except Exception as e:
            if not transient(e) or time.monotonic() + delay > deadline:
                if transient(e):
                    raise StorageError(
                        f"{what}: still failing after {seconds:g}s of retries: {_one_line(e)}"
                    ) from e
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 10.0)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {msg}"


@dataclass
class Store:
    """A root location (local directory or URL) and atomic operations on paths relative to it."""

    url: str  # as the user wrote it; safe to print
    fs: fsspec.AbstractFileSystem = field(repr=False)
    root: str  # the root as the filesystem names it (no protocol for s3fs)
    retry_seconds: float = RETRY_SECONDS

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

    def exists(self, rel: str) -> bool:
        return self._retry(lambda: self.fs.exists(self.path(rel)), "checking")

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
        return self._retry(lambda: self.fs.info(self.path(rel)), "reading")

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
                entries = self.fs.ls(path, detail=False)
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
        self._retry(lambda: self.fs.pipe_file(self.path(rel), data), "writing")

    def put_json(self, rel: str, data: Any) -> None:
        self.put_bytes(rel, json.dumps(data, indent=1, default=str).encode())

    def staging(self) -> Path:
        """A local folder for files being written before `put_file` commits them.

        Local stores: inside the output (so the commit is a rename on one filesystem).
        Object stores: this machine's temp folder (the object is uploaded whole).
        """
        if self.local:
            folder = Path(self.path(".tmp"))
        else:
            folder = Path(tempfile.gettempdir()) / "curate-staging"
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
            self._retry(lambda: self.fs.put_file(str(local), self.path(rel)), "writing")
        finally:
            with contextlib.suppress(FileNotFoundError):
                local.unlink()

    def remove(self, rel: str) -> None:
        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(rel))

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
                self._retry_short(lambda: self.fs.call_s3("head_bucket", Bucket=bucket))
            except PermissionError:
                raise StorageError(
                    f"access denied to {where}: check the credentials (AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY / AWS_PROFILE, or storage_options)"
                ) from None
            except FileNotFoundError:
                raise StorageError(f"bucket {bucket!r} does not exist ({where}); create it first") from None
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


def open_store(location: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> Store:
    """The store for a local path or URL. Nothing is contacted yet (see `Store.check`)."""
    text = str(location)
    if not is_url(text):
        local = text.removeprefix("file://")
        return Store(text, fsspec.filesystem("file"), os.path.abspath(local).rstrip("/") or "/")
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
        # botocore's default pool of 10 connections caps concurrent reads (get_many, get_to_local).
        options["config_kwargs"] = {"max_pool_connections": 64, **options.get("config_kwargs", {})}
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
            lambda: fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs), "locking"
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
