"""`curate select`: a curated subset as webdataset shards (or a Parquet list of uids).

The shards are what open_clip's training script and ours read:

    DIR/00000.tar, DIR/00001.tar, ...   {key}.jpg|png|webp, {key}.txt (caption), {key}.json (manifest row),
                                        {key}.concepts.json (distillation targets, runs with a concepts stage)
    DIR/sizes.json                      {"00000.tar": 10000, ...}
    DIR/vocabulary.txt                  the concept vocabulary, one name per line (runs with a concepts stage)

Images are read from where the manifest says they live (`image_path`, `key`):
tars under the run's `images/` (download stage), the input tars (webdataset
input) or image files (image_folder input). Each tar is read once, streaming,
so a selection is bounded by disk speed, not memory.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
VOCABULARY_FILE = "vocabulary.txt"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "select",
        help="write the samples matching a SQL condition as webdataset shards + sizes.json",
        description=(
            "Select the samples of OUTPUT (a `curate run` output) matching --where, a DuckDB SQL condition "
            "over the manifest columns, and write them to --out as webdataset shards 00000.tar, 00001.tar, ... "
            "({key}.jpg/png/webp, {key}.txt caption, {key}.json manifest row) plus sizes.json, readable by "
            'open_clip (--train-data "DIR/{00000..0000N}.tar") and `curate train`. '
            "With --uids-only, write a Parquet file of the selected uids instead (a DataComp-style subset file)."
        ),
        epilog='example: curate select runs/laion --where "keep AND caption_complexity >= 3" --out subsets/cat3',
    )
    p.add_argument("output", help="a `curate run` output directory")
    p.add_argument("--where", default="keep", help="SQL condition over the manifest columns (default: keep)")
    p.add_argument(
        "--out",
        required=True,
        help="new or empty directory for the shards; with --uids-only, the .parquet file to write",
    )
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per tar (default 10,000)")
    p.add_argument("--uids-only", action="store_true", help="write only the selected uids, as Parquet")
    p.set_defaults(func=cmd_select)


def cmd_select(args: argparse.Namespace) -> int:
    import duckdb

    from curation.query import NoManifests, connect

    if args.shard_size < 1:
        return _fail("--shard-size must be >= 1")
    out = Path(args.out)
    try:
        con = connect(args.output)
    except NoManifests as e:
        return _fail(str(e))
    try:
        if args.uids_only:
            return select_uids(con, args.where, out)
        result = select_shards(con, Path(args.output), args.where, out, args.shard_size)
    except SelectError as e:
        return _fail(str(e))
    except duckdb.Error as e:
        return _fail(f"--where {args.where!r}: {e}")
    print(
        f"wrote {result.samples:,} samples in {len(result.sizes)} shard(s) to {out}"
        + (
            f"; {result.no_image:,} selected rows have no image (not downloaded) and are left out"
            if result.no_image
            else ""
        )
    )
    if result.unreadable:
        print(
            f"curate: {len(result.unreadable):,} selected images could not be read, left out:",
            file=sys.stderr,
        )
        for msg in result.unreadable[:10]:
            print(f"  {msg}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


class SelectError(Exception):
    pass


def _fail(msg: str) -> int:
    print(f"curate: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


# ---------------------------------------------------------------------------- uids


def select_uids(con: Any, where: str, out: Path) -> int:
    if out.suffix != ".parquet":
        raise SelectError("with --uids-only, --out is the Parquet file to write (FILE.parquet)")
    if out.exists():
        raise SelectError(f"{out} exists; choose a new file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    target = str(tmp).replace("'", "''")
    try:
        con.execute(
            f"COPY (SELECT uid FROM samples WHERE ({where}) ORDER BY uid) TO '{target}' (FORMAT parquet)"
        )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    import pyarrow.parquet as pq

    n = pq.ParquetFile(out).metadata.num_rows
    print(f"wrote {n:,} uids to {out}")
    return EXIT_OK


# ---------------------------------------------------------------------------- shards


@dataclass
class SelectResult:
    sizes: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    no_image: int = 0
    unreadable: list[str] = field(default_factory=list)


def select_shards(con: Any, run: Path, where: str, out: Path, shard_size: int) -> SelectResult:
    columns = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    if "image_path" not in columns:
        raise SelectError(
            f"{run} has no images: its pipeline has no download stage and its input is not webdataset or "
            "image_folder. Use --uids-only for a list of uids."
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SelectError(f"{out} exists and is not an empty directory; choose a new --out")
    # fetchall, not fetchone: DuckDB keeps a half-read result open and refuses the next query
    sql = f"SELECT count(*) FROM samples WHERE ({where}) AND image_path IS NULL"
    [(no_image,)] = con.execute(sql).fetchall()

    # Read before any image: a vocabulary that no longer matches the run fails the selection up front.
    vocabulary = run_vocabulary(run) if "concept_ids" in columns else None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    result = SelectResult(no_image=no_image)
    try:
        with _ShardWriter(tmp, shard_size) as writer:
            for row, image in _images(con, run, where, result.unreadable):
                try:
                    writer.write(row, image)
                except OSError as e:  # PIL cannot decode it (UnidentifiedImageError is an OSError)
                    result.unreadable.append(f"{row['image_path']} {row['key'] or ''}: {e}")
        result.sizes = writer.sizes
        result.samples = sum(writer.sizes.values())
        (tmp / "sizes.json").write_text(json.dumps(writer.sizes, indent=1) + "\n")
        if vocabulary is not None:
            from curation.teachers import write_vocabulary

            write_vocabulary(tmp / VOCABULARY_FILE, vocabulary)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def run_vocabulary(run: Path) -> list[str]:
    """The concept vocabulary of a run's concepts stage, checked against the hash its run.json recorded."""
    from curation.teachers import TeacherError, resolve_vocabulary, vocabulary_sha256

    record = json.loads((run / "run.json").read_text())
    fingerprint = record.get("fingerprint", {})
    params = next((s["concepts"] for s in fingerprint.get("stages", []) if "concepts" in s), None)
    recorded = fingerprint.get("stage_fingerprints", {}).get("concepts", {}).get("vocabulary_sha256")
    if params is None or recorded is None:
        raise SelectError(f"{run}/run.json records no concepts stage, but its manifests have concept columns")
    try:
        names = resolve_vocabulary(params["teacher"], params.get("vocabulary"))
    except TeacherError as e:
        raise SelectError(f"the run's concept vocabulary: {e}") from None
    if vocabulary_sha256(names) != recorded:
        raise SelectError(
            f"the concept vocabulary {params.get('vocabulary') or params['teacher']!r} changed since {run} was "
            "scored: its concept ids no longer index it. Restore the file, or re-run the concepts stage."
        )
    return names


