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

A uid is a (url, caption) pair: an input that repeats a pair has several manifest
rows with one uid (nothing is dropped from a manifest), and a selection holds
each uid at most once, so a pair listed twice is not trained on twice.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.core.imageio import DEFAULT_MAX_PIXELS, ImageRefused, image_size, open_image
from curation.core.outputs import RunLocked, exclusive_lock_on
from curation.core.shards import (
    CAPTION,
    CONCEPTS,
    IMAGE_EXTENSIONS,
    META,
    VOCABULARY_FILE,
    ShardError,
    TarWriter,
    normalise_key,
    read_samples,
)
from curation.core.storage import Store, open_store
from curation.query import condition


class SelectError(Exception):
    """A selection that cannot be made as asked (one line for the user)."""


UID_FORMATS = (".parquet", ".npy")


def select_uids(con: Any, where: str, out: Path | str, *, force: bool = False) -> int:
    """Write the distinct selected uids to `out` (a local file or a URL) atomically; returns how many.

    FILE.parquet: a `uid` column (and `input_uid`, the input's own uid, when the input had one).
    FILE.npy: DataComp's subset format, the 128-bit uids as a sorted array of dtype `u8,u8`
    (high and low 64 bits) -- the input's own uid (DataComp's pools carry one) where there is one.
    A URL (s3://bucket/subset.npy) is written to this machine's temp folder, then put whole
    through the storage layer; an existing object is replaced only with `force`.
    """
    suffix = Path(str(out)).suffix
    if suffix not in UID_FORMATS:
        raise SelectError("with --uids-only, --out is the file to write: FILE.parquet or FILE.npy (DataComp)")
    if isinstance(out, Path):
        return _write_uids(con, where, out)
    folder, _, name = out.rstrip("/").rpartition("/")
    store = open_store(folder)
    store.check()
    if store.exists(name) and not force:
        raise SelectError(f"{out} exists; choose a new --out or pass --force to replace it")
    tmp = store.staging() / f"{uuid.uuid4().hex}-{name}"
    try:
        n = _write_uids(con, where, tmp)
        store.put_file(tmp, name)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _write_uids(con: Any, where: str, out: Path) -> int:
    from curation.query import select_statement, write_file

    columns = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    carried = "input_uid" in columns
    if out.suffix == ".parquet":
        cols = "uid, any_value(input_uid) AS input_uid" if carried else "uid"
        sql = f"SELECT {cols} FROM samples WHERE {condition(where)} GROUP BY uid ORDER BY uid"
        return write_file(con, select_statement(sql), out, "parquet")
    uid = "coalesce(CAST(input_uid AS VARCHAR), uid)" if carried else "uid"
    sql = f"SELECT DISTINCT {uid} AS u FROM samples WHERE {condition(where)}"
    # Streamed in batches: 16 bytes a uid in memory (1.6 GB at 100M), never a Python string per uid.
    reader = con.sql(select_statement(sql)).to_arrow_reader(FETCH_BATCH)
    array = _concat_uids([datacomp_uids(batch.column(0)) for batch in reader])
    array.sort()
    _write_npy_atomic(array, out)
    return len(array)


FETCH_BATCH = 1 << 20  # uids converted at a time


def _concat_uids(parts: list[Any]) -> Any:
    import numpy as np

    return np.concatenate(parts) if parts else np.zeros(0, np.dtype("u8,u8"))


def datacomp_uids(uids: Any) -> Any:
    """32-hex-digit uids (a list, or an Arrow array: one batch) as DataComp's sorted `u8,u8` array;
    raises SelectError naming a malformed one."""
    import numpy as np

    values = uids.to_pylist() if hasattr(uids, "to_pylist") else uids
    for u in values:
        if not isinstance(u, str) or len(u) != 32 or any(c not in "0123456789abcdefABCDEF" for c in u):
            raise SelectError(f"uid {u!r} is not 32 hex digits: DataComp's .npy format holds 128-bit uids")
    array = np.zeros(len(values), np.dtype("u8,u8"))
    array["f0"] = np.fromiter((int(u[:16], 16) for u in values), np.uint64, len(values))
    array["f1"] = np.fromiter((int(u[16:], 16) for u in values), np.uint64, len(values))
    array.sort()
    return array


