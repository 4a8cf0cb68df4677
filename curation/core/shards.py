"""The webdataset shard format: what `curate select` writes and every tar reader reads.

    DIR/00000.tar, DIR/00001.tar, ...   {key}.jpg|png|webp, {key}.txt (caption), {key}.json (manifest row),
                                        {key}.concepts.json (distillation targets, runs with a concepts stage)
    DIR/sizes.json                      {"00000.tar": 10000, ...} (open_clip's convention)
    DIR/vocabulary.txt                  the concept vocabulary, one name per line (runs with a concepts stage)

A sample is a run of consecutive members sharing a key, as webdataset groups
them. The key is webdataset's: the member's folder plus its file name up to the
first dot (`a.b/0001.concepts.json` is key `a.b/0001`, extension
`concepts.json`), with the path normalised so that `./0001.jpg` (what
`tar -C dir -cf x.tar .` writes) and `0001.jpg` name the same sample.

Input tars are untrusted, so the reader refuses per sample rather than failing
the tar or trusting it:
- a member that declares more than `max_member_bytes` is never read (a 10 KB
  GNU sparse member or a 1 MB `.tar.gz` can declare gigabytes): `too_large`;
- a key that appears again after other samples would let a reader pair one
  sample's image with another's caption: `duplicate_key`, for every occurrence
  the reader can see (all of them with `repeated_keys`, a headers-only pass);
- members that are not regular files (links, devices, folders) are skipped.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tarfile
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import fsspec

from curation.core.storage import Store, open_store

CAPTION = "txt"
META = "json"
CONCEPTS = "concepts.json"
SIZES_FILE = "sizes.json"
VOCABULARY_FILE = "vocabulary.txt"
# Image extensions a sample may carry, in order of preference when it has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
# Generous for an image or a caption; a member declaring more is refused unread.
DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20

TOO_LARGE = "too_large"
DUPLICATE_KEY = "duplicate_key"


class ShardError(Exception):
    """A tar that cannot be read at all (not a tar, truncated)."""


@dataclass
class TarSample:
    key: str
    # extension -> bytes, for the members the caller asked to read
    members: dict[str, bytes] = field(default_factory=dict)
    # None: usable. Else why not (TOO_LARGE, DUPLICATE_KEY), with `detail`; `members` may then be partial.
    status: str | None = None
    detail: str | None = None
    # extension -> (data offset, size) of every member, read or not: positions in the file for a plain
    # (uncompressed) tar, so that a member can be read back later with one positioned or ranged read
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)

    def refuse(self, status: str, detail: str) -> None:
        if self.status is None:
            self.status, self.detail = status, detail

    def image(self) -> tuple[str, bytes] | None:
        """(extension, bytes) of the preferred image member, if any was read."""
        return next(((e, self.members[e]) for e in IMAGE_EXTENSIONS if e in self.members), None)


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a member name; None for names that belong to no sample."""
    path = posixpath.normpath(name.replace("\\", "/")).lstrip("/")
    folder, _, base = path.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext or path.startswith("../") or path == "..":
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def normalise_key(key: str) -> str:
    """A key as `split_member_name` gives it (`./0001` -> `0001`)."""
    parts = split_member_name(f"{key}.x")
    return parts[0] if parts else key


def _tar_mode(f: Any, plain: bool = False) -> str:
    compression = "" if plain else "*"
    try:
        return f"r:{compression}" if f.seekable() else f"r|{compression}"
    except (AttributeError, OSError):
        return f"r|{compression}"


def _open(source: str | IO[bytes]) -> Any:
    """A context manager over the tar's bytes: a path, an fsspec URL or an open binary file."""
    if isinstance(source, (str, os.PathLike)):
        return fsspec.open(str(source), "rb")
    return _Borrowed(source)


class _Borrowed:
    def __init__(self, f: IO[bytes]) -> None:
        self.f = f

    def __enter__(self) -> IO[bytes]:
        return self.f

    def __exit__(self, *exc: object) -> None:
        pass


