"""Inputs whose images are already on disk: webdataset tars, and folders of images with `.txt` captions.

Both fill the transient `image` column (encoded bytes) and the location columns
`key` / `image_path` that `curate select` reads, so no download stage is needed.
`image_path` is absolute here (it lies outside the run's output directory).

Sample ids stay stable across runs: the `url` of a webdataset sample is the
`url` of its `.json` member (img2dataset writes one, so ids match a download
run over the same pairs), else `<tar path>#<key>`; the `url` of an image file is
its absolute path.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow as pa

from curation.schema import ID_COLUMNS, STAGE_COLUMNS, make_uids
from curation.sources.base import Problem, Shard, Source, split_rows

# In order of preference when a sample has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
LOCATION_COLUMNS = ("key", "image_path")
# webdataset's own rule: the key is everything up to the first dot of the file name.
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass
class Sample:
    key: str | None
    image_path: str
    url: str
    caption: str | None = None
    image: bytes | None = None


def _table(samples: list[Sample], shard: int) -> pa.Table:
    urls = [s.url for s in samples]
    captions = [s.caption for s in samples]
    return pa.table(
        {
            "uid": make_uids(urls, captions),
            "shard": pa.array([shard] * len(samples), ID_COLUMNS["shard"]),
            "url": pa.array(urls, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "key": pa.array([s.key for s in samples], STAGE_COLUMNS["key"]),
            "image_path": pa.array(
                [s.image_path if s.image is not None else None for s in samples], pa.string()
            ),
            "image": pa.array([s.image for s in samples], STAGE_COLUMNS["image"]),
        }
    )


def _batches(samples: Iterator[Sample], shard: Shard, batch_rows: int) -> Iterator[pa.Table]:
    batch: list[Sample] = []
    for i, sample in enumerate(samples):
        if i < shard.row_start:
            continue
        if shard.row_end >= 0 and i >= shard.row_end:
            break
        batch.append(sample)
        if len(batch) >= batch_rows:
            yield _table(batch, shard.index)
            batch = []
    if batch:
        yield _table(batch, shard.index)


class _ImageSource(Source):
    def carried_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c, STAGE_COLUMNS[c]) for c in LOCATION_COLUMNS])

    def _count(self, path: str) -> int:
        raise NotImplementedError

    def plan(self, limit: int | None = None) -> list[Shard]:
        shards: list[Shard] = []
        left: float = limit if limit is not None else float("inf")
        for f in self.files():
            left = split_rows(shards, f, self._count(f), self.cfg.rows_per_shard, left)
            if left <= 0:
                break
        return shards

    def _check_columns(self) -> list[Problem]:
        if self.cfg.columns:
            return [
                (("input", "columns"), f"only parquet input carries extra columns, not {self.cfg.format}")
            ]
        return []


# --------------------------------------------------------------------------- webdataset


class WebDatasetSource(_ImageSource):
    """webdataset tars (img2dataset's output, for example): `{key}.jpg|png|webp...`, `{key}.txt`, `{key}.json`.

    The caption is the `.txt` member, else the `.json` field named by
    `input.caption_column`; the url is the `.json` field `input.url_column`.
    """

    def files(self) -> list[str]:
        return [f if "://" in f else os.path.abspath(f) for f in super().files()]

    def check(self) -> list[Problem]:
        try:
            files = self.files()
        except Exception as e:
            return [(("input", "path"), f"cannot list {self.cfg.path!r}: {e}")]
        if not files:
            return [(("input", "path"), f"no files match {self.cfg.path!r}")]
        problems = self._check_columns()
        for f in files:
            try:
                with fsspec.open(f, "rb") as fh, tarfile.open(fileobj=fh, mode="r:*") as tar:
                    tar.next()
            except Exception as e:
                problems.append(
                    (("input", "path"), f"{f} is not a readable tar file ({type(e).__name__}: {e})")
                )
                if len(problems) >= 10:
                    break
        return problems

    def _count(self, path: str) -> int:
        # Headers only: a seekable tar skips over the member data.
        return sum(1 for _ in _group(path, read=False))

    def read(self, shard: Shard, batch_rows: int) -> Iterator[pa.Table]:
        samples = (self._sample(shard.path, key, members) for key, members in _group(shard.path, read=True))
        yield from _batches(samples, shard, batch_rows)

    def _sample(self, path: str, key: str, members: dict[str, bytes]) -> Sample:
        meta: dict = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"])
            except ValueError:
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
        caption = (
            members["txt"].decode("utf-8", "replace")
            if "txt" in members
            else meta.get(self.cfg.caption_column)
        )
        url = meta.get(self.cfg.url_column) or f"{path}#{key}"
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        return Sample(key=key, image_path=path, url=str(url), caption=caption, image=image)


def _group(path: str, read: bool) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample: consecutive members sharing a key, as webdataset groups them."""
    current: str | None = None
    members: dict[str, bytes] = {}
    with fsspec.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            m = _KEY_SUFFIX.match(info.name)
            if not m:
                continue
            key, suffix = m.group(1), m.group(2).lower()
            if key != current:
                if current is not None:
                    yield current, members
                current, members = key, {}
            if read:
                f = tar.extractfile(info)
                members[suffix] = f.read() if f else b""
    if current is not None:
        yield current, members


# --------------------------------------------------------------------------- image folder


class ImageFolderSource(_ImageSource):
    """Folders of images, each with an optional caption in a `.txt` file of the same name.

    `input.path` names folders (or globs of folders); their images are listed
    recursively in sorted order. The folder must not change while a run is in
    progress: shards are ranges of that sorted listing.
    """

    def files(self) -> list[str]:
        paths = [self.cfg.path] if isinstance(self.cfg.path, str) else self.cfg.path
        out: list[str] = []
        for p in paths:
            if Path(p).is_dir():
                out.append(os.path.abspath(p))
            else:
                fs, _, found = fsspec.get_fs_token_paths(p)
                out += [os.path.abspath(q) for q in sorted(found) if fs.isdir(q)]
        return list(dict.fromkeys(out))

    def check(self) -> list[Problem]:
        folders = self.files()
        if not folders:
            return [
                (("input", "path"), f"no folder matches {self.cfg.path!r} (image_folder input takes folders)")
            ]
        problems = self._check_columns()
        for d in folders:
            if not _images(d):
                problems.append((("input", "path"), f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {d}"))
        return problems

    def _count(self, path: str) -> int:
        return len(_images(path))

    def read(self, shard: Shard, batch_rows: int) -> Iterator[pa.Table]:
        files = _images(shard.path)
        if shard.row_end > len(files):
            raise RuntimeError(
                f"{shard.path} holds {len(files)} images, fewer than when this run was planned; "
                "image_folder input must not change during a run"
            )
        wanted = files[shard.row_start : shard.row_end]
        sub = Shard(shard.index, shard.path, 0, len(wanted))
        yield from _batches((_file_sample(f) for f in wanted), sub, batch_rows)


def _images(folder: str) -> list[str]:
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if not name.startswith(".") and name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS:
                out.append(os.path.join(root, name))
    return sorted(out)


def _file_sample(path: str) -> Sample:
    caption_file = Path(path).with_suffix(".txt")
    caption = (
        caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.exists() else None
    )
    return Sample(key=None, image_path=path, url=path, caption=caption, image=Path(path).read_bytes())