def _write_npy_atomic(array: Any, out: Path) -> None:
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- shards


@dataclass
class SelectResult:
    sizes: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    no_image: int = 0
    unreadable: list[str] = field(default_factory=list)


def select_shards(
    con: Any,
    run: str | Path,
    where: str,
    out: Path | str,
    shard_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    replace: bool = False,
    blur_faces: bool = False,
    command: list[str] | None = None,
    images_from: Sequence[str] = (),
) -> SelectResult:
    """Write the selected samples of `run` (a local directory or a URL) as shards to the new (or empty)
    `out`, a local directory that appears complete or not at all, or an empty object-store prefix.
    `replace`: a local `out` is replaced. Each sample's .json carries its provenance, and a dataset card
    (curation/card.py) naming `command` as the way to reproduce it is written beside sizes.json.
    `images_from`: locations besides the run's own output that images may be read from
    (`--images-from`; see ImageSources)."""
    columns = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    if "image_path" not in columns:
        raise SelectError(
            f"{run} has no images: its pipeline has no download stage and its input is not webdataset or "
            "image_folder. Use --uids-only for a list of uids."
        )
    if blur_faces and "face_boxes" not in columns:
        raise SelectError(f"--blur-faces needs face boxes: {run} has no faces stage in its pipeline")
    from curation.query import select_statement

    # Selected uids none of whose rows has an image. fetchall, not fetchone: DuckDB keeps a
    # half-read result open and refuses the next query.
    sql = (
        f"SELECT count(*) FROM (SELECT uid FROM samples WHERE {condition(where)} GROUP BY uid "
        "HAVING count(image_path) = 0)"
    )
    [(no_image,)] = con.execute(select_statement(sql)).fetchall()

    # Read before any image: a vocabulary that no longer matches the run fails the selection up front.
    vocabulary = run_vocabulary(run) if "concept_ids" in columns else None

    result = SelectResult(no_image=no_image)
    # One writer per --out, as `run`, `dedup` and `mine` (two selects at once would leave a mix): a lock
    # object in the prefix on an object store, a lock file beside a local folder (which is renamed whole).
    if isinstance(out, str):
        store = open_store(out)
        store.check()
        lock, lock_name = store, LOCK
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock, lock_name = open_store(out.parent), f".{out.name}{LOCK}"
    try:
        # A local lock file lies beside the output, so it goes when released (remove=True).
        with exclusive_lock_on(lock, lock_name, f"another `curate select` is writing to {out}", remove=True):
            _select_into(
                con,
                run,
                where,
                out,
                shard_size,
                max_pixels,
                replace,
                vocabulary,
                result,
                _Writing(blur_faces, command or [], tuple(images_from)),
            )
    except RunLocked as e:
        raise SelectError(str(e)) from None
    return result


LOCK = ".lock"


@dataclass(frozen=True)
class _Writing:
    """How the selected samples are written: faces blurred, the command for the dataset card, and
    where images may be read from besides the run's own output."""

    blur_faces: bool
    command: list[str]
    images_from: tuple[str, ...]


