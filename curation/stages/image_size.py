"""Image size and aspect ratio, without decoding (DataComp's basic filter: short side >= 200, ratio <= 3).

The dimensions are the *original* image's: img2dataset's `original_width` /
`original_height` after a `download` stage (its `width`/`height` are after
resizing, and with the default `resize_mode: border` every image becomes a
square, so they would say nothing about the source), else the image header of
webdataset / image_folder input (`curation.core.imageio.image_size`: the header is
read, the pixels never decoded; headers over `max_pixels` are refused as
`too_large`).

- `min_side` = min(width, height), in pixels;
- `aspect_ratio` = max(width, height) / min(width, height), >= 1, so a tall and a
  wide image of the same shape score the same (EXIF rotation cannot change it);
- `image_size_status`: `ok`, or why the size is unknown (`no_image`,
  `too_large`, `truncated`, `decode_error`: the row is dropped as `decode`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.core.imageio import DEFAULT_MAX_PIXELS
from curation.core.params import param
from curation.stages.base import Stage, decode_failed

# from original_width/original_height (download) or the image header; no decode
SIZE_COLUMNS: dict[str, pa.DataType] = {
    "aspect_ratio": pa.float32(),  # long side / short side, >= 1
    "min_side": pa.int32(),  # short side in pixels
    "image_size_status": pa.string(),  # ok | no_image | too_large | truncated | decode_error
}


@dataclass(frozen=True)
class ImageSizeParams:
    # Keep images whose short side is at least this many pixels (DataComp: 200).
    min_side: int = param(200, ge=0)
    # ... and whose long side / short side is at most this (DataComp: 3.0); null = any shape.
    max_aspect_ratio: float | None = param(3.0, ge=1, hint="long side / short side")
    # Headers declaring more pixels are refused (only read for inputs without img2dataset's sizes).
    max_pixels: int = param(DEFAULT_MAX_PIXELS, ge=1)


def _dimensions(table: pa.Table, max_pixels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(width, height, status) per row: img2dataset's original size where known, else the header."""
    from curation.core.imageio import ImageRefused, image_size

    n = table.num_rows
    width = np.zeros(n, np.int64)
    height = np.zeros(n, np.int64)
    status = ["no_image"] * n
    if "original_width" in table.column_names and "original_height" in table.column_names:
        w = table.column("original_width").to_pylist()
        h = table.column("original_height").to_pylist()
        for i in range(n):
            if w[i] and h[i]:
                width[i], height[i], status[i] = w[i], h[i], "ok"
    if "image" in table.column_names:
        images = table.column("image")
        for i in range(n):
            if status[i] == "ok":
                continue
            try:
                width[i], height[i] = image_size(images[i].as_py(), max_pixels)
                status[i] = "ok"
            except ImageRefused as e:
                status[i] = e.status
    return width, height, status


class ImageSize(Stage):
    """Drop images that are too small or too elongated, judged from their dimensions alone."""

    name = "image_size"
    columns: ClassVar[dict[str, pa.DataType]] = SIZE_COLUMNS
    bins: ClassVar[dict[str, tuple[float, float, float]]] = {
        "aspect_ratio": (1, 21, 0.02),
        "min_side": (0, 8192, 8),
    }
    cascade = True
    needs_images = True
    Params = ImageSizeParams

    def compute(self, table: pa.Table) -> pa.Table:
        width, height, status = _dimensions(table, self.params.max_pixels)
        known = (width > 0) & (height > 0)
        short = np.minimum(width, height)
        ratio = np.divide(np.maximum(width, height), short, out=np.zeros(len(short)), where=known)
        return pa.table(
            {
                "aspect_ratio": pa.array(ratio.astype(np.float32), mask=~known),
                "min_side": pa.array(short.astype(np.int32), mask=~known),
                "image_size_status": pa.array(status, pa.string()),
            }
        )

    def decide(self, table: pa.Table) -> pa.Array:
        p = self.params
        status = table.column("image_size_status")
        failed = decode_failed(status)
        small = pc.fill_null(pc.less(table.column("min_side"), p.min_side), False)
        bad = small
        if p.max_aspect_ratio is not None:
            # float32 storage: compare at that precision, so a ratio of exactly the limit passes.
            limit = pa.scalar(p.max_aspect_ratio, pa.float32())
            bad = pc.or_(bad, pc.fill_null(pc.greater(table.column("aspect_ratio"), limit), False))
        null = pa.scalar(None, pa.string())
        reason = pc.if_else(bad, pa.scalar("image_size"), null)
        reason = pc.if_else(failed, pa.scalar("decode"), reason)
        return reason

    def thresholds(self) -> dict[str, tuple[str, float]]:
        out: dict[str, tuple[str, float]] = {"min_side": (">=", float(self.params.min_side))}
        if self.params.max_aspect_ratio is not None:
            out["aspect_ratio"] = ("<=", self.params.max_aspect_ratio)
        return out
