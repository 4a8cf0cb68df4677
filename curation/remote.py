"""Parquet objects on a store, scanned by Arrow reading only the byte ranges a question needs.

`curate query` (and every command that reads a run through it) hands DuckDB an Arrow dataset over
the run's objects instead of copies of them: DuckDB pushes the statement's columns and filters into
the Arrow scan, Arrow reads each file's footer, then only the column chunks of the row groups the
filter keeps. The reads go through the store's own filesystem (fsspec, with the user's credentials)
in this process; DuckDB itself never gets network access or a credential.

Every range read is kept in a bounded local cache keyed by the object's URL and ETag (committed
manifests and compacted parts are never rewritten in place; a changed object has a new ETag), so a
second question over the same columns, in this process or a later one, downloads nothing again.
A read that overlaps cached ranges fetches only the gaps.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from curation.core.storage import Store

CACHE_BYTES = 4 << 30  # the range cache's bound on local disk; least recently used objects go first


def cache_dir() -> Path:
    """$CURATE_CACHE_DIR/ranges, else the user's cache folder (~/.cache/curate/ranges)."""
    base = os.environ.get("CURATE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "curate"
    )
    return Path(base) / "ranges"


@dataclass(frozen=True)
class ObjectInfo:
    rel: str  # relative to the store
    size: int
    etag: str


class RangeCache:
    """Byte ranges of immutable objects on local disk: `<folder>/<key>/<start>-<end>`, one folder per
    (URL, ETag). Private to the user (mode 0700): another user cannot plant ranges in it."""

    def __init__(self, folder: Path | None = None, max_bytes: int = CACHE_BYTES) -> None:
        self.folder = folder or cache_dir()
        self.max_bytes = max_bytes
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = self.folder.stat()
            # A folder someone else owns or may write could hold planted ranges: read without the cache.
            self.enabled = st.st_uid == os.getuid() and not st.st_mode & 0o022
        except OSError:
            self.enabled = False
        self.fetched = 0  # bytes downloaded by this process (not served from the cache)
        self.served = 0  # bytes served from the cache
        self._lock = threading.Lock()

    @staticmethod
    def key(url: str, etag: str) -> str:
        return hashlib.sha256(f"{url}\0{etag}".encode()).hexdigest()[:32]

    def read(self, store: Store, obj: ObjectInfo, start: int, end: int) -> bytes:
        """Bytes [start, end) of `obj`: cached pieces from disk, the gaps fetched (concurrently) and kept."""
        folder = self.folder / self.key(store.url_of(obj.rel), obj.etag)
        if not self.enabled or not obj.etag:
            [data] = store.read_ranges([(obj.rel, start, end - start)])
            with self._lock:
                self.fetched += len(data)
            return data
        have = sorted(_ranges(folder))
        pieces: list[tuple[int, int, Path | None]] = []  # (start, end, cached file or None: to fetch)
        pos = start
        for s, e in have:
            if e <= pos or s >= end:
                continue
            if s > pos:
                pieces.append((pos, s, None))
            pieces.append((max(s, pos), min(e, end), folder / f"{s}-{e}"))
            pos = min(e, end)
            if pos >= end:
                break
        if pos < end:
            pieces.append((pos, end, None))
        gaps = [(obj.rel, s, e - s) for s, e, f in pieces if f is None]
        fetched = iter(store.read_ranges(gaps))
        out = io.BytesIO()
        for s, e, f in pieces:
            if f is None:
                data = next(fetched)
                self._keep(folder, s, data)
                with self._lock:
                    self.fetched += len(data)
            else:
                fs, _ = (int(x) for x in f.name.split("-"))
                try:
                    with open(f, "rb") as fh:
                        fh.seek(s - fs)
                        data = fh.read(e - s)
                except FileNotFoundError:  # evicted by another process in between
                    data = b""
                if len(data) != e - s:
                    [data] = store.read_ranges([(obj.rel, s, e - s)])
                    with self._lock:
                        self.fetched += len(data)
                else:
                    with self._lock:
                        self.served += len(data)
            out.write(data)
        return out.getvalue()

    def _keep(self, folder: Path, start: int, data: bytes) -> None:
        if not data:
            return
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / f"{start}-{start + len(data)}"
        tmp = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:  # a full disk: the cache is an optimisation, the read still succeeds
            tmp.unlink(missing_ok=True)

    def trim(self) -> None:
        """Remove least recently used objects' ranges until the cache holds at most `max_bytes`."""
        if not self.enabled:
            return
        try:
            folders = [(f.stat().st_mtime, f) for f in self.folder.iterdir() if f.is_dir()]
        except OSError:
            return
        sizes = {f: sum(p.stat().st_size for p in f.iterdir()) for _, f in folders}
        total = sum(sizes.values())
        for _, f in sorted(folders):
            if total <= self.max_bytes:
                break
            for p in f.iterdir():
                p.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                f.rmdir()
            total -= sizes[f]