def _images(con: Any, run: Path, where: str, unreadable: list[str]) -> Iterator[tuple[dict, bytes]]:
    """(manifest row, image bytes) of every selected sample, reading each tar once."""
    reader = con.sql(
        f"SELECT * FROM samples WHERE ({where}) AND image_path IS NOT NULL ORDER BY image_path, key, uid"
    ).to_arrow_reader(10_000)
    group: list[dict] = []
    for batch in reader:
        for row in batch.to_pylist():
            if group and row["image_path"] != group[0]["image_path"]:
                yield from _read_group(run, group, unreadable)
                group = []
            group.append(row)
    if group:
        yield from _read_group(run, group, unreadable)


def _read_group(run: Path, rows: list[dict], unreadable: list[str]) -> Iterator[tuple[dict, bytes]]:
    import fsspec

    path = rows[0]["image_path"]
    # Relative paths are relative to the run's output (downloads); input files are absolute.
    where = path if "://" in path else str(run / path)
    try:
        if rows[0]["key"] is None:  # an image file (image_folder input)
            with fsspec.open(where, "rb") as f:
                data = f.read()
            for row in rows:
                yield row, data
            return
        wanted = {row["key"]: row for row in rows}
        with fsspec.open(where, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                if info.isfile() and key in wanted and ext.lower() in IMAGE_EXTENSIONS:
                    member = tar.extractfile(info)
                    assert member is not None
                    yield wanted.pop(key), member.read()
        unreadable += [f"{where}: no image for key {k}" for k in wanted]
    except (OSError, tarfile.TarError) as e:
        unreadable.append(f"{where}: {type(e).__name__}: {e}")


def image_extension(data: bytes) -> str | None:
    """The extension webdataset and open_clip decode these bytes under, from their magic number."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


class _ShardWriter:
    """Numbered tars of at most `shard_size` samples; `sizes` counts what each holds."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder = folder
        self.shard_size = shard_size
        self.sizes: dict[str, int] = {}
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._mtime = time.time()

    def write(self, row: dict, image: bytes) -> None:
        """Add one sample; raises OSError, writing nothing, when `image` cannot be decoded."""
        ext = image_extension(image)
        if ext is None:
            # open_clip reads jpg/png/webp only: other formats (bmp, gif, tiff...) become PNG.
            from PIL import Image

            buf = io.BytesIO()
            Image.open(io.BytesIO(image)).save(buf, format="PNG")
            image, ext = buf.getvalue(), "png"
        if self._tar is None or self.sizes[self._name] >= self.shard_size:
            self._open_next()
        assert self._tar is not None
        key = f"{self.count:09d}"
        # `key` names the sample in these shards; where its image came from stays in source_key/image_path.
        meta = {**row, "key": key, "source_key": row.get("key")}
        self._add(f"{key}.{ext}", image)
        self._add(f"{key}.txt", (row.get("caption") or "").encode("utf-8"))
        self._add(f"{key}.json", json.dumps(meta, default=str, ensure_ascii=False).encode("utf-8"))
        if row.get("concept_ids") is not None:
            # 8 significant digits round-trip the manifest's float32 probabilities exactly.
            probs = [float(f"{p:.8g}") for p in row["concept_probs"]]
            targets = {"ids": row["concept_ids"], "probs": probs}
            self._add(f"{key}.concepts.json", json.dumps(targets).encode("utf-8"))
        self.sizes[self._name] += 1
        self.count += 1

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = self._mtime
        info.mode = 0o444
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    def _open_next(self) -> None:
        self.close()
        self._name = f"{len(self.sizes):05d}.tar"
        self.sizes[self._name] = 0
        # Held open across `write` calls and closed by `close`, hence no `with`.
        self._tar = tarfile.open(self.folder / self._name, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