def _select_into(
    con: Any,
    run: str | Path,
    where: str,
    out: Path | str,
    shard_size: int,
    max_pixels: int,
    replace: bool,
    vocabulary: list[str] | None,
    result: SelectResult,
    writing: _Writing,
) -> None:
    """`select_shards`' writing, under the output's lock."""
    if isinstance(out, str):
        # An object store has no directory rename: each tar is committed whole, sizes.json last,
        # into a prefix that must be empty (a select killed midway leaves tars without sizes.json).
        store = open_store(out)
        if [n for n in store.list("") if n != LOCK]:
            raise SelectError(f"{out} is not empty; choose a new --out")
        _write_selection(con, run, where, store, shard_size, max_pixels, vocabulary, result, writing)
        return
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not replace)):
        raise SelectError(f"{out} exists and is not an empty directory; choose a new --out")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_selection(
            con, run, where, open_store(tmp), shard_size, max_pixels, vocabulary, result, writing
        )
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        if out.exists():
            os.replace(out, old)  # a rename: `out` is never half old, half new
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_selection(
    con: Any,
    run: str | Path,
    where: str,
    target: Store,
    shard_size: int,
    max_pixels: int,
    vocabulary: list[str] | None,
    result: SelectResult,
    writing: _Writing,
) -> None:
    from curation.card import CARD_JSON, CARD_MD, card_markdown, dataset_card, provenance_columns

    try:
        record = open_store(run).get_json("run.json")
    except (OSError, ValueError):
        record = {}
    columns = [r[0] for r in con.execute("DESCRIBE samples").fetchall()]
    writer_provenance = (provenance_columns(columns), record.get("config_hash"))
    with _TarWriter(target, shard_size, max_pixels, writing.blur_faces, writer_provenance) as writer:
        for row, image in _images(con, run, where, result.unreadable, writing.images_from):
            try:
                writer.write(row, image)
            except ImageRefused as e:  # too large (a decompression bomb), or not decodable
                result.unreadable.append(f"{row['image_path']} {row['key'] or ''}: {e}")
        if vocabulary is not None:
            from curation.models.vocabulary import vocabulary_text

            target.put_bytes(VOCABULARY_FILE, vocabulary_text(vocabulary).encode("utf-8"))
        # Before the writer closes: sizes.json stays the last object written (a complete selection).
        selection = {
            "samples": writer.shards.count,
            "shards": len(writer.sizes),
            "faces_blurred": writing.blur_faces,
            "left_out_unreadable": len(result.unreadable),
        }
        card = dataset_card(con, str(run), record, where, writing.command, selection)
        target.put_bytes(CARD_JSON, (json.dumps(card, indent=1, default=str) + "\n").encode("utf-8"))
        target.put_bytes(CARD_MD, card_markdown(card).encode("utf-8"))
    result.sizes = writer.sizes
    result.samples = sum(writer.sizes.values())


def run_vocabulary(run: str | Path) -> list[str]:
    """The concept vocabulary of a run's concepts stage, checked against the hash its run.json recorded."""
    from curation.query import VocabularyUnavailable, concept_vocabulary

    try:
        return concept_vocabulary(run)
    except VocabularyUnavailable as e:
        raise SelectError(str(e)) from None


def _images(
    con: Any, run: str | Path, where: str, unreadable: list[str], images_from: Sequence[str] = ()
) -> Iterator[tuple[dict, bytes]]:
    """(manifest row, image bytes) of every selected uid (its first row with an image), reading each tar once."""
    from curation.query import select_statement

    # Input order (shard, then row within it): two selects of one run write the same tars, and a
    # shard's rows lie in one input tar or in a few consecutive download tars, so each is read once.
    sql = (
        f"SELECT * EXCLUDE (file_row_number) FROM samples_in_order WHERE {condition(where)} "
        "AND image_path IS NOT NULL "
        "QUALIFY row_number() OVER (PARTITION BY uid ORDER BY shard, file_row_number) = 1 "
        "ORDER BY shard, file_row_number"
    )
    reader = con.sql(select_statement(sql)).to_arrow_reader(10_000)
    sources = ImageSources(run, images_from)
    group: list[dict] = []
    for batch in reader:
        for row in batch.to_pylist():
            if group and row["image_path"] != group[0]["image_path"]:
                yield from _in_row_order(group, read_image_group(run, group, unreadable, sources))
                group = []
            group.append(row)
    if group:
        yield from _in_row_order(group, read_image_group(run, group, unreadable, sources))


