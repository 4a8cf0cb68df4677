"""Inputs whose images are already on disk: webdataset tars, and folders of images with `.txt` captions.

Both fill the transient `image` column (encoded bytes) and the location columns
`key` / `image_path` that `curate select` reads, so no download stage is needed.
`image_path` is absolute here (it lies outside the run's output directory).

Sample ids stay stable across runs: the `url` of a webdataset sample is the
`url` of its `.json` member (img2dataset writes one, so ids match a download
run over the same pairs), else `<tar path>#<key>`; the `url` of an image file is
its absolute path.

Inputs are untrusted. A sample that cannot be read safely becomes a row with
`read_status` (and `read_error` saying why), no image, `keep` false and
`drop_reason` "input"; the rest of its shard goes on:
- webdataset (`curation.core.shards`): a member over `input.max_member_bytes`
  (`too_large`), a key naming two samples of a tar (`duplicate_key`, both), a
  `.json` caption that is not a string (`bad_caption`);
- image_folder (`curation.core.folders`): a file or caption whose real path
  lies outside the folder (`outside_folder`), a FIFO or device (`not_a_file`), a
  file over `input.max_member_bytes` (`too_large`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow as pa

from curation.core.folders import FileRefused, list_files, read_inside
from curation.core.patterns import brace_expand
from curation.core.shards import (
    CAPTION,
    IMAGE_EXTENSIONS,
    META,
    ShardError,
    TarSample,
    count_samples,
    read_samples,
    repeated_keys,
)
from curation.schema import DECISION_COLUMNS, ID_COLUMNS, IMAGE_COLUMNS, READ_COLUMNS, make_uids
from curation.sources.base import Problem, Shard, Source, split_rows

READ_OK = "ok"
BAD_CAPTION = "bad_caption"
# drop_reason (and drop_stage) of a row whose sample was refused while reading the input
INPUT_REASON = "input"


@dataclass
class Sample:
    key: str | None
    image_path: str
    url: str
    caption: str | None = None
    image: bytes | None = None
    status: str = READ_OK
    detail: str | None = None


def _table(samples: list[Sample], shard: int) -> pa.Table:
    urls = [s.url for s in samples]
    captions = [s.caption for s in samples]
    ok = [s.status == READ_OK for s in samples]
    refused = [None if k else INPUT_REASON for k in ok]
    return pa.table(
        {
            "uid": make_uids(urls, captions),
            "shard": pa.array([shard] * len(samples), ID_COLUMNS["shard"]),
            "url": pa.array(urls, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "key": pa.array([s.key for s in samples], IMAGE_COLUMNS["key"]),
            "image_path": pa.array(
                [s.image_path if s.image is not None else None for s in samples], pa.string()
            ),
            "read_status": pa.array([s.status for s in samples], READ_COLUMNS["read_status"]),
            "read_error": pa.array([s.detail for s in samples], READ_COLUMNS["read_error"]),
            "image": pa.array([s.image for s in samples], IMAGE_COLUMNS["image"]),
            # A refused sample is dropped before any stage sees it (cascading stages skip it).
            "keep": pa.array(ok, DECISION_COLUMNS["keep"]),
            "drop_reason": pa.array(refused, DECISION_COLUMNS["drop_reason"]),
            "drop_stage": pa.array(refused, DECISION_COLUMNS["drop_stage"]),
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
        located = {c: IMAGE_COLUMNS[c] for c in ("key", "image_path")}
        return pa.schema([pa.field(c, t) for c, t in {**located, **READ_COLUMNS}.items()])

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
                next(read_samples(f, read=lambda key, ext: False), None)
            except ShardError as e:
                problems.append((("input", "path"), str(e)))
                if len(problems) >= 10:
                    break
        return problems

    def _count(self, path: str) -> int:
        # Headers only: a seekable tar skips over the member data.
        return count_samples(path)

    def read(self, shard: Shard, batch_rows: int) -> Iterator[pa.Table]:
        # Every sample of a repeated key is refused, the first one too: a headers-only pass finds them.
        repeated = repeated_keys(shard.path)
        samples = read_samples(shard.path, max_member_bytes=self.cfg.max_member_bytes, refuse_keys=repeated)
        yield from _batches((self._sample(shard.path, s) for s in samples), shard, batch_rows)

    def _sample(self, path: str, tar_sample: TarSample) -> Sample:
        key, members = tar_sample.key, tar_sample.members
        meta: dict = {}
        if META in members:
            try:
                meta = json.loads(members[META])
            except ValueError:
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
        url = meta.get(self.cfg.url_column)
        url = url if isinstance(url, str) and url else f"{path}#{key}"
        if tar_sample.status is not None:
            return Sample(key, path, url, status=tar_sample.status, detail=tar_sample.detail)
        if CAPTION in members:
            caption = members[CAPTION].decode("utf-8", "replace")
        else:
            caption = meta.get(self.cfg.caption_column)
            if caption is not None and not isinstance(caption, str):
                detail = f"{key}.json field {self.cfg.caption_column!r} is not a string (JSON {_json_type(caption)})"
                return Sample(key, path, url, status=BAD_CAPTION, detail=detail)
        image = tar_sample.image()
        return Sample(key, path, url, caption=caption, image=image[1] if image else None)


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
        for p in (name for path in paths for name in brace_expand(path)):
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
        limit = self.cfg.max_member_bytes
        yield from _batches((_file_sample(f, shard.path, limit) for f in wanted), sub, batch_rows)


def _images(folder: str) -> list[str]:
    return list_files(folder, IMAGE_EXTENSIONS)


def _file_sample(path: str, folder: str, max_bytes: int) -> Sample:
    """The image file and its caption, each read only if it is a regular file inside `folder`."""
    try:
        image = read_inside(path, folder, max_bytes)
        caption_file = Path(path).with_suffix(".txt")
        caption = None
        if os.path.lexists(caption_file):
            caption = read_inside(caption_file, folder, max_bytes).decode("utf-8", "replace").strip()
    except FileRefused as e:
        return Sample(key=None, image_path=path, url=path, status=e.status, detail=e.detail)
    return Sample(key=None, image_path=path, url=path, caption=caption, image=image)


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages ("number", not "a int")."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {dict: "object", list: "array"}.get(type(value), type(value).__name__)
