"""The manifest's Arrow schema, versioned in this one module.

A manifest row is one input pair. Column names follow the ecosystem where one
exists (img2dataset's url/caption/key/status/..., DataComp's uid). Renaming or
retyping a column requires bumping SCHEMA_VERSION.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pyarrow as pa

SCHEMA_VERSION = 2

# Identity columns, always first, always present.
ID_COLUMNS: dict[str, pa.DataType] = {
    "uid": pa.string(),
    "shard": pa.int32(),
    "url": pa.string(),
    "caption": pa.string(),
}

# The raw measurements stages add are declared on each stage (`Stage.columns`, name -> type); the
# registry lists them all (`curation.stages.manifest_columns`).

# Where an image lives, and its bytes: written by the inputs that bring their images (webdataset,
# image_folder) and by the download stage. `image_path` is a tar (downloads, webdataset input) or an
# image file (image_folder input), for `curate select` and training; relative paths are relative to
# the run's output directory. `key` is the sample's key inside that tar (null for a plain file).
IMAGE_COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(),
    "image_path": pa.string(),
    "image": pa.binary(),  # encoded bytes handed from the input or download to image stages; transient
}
# Inputs that bring their images: whether the sample could be read
# (ok | too_large | duplicate_key | bad_caption | outside_folder | not_a_file | unreadable), and why not.
READ_COLUMNS: dict[str, pa.DataType] = {"read_status": pa.string(), "read_error": pa.string()}

# Numeric columns that identify content rather than measure it: no histograms, no thresholds.
HASH_COLUMNS: frozenset[str] = frozenset({"phash"})

# Decision columns, always last.
DECISION_COLUMNS: dict[str, pa.DataType] = {
    "keep": pa.bool_(),
    "drop_reason": pa.string(),  # why: complexity, action, download, decode, text_spotting
    "drop_stage": pa.string(),  # which configured stage dropped it (two stages may share a reason)
}

# Columns that travel between stages in memory but are never written to a
# manifest (encoded image bytes, for example).
TRANSIENT_COLUMNS: frozenset[str] = frozenset({"image"})


def make_uid(url: str | None, caption: str | None) -> str:
    """Stable sample id: the first 128 bits of sha256(url, NUL, caption), as 32 hex chars."""
    data = f"{url or ''}\x00{caption or ''}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:32]


def make_uids(urls: Iterable[str | None], captions: Iterable[str | None]) -> pa.Array:
    return pa.array([make_uid(u, c) for u, c in zip(urls, captions)], type=pa.string())


def manifest_schema(carried: pa.Schema, stage_columns: Iterable[tuple[str, pa.DataType]]) -> pa.Schema:
    """Schema of a manifest: ids, carried input columns, stage columns (name, type) in stage order, decision."""
    fields = [pa.field(n, t) for n, t in ID_COLUMNS.items()]
    fields += list(carried)
    seen = set()
    for name, typ in stage_columns:
        if name not in seen and name not in TRANSIENT_COLUMNS:
            seen.add(name)
            fields.append(pa.field(name, typ))
    fields += [pa.field(n, t) for n, t in DECISION_COLUMNS.items()]
    return pa.schema(fields, metadata={"curate.schema_version": str(SCHEMA_VERSION)})
