"""curation.core.imageio: the one decode path for untrusted image bytes."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from curation.core.imageio import DEFAULT_MAX_PIXELS, ImageRefused, image_size, open_image


def _png(w: int, h: int) -> bytes:
    """A valid PNG header + IDAT of w x h zero pixels, compressed (a decompression bomb when large)."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = zlib.compress(b"\x00" * (w // 8 + 1) * min(h, 16), 9)  # only the first rows: enough for a header
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_default_is_pillows_warning_level():
    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (None, "no_image"),
        (b"", "no_image"),
        (b"not an image", "decode_error"),
        (_png(30000, 30000), "too_large"),
        (_png(200_000, 200_000), "too_large"),  # beyond Pillow's own hard stop
    ],
)
def test_refusals_are_statuses(data, status):
    with pytest.raises(ImageRefused) as e:
        open_image(data)
    assert e.value.status == status


def test_limit_is_checked_from_the_header():
    bomb = _png(12000, 12000)  # 144 MP: above the default, below Pillow's hard stop (2x)
    assert len(bomb) < 10_000
    with pytest.raises(ImageRefused, match="too_large"):
        image_size(bomb)
    assert image_size(bomb, max_pixels=12000 * 12000) == (12000, 12000)


def test_truncated_and_modes():
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), np.uint8))
    jpeg = _encode(photo)
    with pytest.raises(ImageRefused) as e:
        open_image(jpeg[: len(jpeg) // 2])
    assert e.value.status == "truncated"
    for img in (photo.convert("L"), photo.convert("P"), photo.convert("RGBA"), photo.convert("CMYK")):
        out = open_image(_encode(img, "PNG" if img.mode != "CMYK" else "JPEG"))
        assert out.mode == "RGB" and out.size == (80, 64)
    with pytest.raises(ImageRefused, match="too_large"):
        open_image(jpeg, max_pixels=100)
