"""Perceptual hash (pHash) of each image, for near-duplicate detection by `curate dedup`.

The hash is defined in `curation.core.phash` (shared with the clip-art benchmark).

The stage also fills `sha256` (of the image bytes) when no earlier stage has:
webdataset and image_folder inputs have no download record, and `curate dedup`
finds exact duplicates by it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa

from curation.core.imageio import DEFAULT_MAX_PIXELS
from curation.core.params import param
from curation.core.phash import DCT_SIDE, grey_32, phash_bits
from curation.stages.base import Stage, column_values, decode_reasons

PHASH_COLUMNS: dict[str, pa.DataType] = {
    "phash": pa.int64(),  # the 64-bit hash (curation.core.phash), as signed int64
    "phash_status": pa.string(),  # ok | no_image | too_large | truncated | decode_error
    "sha256": pa.string(),  # of the image bytes (download writes it too: the bytes it fetched)
}


@dataclass(frozen=True)
class PhashParams:
    max_pixels: int = param(DEFAULT_MAX_PIXELS, ge=1)


class Phash(Stage):
    """Hash every kept image for `curate dedup`; drops only images that cannot be decoded."""

    name = "phash"
    columns: ClassVar[dict[str, pa.DataType]] = PHASH_COLUMNS
    cascade = True
    needs_images = True
    Params = PhashParams

    def compute(self, table: pa.Table) -> pa.Table:
        from curation.core.imageio import ImageRefused, open_image

        n = table.num_rows
        images = column_values(table, "image")
        status: list[str] = []
        grey: list[np.ndarray] = []
        rows: list[int] = []
        for i, data in enumerate(images):
            try:
                image = open_image(data, self.params.max_pixels, draft=(2 * DCT_SIDE, 2 * DCT_SIDE))
            except ImageRefused as e:
                status.append(e.status)
                continue
            status.append("ok")
            rows.append(i)
            grey.append(grey_32(image))
        hashes = np.zeros(n, np.int64)
        if rows:
            hashes[rows] = phash_bits(np.stack(grey)).view(np.int64)
        ok = np.array([s == "ok" for s in status], dtype=bool)
        # An earlier stage's sha256 (img2dataset's, of the bytes as downloaded) wins: apply_stage keeps it.
        digests = (
            None
            if "sha256" in table.column_names
            else [hashlib.sha256(d).hexdigest() if d else None for d in images]
        )
        return pa.table(
            {
                "phash": pa.array(hashes, pa.int64(), mask=~ok),
                "phash_status": pa.array(status, pa.string()),
                "sha256": pa.array(digests if digests is not None else [None] * n, pa.string()),
            }
        )

    def decide(self, table: pa.Table) -> pa.Array:
        return decode_reasons(table.column("phash_status"))
