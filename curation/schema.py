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

# Raw measurements that stages add. A stage declares which of these it writes;
# keeping every type here means two stages can never disagree on one.
STAGE_COLUMNS: dict[str, pa.DataType] = {
    # caption_complexity / caption_action (docs/methods.md §1a-1b)
    "caption_complexity": pa.int32(),
    "caption_actions": pa.int32(),
    "caption_verbs": pa.int32(),
    "caption_tokens": pa.int32(),
    "caption_status": pa.string(),  # ok | empty | truncated
    # download (img2dataset's per-sample columns, under img2dataset's names)
    "status": pa.string(),  # success | failed_to_download | failed_to_resize
    "error_message": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "original_width": pa.int32(),
    "original_height": pa.int32(),
    "sha256": pa.string(),  # of the downloaded bytes, before resizing
    # Where the image lives, for `curate select` and training. `image_path` is a
    # tar (downloads, webdataset input) or an image file (image_folder input);
    # relative paths are relative to the run's output directory. `key` is the
    # sample's key inside that tar (null for a plain file).
    "key": pa.string(),
    "image_path": pa.string(),
    # Inputs that bring their images (webdataset, image_folder): whether the sample could be read
    # (ok | too_large | duplicate_key | bad_caption | outside_folder | not_a_file | unreadable), and why not.
    "read_status": pa.string(),
    "read_error": pa.string(),
    # Encoded image bytes handed from download/sources to image stages; transient.
    "image": pa.binary(),
    # text_spotting (docs/methods.md §1c; definitions in curation/stages/text_spotting.py)
    "ocr_text": pa.string(),
    "ocr_boxes": pa.int32(),
    # one {text, box} per box; box = 4 corners x1,y1,...,x4,y4 as fractions of the image size
    "ocr_regions": pa.list_(pa.struct([("text", pa.string()), ("box", pa.list_(pa.float32()))])),
    "ocr_area": pa.float32(),  # union of text boxes / image area
    "ocr_caption_overlap": pa.float32(),
    "ocr_status": pa.string(),  # ok | no_image | too_large | truncated | decode_error
    # clip_score (curation/stages/clip_score.py): cosine of the image and caption embeddings
    "clip_score": pa.float32(),
    "clip_status": pa.string(),  # ok | no_image | too_large | truncated | decode_error | no_caption
    "clip_image_embedding": pa.list_(pa.float16()),  # L2-normalised; only with keep_embedding: true
    # caption_length: whitespace-separated words and Unicode code points of the raw caption
    "caption_words": pa.int32(),
    "caption_chars": pa.int32(),
    # caption_language: fastText lid.176 top-1 language (ISO 639 code) and its probability
    "caption_lang": pa.string(),
    "caption_lang_score": pa.float32(),
    # image_size: from original_width/original_height (download) or the image header; no decode
    "aspect_ratio": pa.float32(),  # long side / short side, >= 1
    "min_side": pa.int32(),  # short side in pixels
    "image_size_status": pa.string(),  # ok | no_image | too_large | truncated | decode_error
    # phash: 64-bit DCT perceptual hash (definition in curation/stages/phash.py), as signed int64
    "phash": pa.int64(),
    "phash_status": pa.string(),  # ok | no_image | too_large | truncated | decode_error
    # concepts (docs/methods.md §2b; curation/stages/concepts.py): a teacher's top-k, most probable first
    "concept_ids": pa.list_(pa.int32()),  # indices into the teacher's vocabulary
    "concept_probs": pa.list_(pa.float32()),  # descending
    "concept_status": pa.string(),  # ok | no_image | too_large | truncated | decode_error
}

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

RESERVED = {c.lower() for c in (*ID_COLUMNS, *STAGE_COLUMNS, *DECISION_COLUMNS, *TRANSIENT_COLUMNS)}


def carried_name(input_column: str) -> str:
    """Name under which an input column is carried into the manifest.

    DuckDB resolves identifiers case-insensitively, so an input column that
    collides with one of ours in any case is prefixed rather than shadowed.
    """
    return f"input_{input_column}" if input_column.lower() in RESERVED else input_column


def make_uid(url: str | None, caption: str | None) -> str:
    """Stable sample id: the first 128 bits of sha256(url, NUL, caption), as 32 hex chars."""
    data = f"{url or ''}\x00{caption or ''}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:32]


def make_uids(urls: Iterable[str | None], captions: Iterable[str | None]) -> pa.Array:
    return pa.array([make_uid(u, c) for u, c in zip(urls, captions)], type=pa.string())


def manifest_schema(carried: pa.Schema, stage_columns: Iterable[str]) -> pa.Schema:
    """Schema of a manifest: ids, carried input columns, stage columns in stage order, decision."""
    fields = [pa.field(n, t) for n, t in ID_COLUMNS.items()]
    fields += list(carried)
    seen = set()
    for name in stage_columns:
        if name not in seen and name not in TRANSIENT_COLUMNS:
            seen.add(name)
            fields.append(pa.field(name, STAGE_COLUMNS[name]))
    fields += [pa.field(n, t) for n, t in DECISION_COLUMNS.items()]
    return pa.schema(fields, metadata={"curate.schema_version": str(SCHEMA_VERSION)})
