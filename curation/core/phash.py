"""Perceptual hash (pHash) of an image, and the Hamming distance between hashes.

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
"""

from __future__ import annotations

import numpy as np

DCT_SIDE = 32  # DCT input size (hash_size 8 x imagehash's highfreq_factor 4)
_BITS = 8  # low-frequency block side: 8 x 8 = 64 bits


def _dct_matrix(n: int, rows: int) -> np.ndarray:
    """The first `rows` rows of the unnormalised DCT-II matrix (scipy.fftpack.dct's, type 2)."""
    k = np.arange(rows)[:, None]
    i = np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


_DCT = _dct_matrix(DCT_SIDE, _BITS)
_WEIGHTS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def phash_bits(grey: np.ndarray) -> np.ndarray:
    """[n, 32, 32] grey pixels -> [n] uint64 hashes (steps 3-4 of the definition)."""
    low = np.einsum("ki,nij,lj->nkl", _DCT, grey.astype(np.float64), _DCT).reshape(len(grey), 64)
    bits = low > np.median(low, axis=1, keepdims=True)
    return (bits.astype(np.uint64) * _WEIGHTS).sum(axis=1, dtype=np.uint64)


def grey_32(image) -> np.ndarray:
    """Step 2: PIL RGB image -> 32 x 32 uint8 grey."""
    from PIL import Image

    return np.asarray(image.convert("L").resize((DCT_SIDE, DCT_SIDE), Image.Resampling.LANCZOS))


def phash_image(image) -> int:
    """The signed 64-bit pHash of a decoded PIL image."""
    return int(phash_bits(grey_32(image)[None])[0].astype(np.int64))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between int64 (or uint64) hashes, elementwise."""
    return np.bitwise_count(np.bitwise_xor(a.view(np.uint64), b.view(np.uint64)))