def read_samples(
    source: str | os.PathLike | IO[bytes],
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    read: Callable[[str, str], bool] | None = None,
    refuse_keys: Collection[str] = (),
    plain: bool = False,
) -> Iterator[TarSample]:
    """Samples of a tar (plain, gzip, bz2, xz; a path, fsspec URL or binary file), in tar order.

    `read(key, extension)` says which members to read (default: all); the others are
    skipped by their headers (on a seekable file their data is not read).
    `refuse_keys` (see `repeated_keys`) marks samples as duplicates up front.
    `plain` refuses a compressed tar (the members' `offsets` are then positions in the file).
    Raises ShardError for a file that is not a readable tar.
    """
    seen: set[str] = set()
    sample: TarSample | None = None
    where = str(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", "tar")
    try:
        with _open(source) as fh, tarfile.open(fileobj=fh, mode=_tar_mode(fh, plain)) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                parts = split_member_name(info.name)
                if parts is None:
                    continue
                key, ext = parts
                if sample is None or key != sample.key:
                    if sample is not None:
                        yield sample
                    sample = TarSample(key)
                    if key in seen or key in refuse_keys:
                        sample.refuse(DUPLICATE_KEY, f"key {key!r} names more than one sample in this tar")
                    seen.add(key)
                elif ext in sample.members:
                    sample.refuse(DUPLICATE_KEY, f"member {info.name!r} appears twice in sample {key!r}")
                sample.offsets[ext] = (info.offset_data, info.size)
                if info.size > max_member_bytes:
                    sample.refuse(
                        TOO_LARGE,
                        f"member {info.name!r} declares {info.size:,} bytes > the limit of {max_member_bytes:,}",
                    )
                    continue
                if read is None or read(key, ext):
                    f = tar.extractfile(info)
                    sample.members[ext] = f.read(info.size) if f is not None else b""
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"{where} is not a readable tar ({type(e).__name__}: {e})") from e
    if sample is not None:
        yield sample


def repeated_keys(source: str | IO[bytes]) -> set[str]:
    """Keys that name more than one sample of the tar (headers only)."""
    seen: set[str] = set()
    repeated: set[str] = set()
    for s in read_samples(source, read=lambda key, ext: False, max_member_bytes=2**63):
        (repeated if s.key in seen else seen).add(s.key)
    return repeated


def count_samples(source: str | IO[bytes]) -> int:
    """Samples in a tar, as `read_samples` yields them (headers only)."""
    return sum(1 for _ in read_samples(source, read=lambda key, ext: False, max_member_bytes=2**63))


# ---------------------------------------------------------------------------- writing


class TarWriter:
    """Numbered tars (00000.tar, ...) of at most `shard_size` samples each, into `folder`.

    `folder` is a local directory, a URL (s3://bucket/prefix, ...) or a `Store`. A
    tar is written to a local file and committed whole when it is full or the writer
    closes, through the storage layer: on local disk renamed in place, on an object
    store one PUT (multipart for large tars), so a tar under its final name is
    complete and no temporary object is ever left in the store. `sizes` counts what
    each holds; `close` writes them to sizes.json, last.
    """

    def __init__(self, folder: str | Path | Store, shard_size: int, mtime: float | None = None) -> None:
        self.store = folder if isinstance(folder, Store) else open_store(folder)
        self.shard_size = shard_size
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._tmp: Path | None = None
        self._mtime = time.time() if mtime is None else mtime

    @property
    def count(self) -> int:
        return sum(self.sizes.values())

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Write one sample: `members` maps extensions (`jpg`, CAPTION, META, CONCEPTS) to bytes."""
        if split_member_name(f"{key}.x") != (key, "x"):
            raise ValueError(f"{key!r} is not a sample key (no dots, no `./`, no `..`)")
        if self._tar is None or self.sizes[self._name] >= self.shard_size:
            self._open_next()
        assert self._tar is not None
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = self._mtime
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self.sizes[self._name] += 1

    def _open_next(self) -> None:
        self._finish()
        self._name = f"{len(self.sizes):05d}.tar"
        self.sizes[self._name] = 0
        if self.store.local:
            # Beside its final name, so the commit is a rename on one filesystem.
            self.store.makedirs()
            self._tmp = Path(self.store.path(f".{self._name}.tmp"))
        else:
            self._tmp = self.store.staging() / f"{uuid.uuid4().hex}-{self._name}"
        # Held open across `add` calls and closed by `_finish`, hence no `with`.
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115

    def _finish(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            assert self._tmp is not None
            self.store.put_file(self._tmp, self._name)
            self._tmp = None

    def close(self) -> None:
        self._finish()
        write_sizes(self.store, self.sizes)

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()
            self._tar = None
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)


def write_sizes(folder: str | Path | Store, sizes: dict[str, int]) -> None:
    store = folder if isinstance(folder, Store) else open_store(folder)
    store.put_bytes(SIZES_FILE, (json.dumps(sizes, indent=1) + "\n").encode())