def _in_row_order(rows: list[dict], pairs: Iterator[tuple[dict, bytes]]) -> Iterator[tuple[dict, bytes]]:
    """`pairs` (in the tar's member order) in the order of `rows`. An input tar is already in row order
    and nothing waits; a download tar is in download-completion order, and at most its images wait."""
    position = {id(row): i for i, row in enumerate(rows)}
    waiting: dict[int, tuple[dict, bytes]] = {}
    nxt = 0
    for pair in pairs:
        waiting[position[id(pair[0])]] = pair
        while nxt in waiting:
            yield waiting.pop(nxt)
            nxt += 1
    yield from (waiting[i] for i in sorted(waiting))  # those after a row whose image was unreadable


# Object stores reached with the user's own credentials (a run's input or output may live there).
# Network hosts (http, ftp, sftp, ...) are never: a manifest row cannot make curate connect anywhere.
STORAGE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})


class ImageSources:
    """Where a run's images may be read from: its own output, the input locations of its plan when this
    user's `curate run` wrote that plan (run.json signed with the user's run key), and the locations the
    user names on the command line (`--images-from`: the input tars or image folder of a run made by
    someone else, or elsewhere).

    The run is a local directory or a URL (s3://bucket/run): relative `image_path`s (downloads) are
    relative to it either way, and are read from the run's own storage. A manifest's `image_path` is
    data, and a run (its run.json included) may come from someone else: a row that names any other
    place (a host, a file or object outside the run and the named locations) is refused with a reason,
    never opened. A plan this user did not write never widens what is read: a stranger's plan may
    list `/` or another bucket.
    """

    def __init__(self, run: str | Path, images_from: Sequence[str] = ()) -> None:
        self.store = open_store(run)
        self.root = os.path.realpath(run) if self.store.local else None
        named = [
            str(p).rstrip("/")
            if "://" in str(p) and not str(p).startswith("file://")
            else os.path.realpath(str(p).removeprefix("file://"))
            for p in images_from
        ]
        from curation.rundir import RunDir

        self.inputs: list[str] = named + RunDir(run).trusted_inputs()

    def locate(self, image_path: str) -> str:
        """The location to open for `image_path`; raises ImageLocationRefused saying why not."""
        protocol, sep, rest = image_path.partition("://")
        if sep and protocol.lower() != "file":
            if protocol.lower() not in STORAGE_PROTOCOLS:
                raise ImageLocationRefused(
                    f"refused: {protocol}:// names a network host; a run's images are read only from its "
                    "own output and input storage"
                )
            if "/.." in image_path or "/./" in image_path:
                raise ImageLocationRefused("refused: a URL with `..` or `.` segments")
            allowed = [*self.inputs, *([] if self.store.local else [self.store.url])]
            if not any(image_path == p or image_path.startswith(p.rstrip("/") + "/") for p in allowed):
                raise ImageLocationRefused(REFUSED_LOCATION)
            return image_path
        local = rest if sep else image_path
        if self.root is None:  # the run is on an object store: its own files are objects under its URL
            if not os.path.isabs(local):
                rel = posixpath.normpath(local)
                if rel == ".." or rel.startswith(("../", "/")):
                    raise ImageLocationRefused("refused: outside the run's output")
                return self.store.url_of(rel)
            real = os.path.realpath(local)
        else:
            # Relative paths are relative to the run's output (downloads); input files are absolute.
            real = os.path.realpath(local if os.path.isabs(local) else os.path.join(self.root, local))
            if _inside(real, self.root):
                return real
        for p in self.inputs:
            if "://" not in p and _inside(real, os.path.realpath(p)):
                return real
        raise ImageLocationRefused(REFUSED_LOCATION)


REFUSED_LOCATION = (
    "refused: outside the run's output, the inputs of a plan this user's `curate run` wrote, and the "
    "locations named with --images-from (give it the input folder or tars if you trust them)"
)


