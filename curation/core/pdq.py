"""PDQ, Meta's 256-bit perceptual image hash, in numpy.

The hash many hash-sharing programmes exchange (ThreatExchange, StopNCII, Thorn's and
NCMEC's partner lists carry PDQ beside MD5): a list of PDQ hashes matches an image when
the Hamming distance between their hashes is at most a threshold (Meta suggests 31 of 256
bits). Written from the published algorithm and its C++ reference
(facebook/ThreatExchange, pdq/cpp: hashing/pdqhashing.cpp, downscaling/downscaling.cpp),
step for step, because the one package on PyPI (`pdqhash`) ships only a C++ source
distribution that needs a compiler at install time. Tests compare it with hashes that
package computed (tests/test_blocklist.py).

1. luma Y = 0.299 R + 0.587 G + 0.114 B of the RGB image, as floats;
2. two passes of a Jarosz box filter (a box along rows, then along columns, window
   `(dim + 127) // 128` per axis, truncated at the edges exactly as the reference's
   `box1DFloat`), then decimation to 64 x 64 by sampling at `int((i + 0.5) * dim / 64)`;
   a 64 x 64 image is used as it is;
3. quality = sum of |int(100 * (neighbour difference) / 255)| over the 64 x 64 buffer / 90, at most 100;
4. B = D A D^T with D the 16 x 64 DCT-II rows 1..16 (the DC row is skipped),
   D[i, j] = sqrt(2/64) cos(pi / 128 (i + 1) (2 j + 1));
5. bit k = i * 16 + j is set where B[i, j] > the median of the 256 values (the reference's
   Torben median: the lower middle, the 128th smallest);
6. the hex form prints the 16 words of 16 bits from word 15 down to word 0 (bit k lives in
   word k // 16 at position k % 16): the 256-bit integer sum(bit_k << k) in 64 hex digits.
"""

from __future__ import annotations

import numpy as np

_N = 64
_D = (
    np.sqrt(2.0 / _N)
    * np.cos((np.pi / 2.0 / _N) * (np.arange(16)[:, None] + 1) * (2 * np.arange(_N)[None, :] + 1))
).astype(np.float64)
# The reference refuses (hash 0, quality 0) images under 5 pixels a side.
MIN_SIDE = 5
HEX_DIGITS = 64


def _box(a: np.ndarray, window: int, axis: int) -> np.ndarray:
    """The reference's box1DFloat along `axis`: output o is the mean of inputs
    [o - (window - half), o + half - 1], truncated at both ends, half = (window + 2) // 2."""
    n = a.shape[axis]
    half = (window + 2) // 2
    o = np.arange(n)
    lo = np.maximum(0, o - (window - half))
    hi = np.minimum(n - 1, o + half - 1)
    zero_shape = list(a.shape)
    zero_shape[axis] = 1
    csum = np.concatenate([np.zeros(zero_shape), np.cumsum(a, axis=axis)], axis=axis)
    sums = np.take(csum, hi + 1, axis=axis) - np.take(csum, lo, axis=axis)
    shape = [1] * a.ndim
    shape[axis] = n
    return sums / (hi - lo + 1).reshape(shape)


def luma_64(rgb: np.ndarray) -> np.ndarray:
    """Steps 1-2: [h, w, 3] uint8 RGB (or [h, w] grey) -> the 64 x 64 float buffer."""
    if rgb.ndim == 3:
        rgb = rgb[..., :3].astype(np.float64)
        y = (
            np.float32(0.299) * rgb[..., 0]
            + np.float32(0.587) * rgb[..., 1]
            + np.float32(0.114) * rgb[..., 2]
        )
    else:
        y = rgb.astype(np.float64)
    h, w = y.shape
    if h == _N and w == _N:
        return y
    along_rows = (w + 2 * _N - 1) // (2 * _N)
    along_cols = (h + 2 * _N - 1) // (2 * _N)
    for _ in range(2):
        y = _box(y, along_rows, axis=1)
        y = _box(y, along_cols, axis=0)
    rows = ((np.arange(_N) + 0.5) * h / _N).astype(int)
    cols = ((np.arange(_N) + 0.5) * w / _N).astype(int)
    return y[np.ix_(rows, cols)]


def quality(buffer: np.ndarray) -> int:
    """Step 3: the reference's gradient-sum quality metric (0..100; lists often skip hashes under 50)."""
    down = np.trunc((buffer[:-1, :] - buffer[1:, :]) * 100 / 255)
    right = np.trunc((buffer[:, :-1] - buffer[:, 1:]) * 100 / 255)
    return int(min(100, (np.abs(down).sum() + np.abs(right).sum()) // 90))


def pdq_hash(rgb: np.ndarray) -> tuple[str, int]:
    """(64-hex-digit PDQ hash, quality) of an RGB image array [h, w, 3] (uint8)."""
    if rgb.shape[0] < MIN_SIDE or rgb.shape[1] < MIN_SIDE:
        return "0" * HEX_DIGITS, 0
    buffer = luma_64(rgb)
    coeffs = (_D @ buffer @ _D.T).reshape(256)
    median = np.sort(coeffs)[127]
    value = 0
    for k in np.flatnonzero(coeffs > median):
        value |= 1 << int(k)
    return f"{value:0{HEX_DIGITS}x}", quality(buffer)


def pdq_image(image) -> tuple[str, int]:
    """PDQ of a decoded PIL image (converted to RGB)."""
    return pdq_hash(np.asarray(image.convert("RGB")))


def parse_hex(hashes: list[str]) -> np.ndarray:
    """64-hex-digit PDQ hashes -> [n, 4] uint64 words (most significant first); raises ValueError."""
    out = np.zeros((len(hashes), 4), np.uint64)
    for i, h in enumerate(hashes):
        if len(h) != HEX_DIGITS:
            raise ValueError(f"a PDQ hash is {HEX_DIGITS} hex digits, not {len(h)}: {h[:80]!r}")
        out[i] = [int(h[j : j + 16], 16) for j in range(0, HEX_DIGITS, 16)]
    return out


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances [len(a), len(b)] between [n, 4] uint64 PDQ hashes."""
    return np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(axis=2, dtype=np.int64)