def _ranges(folder: Path) -> list[tuple[int, int]]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    os.utime(folder)  # recently used: trimmed last
    out = []
    for n in names:
        a, sep, b = n.partition("-")
        if sep and a.isdigit() and b.isdigit():
            out.append((int(a), int(b)))
    return out


class _RangeFile(io.RawIOBase):
    """One object as a seekable file whose reads are ranged reads through the cache."""

    def __init__(self, store: Store, obj: ObjectInfo, cache: RangeCache) -> None:
        self.store, self.obj, self.cache = store, obj, cache
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.obj.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def size(self) -> int:
        return self.obj.size

    def read(self, n: int = -1) -> bytes:
        end = self.obj.size if n is None or n < 0 else min(self.obj.size, self.pos + n)
        if end <= self.pos:
            return b""
        data = self.cache.read(self.store, self.obj, self.pos, end)
        self.pos = end
        return data

    def readall(self) -> bytes:
        return self.read(-1)


class _Handler(pafs.FSSpecHandler):
    """Arrow's view of the store: only the listed objects, opened as `_RangeFile`s."""

    def __init__(self, store: Store, objects: dict[str, ObjectInfo], cache: RangeCache) -> None:
        super().__init__(store.fs)
        self.store, self.objects, self.cache = store, objects, cache

    def open_input_file(self, path: str) -> pa.PythonFile:
        obj = self.objects.get(path)
        if obj is None:  # never: fragments name only listed objects
            raise FileNotFoundError(path)
        return pa.PythonFile(_RangeFile(self.store, obj, self.cache), mode="r")


def list_objects(store: Store, folder: str) -> dict[str, ObjectInfo]:
    """Size and ETag of every object directly under `folder` (one listing of that prefix)."""
    out = {}
    path = store.path(folder)
    try:
        entries = store._retry(lambda: store.fs.ls(path, detail=True), "listing")
    except FileNotFoundError:
        return out
    for e in entries:
        if e.get("type") == "directory":
            continue
        name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
        rel = f"{folder}/{name}" if folder else name
        etag = str(e.get("ETag") or e.get("etag") or e.get("mtime") or e.get("LastModified") or "")
        out[rel] = ObjectInfo(rel, int(e["size"]), etag)
    return out


def parquet_dataset(store: Store, objects: list[ObjectInfo], cache: RangeCache) -> ds.Dataset:
    """An Arrow dataset over `objects` (Parquet files on `store`), read by range through `cache`.

    Its schema is the first file's (every manifest of a run has the run's schema); a file lacking a
    column reads it as null.
    """
    by_path = {store.path(o.rel): o for o in objects}
    fs = pafs.PyFileSystem(_Handler(store, by_path, cache))
    fmt = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=True))
    fragments = [fmt.make_fragment(p, filesystem=fs, file_size=o.size) for p, o in by_path.items()]
    schema = fragments[0].physical_schema
    return ds.FileSystemDataset(fragments, schema, fmt, fs)


LIST_ABOVE = (
    64  # more wanted objects than this in one folder: one listing (1,000 a request) beats a HEAD each
)


def object_infos(store: Store, rels: list[str]) -> dict[str, ObjectInfo]:
    """Size and ETag of the objects `rels` that exist: a listing per folder holding many of them,
    else one HEAD each (concurrent). Missing objects are left out."""
    from concurrent.futures import ThreadPoolExecutor

    by_folder: dict[str, list[str]] = {}
    for rel in rels:
        by_folder.setdefault(rel.rpartition("/")[0], []).append(rel)
    out: dict[str, ObjectInfo] = {}
    heads: list[str] = []
    for folder, wanted in by_folder.items():
        if len(wanted) > LIST_ABOVE:
            listed = list_objects(store, folder)
            out.update({r: listed[r] for r in wanted if r in listed})
        else:
            heads += wanted

    def head(rel: str) -> ObjectInfo | None:
        try:
            info = store.info(rel)
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        etag = str(
            info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
        )
        return ObjectInfo(rel, int(info["size"]), etag)

    with ThreadPoolExecutor(16) as pool:
        for rel, info in zip(heads, pool.map(head, heads)):
            if info is not None:
                out[rel] = info
    return out