class ImageLocationRefused(Exception):
    pass


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def read_image_group(
    run: str | Path, rows: list[dict], unreadable: list[str], sources: ImageSources | None = None
) -> Iterator[tuple[dict, bytes]]:
    """(row, image bytes) for manifest rows that share one `image_path`, opening it once.

    A tar is read up to the last wanted key; where it can seek (a local file),
    the members in between are skipped by their headers, not read, so a few
    samples out of a large tar (`curate report`) cost little. What cannot be
    read is described in `unreadable` instead.
    """
    import fsspec

    path = rows[0]["image_path"]
    shared: set[str] = set()
    try:
        where = (sources or ImageSources(run)).locate(path)
    except ImageLocationRefused as e:
        unreadable += [f"{path} {row.get('key') or ''}: {e}" for row in rows]
        return
    try:
        if rows[0]["key"] is None:  # an image file (image_folder input)
            with fsspec.open(where, "rb") as f:
                data = f.read()
            for row in rows:
                yield row, data
            return
        wanted: dict[str, dict] = {}
        for row in rows:
            key = normalise_key(row["key"])  # manifests of older runs hold `./`-prefixed keys
            if key in wanted or key in shared:
                # Two selected rows naming one key: whichever image is read, one row gets another's.
                shared.add(key)
                wanted.pop(key, None)
            else:
                wanted[key] = row
        unreadable += [f"{where}: key {k} names more than one sample of this tar" for k in sorted(shared)]
        samples = read_samples(where, read=lambda key, ext: key in wanted and ext in IMAGE_EXTENSIONS)
        for sample in samples:
            if sample.key not in wanted:
                continue
            if sample.status is not None:
                unreadable.append(f"{where}: {sample.key}: {sample.status}: {sample.detail}")
                wanted.pop(sample.key)
            elif (image := sample.image()) is not None:
                yield wanted.pop(sample.key), image[1]
            if not wanted:
                break
        unreadable += [f"{where}: no image for key {k}" for k in wanted]
    except (OSError, ShardError) as e:
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


def _blurred(image: bytes, boxes: list[dict], ext: str | None, max_pixels: int) -> tuple[bytes, str]:
    """The image with its face boxes blurred, encoded again in its own format (PNG if open_clip cannot
    read that format)."""
    from curation.stages import blur_faces

    out = blur_faces(open_image(image, max_pixels), boxes)
    ext = ext or "png"
    buf = io.BytesIO()
    out.save(
        buf,
        **{
            "jpg": {"format": "JPEG", "quality": 95},
            "png": {"format": "PNG"},
            "webp": {"format": "WEBP", "quality": 95},
        }[ext],
    )
    return buf.getvalue(), ext


class _TarWriter:
    """`curation.core.shards.TarWriter`, with the checks training needs: each image's header within
    `max_pixels`, and formats open_clip cannot read converted to PNG."""

    def __init__(
        self,
        folder: Store,
        shard_size: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        blur_faces: bool = False,
        provenance: tuple[list[str], str | None] | None = None,
    ) -> None:
        self.max_pixels = max_pixels
        self.blur_faces = blur_faces
        self.provenance = provenance  # (licence columns, run fingerprint): curation.card.provenance
        self.shards = TarWriter(folder, shard_size)

    @property
    def sizes(self) -> dict[str, int]:
        return self.shards.sizes

    def write(self, row: dict, image: bytes) -> None:
        """Add one sample; raises ImageRefused, writing nothing, for an image too large or not decodable."""
        ext = image_extension(image)
        if self.blur_faces:
            if row.get("faces") is None:  # never looked at: it may show a face
                raise ImageRefused(
                    "no_faces_result", "the faces stage did not look at it; left out by --blur-faces"
                )
            if row["faces"]:
                image, ext = _blurred(image, row["face_boxes"], ext, self.max_pixels)
        if ext is None:
            # open_clip reads jpg/png/webp only: other formats (bmp, gif, tiff...) become (RGB) PNG.
            buf = io.BytesIO()
            open_image(image, self.max_pixels).save(buf, format="PNG")
            image, ext = buf.getvalue(), "png"
        else:
            image_size(image, self.max_pixels)  # the trainer decodes what is written: no bombs
        key = f"{self.shards.count:09d}"
        # `key` names the sample in these shards; where its image came from stays in source_key/image_path.
        meta = {**row, "key": key, "source_key": row.get("key")}
        if self.provenance is not None:
            from curation.card import provenance

            meta["provenance"] = provenance(row, *self.provenance)
        members = {
            ext: image,
            CAPTION: (row.get("caption") or "").encode("utf-8"),
            META: json.dumps(meta, default=str, ensure_ascii=False).encode("utf-8"),
        }
        if row.get("concept_ids") is not None:
            # 8 significant digits round-trip the manifest's float32 probabilities exactly.
            probs = [float(f"{p:.8g}") for p in row["concept_probs"]]
            members[CONCEPTS] = json.dumps({"ids": row["concept_ids"], "probs": probs}).encode("utf-8")
        self.shards.add(key, members)

    def __enter__(self) -> _TarWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shards.__exit__(*exc)


