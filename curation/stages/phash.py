"""Perceptual hash (pHash) of each image, for near-duplicate detection by `curate dedup`.

Definition (the DCT hash of imagehash's `phash`, hash_size 8, which it
reproduces bit for bit on the same RGB image):

1. the image as `curation.core.imageio.open_image` gives it (EXIF-rotated, RGB,
   transparency on white); a JPEG is decoded at the smallest libjpeg DCT
   scale (1/1 .. 1/8) that keeps both sides >= 64 px, which changes no more
   than a bit or two and skips most of the decoding;
2. to 8-bit grey (PIL's "L": ITU-R 601-2 luma), resized to 32 x 32 with Lanczos;
3. the 2-D DCT-II of the 32 x 32 pixels; its top-left 8 x 8 block of
   coefficients (lowest frequencies, DC included);
4. bit i (row-major over the 8 x 8 block) = coefficient i > the median of the
   64 coefficients; bit 0 is the most significant bit of the 64-bit value.

`phash` holds that 64-bit value as a signed int64 (two's complement), which
DuckDB and Arrow handle natively: `bit_count(xor(a, b))` is the Hamming
distance. Two copies of a photo (re-encoded, resized, lightly cropped) lie a
few bits apart; unrelated photos about 32.

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
from curation.stages.base import Stage, column_values, decode_reasons

PHASH_COLUMNS: dict[str, pa.DataType] = {
    "phash": pa.int64(),  # the 64-bit hash defined above, as signed int64
    "phash_status": pa.string(),  # ok | no_image | too_large | truncated | decode_error
    "sha256": pa.string(),  # of the image bytes (download writes it too: the bytes it fetched)
}
_SIDE = 32  # DCT input size (hash_size 8 x imagehash's highfreq_factor 4)
_BITS = 8  # low-frequency block side: 8 x 8 = 64 bits


def _dct_matrix(n: int, rows: int) -> np.ndarray:
    """The first `rows` rows of the unnormalised DCT-II matrix (scipy.fftpack.dct's, type 2)."""
    k = np.arange(rows)[:, None]
    i = np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


_DCT = _dct_matrix(_SIDE, _BITS)
_WEIGHTS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def phash_bits(grey: np.ndarray) -> np.ndarray:
    """[n, 32, 32] grey pixels -> [n] uint64 hashes (steps 3-4 of the definition)."""
    low = np.einsum("ki,nij,lj->nkl", _DCT, grey.astype(np.float64), _DCT).reshape(len(grey), 64)
    bits = low > np.median(low, axis=1, keepdims=True)
    return (bits.astype(np.uint64) * _WEIGHTS).sum(axis=1, dtype=np.uint64)


def grey_32(image) -> np.ndarray:
    """Step 2: PIL RGB image -> 32 x 32 uint8 grey."""
    from PIL import Image

    return np.asarray(image.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS))


def phash_image(image) -> int:
    """The signed 64-bit pHash of a decoded PIL image."""
    return int(phash_bits(grey_32(image)[None])[0].astype(np.int64))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between int64 (or uint64) hashes, elementwise."""
    return np.bitwise_count(np.bitwise_xor(a.view(np.uint64), b.view(np.uint64)))


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
                image = open_image(data, self.params.max_pixels, draft=(2 * _SIDE, 2 * _SIDE))
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