# ---------------------------------------------------------------------------- dedup, top fraction


def leave_out_contaminated(con: Any, where: str, *, say: Callable[[str], None] | None = None) -> str:
    """`where` without the uids `curate decontaminate` matched to evaluation images (when it has run)."""
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    if "decontamination" not in views:
        return where
    from curation.query import select_statement

    sql = (
        f"SELECT count(DISTINCT uid) FROM samples WHERE {condition(where)} "
        "AND uid IN (SELECT uid FROM decontamination)"
    )
    [(n,)] = con.execute(select_statement(sql)).fetchall()
    if say and n:
        say(f"{n:,} selected uid(s) match evaluation images (`curate decontaminate`): left out")
    return f"{condition(where)} AND uid NOT IN (SELECT uid FROM decontamination)"


def narrow(
    con: Any,
    where: str,
    *,
    dedup: bool = False,
    top_fraction: float | None = None,
    by: str | None = None,
    say: Callable[[str], None] | None = None,
) -> str:
    """`where` further restricted to one row per duplicate group and/or the top fraction by a column.

    Both are decided over the whole run by DuckDB, in that order: duplicates
    first (a group's best-ranked row among those `where` selects), then the
    fraction, with DataComp's rule: with n rows having a value, the threshold
    is the value at 0-based position int(n * fraction) in descending order, and
    rows at or above it are kept.
    """
    if not dedup and top_fraction is None:
        return where
    from curation.query import select_statement  # the user's `where` is in these queries

    columns = {r[0]: r[1] for r in con.execute("DESCRIBE samples").fetchall()}
    if dedup:
        views = {
            r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
        }
        if "dedup" not in views:
            raise SelectError("--dedup needs the duplicate table: run `curate dedup OUTPUT` first")
        chosen = (
            f"SELECT uid FROM samples LEFT JOIN dedup USING (uid) WHERE {condition(where)} "
            "QUALIFY dup_group IS NULL OR row_number() OVER (PARTITION BY dup_group ORDER BY dup_rank) = 1"
        )
        where = f"{condition(where)} AND uid IN ({chosen})"
    if top_fraction is not None:
        assert by is not None
        if by not in columns:
            raise SelectError(f"--by {by!r}: no such column in the manifests")
        if not any(t in columns[by] for t in ("INT", "FLOAT", "DOUBLE", "DECIMAL", "REAL")):
            raise SelectError(f"--by {by!r} is {columns[by]}, not a numeric column")
        col = '"' + by.replace('"', '""') + '"'
        [(n,)] = con.execute(
            select_statement(f"SELECT count({col}) FROM samples WHERE {condition(where)}")
        ).fetchall()
        position = int(n * top_fraction)
        rows = con.execute(
            select_statement(
                f"SELECT {col} FROM samples WHERE {condition(where)} AND {col} IS NOT NULL ORDER BY {col} DESC "
                f"LIMIT 1 OFFSET {position}"
            )
        ).fetchall()
        threshold = rows[0][0] if rows else None
        where = f"{condition(where)} AND {col} IS NOT NULL" + (
            f" AND {col} >= {threshold!r}" if threshold is not None else ""
        )
        if say is not None:
            say(
                f"top {100 * top_fraction:g}% by {by} of {n:,} rows: "
                + (f"{by} >= {threshold:.6g}" if threshold is not None else "all of them")
            )
    return where
