"""Opening untrusted image bytes: the one place every stage decodes an image.

Web images are hostile input. A 900 KB PNG can declare 30,000 x 30,000 pixels
and take gigabytes to decode; a truncated JPEG or a file that is not an image
at all must become a per-row status, never an exception that fails a shard.
So every stage that looks at pixels opens them here:

- the pixel count is read from the header and checked against `max_pixels`
  *before* any decoding (status `too_large`);
- every decoder failure becomes a status (`no_image`, `truncated`,
  `decode_error`), raised as `ImageRefused` so callers write it to their row;
- EXIF orientation is applied and any mode (palette, alpha, 16-bit grey, CMYK)
  becomes 8-bit RGB as a person would see it (transparency on white).

The default limit is Pillow's own warning level (`PIL.Image.MAX_IMAGE_PIXELS`,
89,478,485 pixels: about 0.25 GB of RGB), far above any real photo. A larger
`max_pixels` is honoured up to Pillow's hard stop at twice that, which stays.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

# Pillow's DecompressionBombWarning threshold (PIL.Image.MAX_IMAGE_PIXELS), as a literal so
# configs can be validated without importing Pillow.
DEFAULT_MAX_PIXELS = 89_478_485

# Per-row statuses of a failed open, shared by every stage's `*_status` column.
IMAGE_STATUSES = ("no_image", "too_large", "truncated", "decode_error")


class ImageRefused(Exception):
    """The bytes were not decoded; `status` is one of IMAGE_STATUSES."""

    def __init__(self, status: str, detail: str = "") -> None:
        super().__init__(f"{status}: {detail}" if detail else status)
        self.status = status
        self.detail = detail


def image_size(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header alone; raises ImageRefused like `open_image`."""
    img = _open_header(data, max_pixels)
    return img.size


def _open_header(data: bytes | None, max_pixels: int) -> PILImage.Image:
    from PIL import Image

    if not data:
        raise ImageRefused("no_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: we apply our own limit below
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # Pillow's hard stop at 2x its own limit
        raise ImageRefused("too_large", str(e)) from None
    except Exception as e:
        raise _refused(e) from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageRefused("too_large", f"{w}x{h} pixels > max_pixels {max_pixels:,}")
    return img


def open_image(
    data: bytes | None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
) -> PILImage.Image:
    """Decode to an RGB PIL image, refusing bombs from the header; raises ImageRefused.

    `draft` (w, h): let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale when that
    still covers this size (cheap downscaling for models with small inputs).
    """
    from PIL import Image, ImageOps

    img = _open_header(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF oddities, palette-transparency notes
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", draft)
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = to_rgb(img)
    except Image.DecompressionBombError as e:
        raise ImageRefused("too_large", str(e)) from None
    except Exception as e:  # any decoder failure is a per-row status
        raise _refused(e) from None
    if rgb.width < 1 or rgb.height < 1:
        raise ImageRefused("decode_error", "empty image")
    return rgb


def _refused(e: Exception) -> ImageRefused:
    # Pillow reports short files in its message only ("image file is truncated", "Truncated File Read").
    status = "truncated" if "truncated" in str(e).lower() else "decode_error"
    return ImageRefused(status, f"{type(e).__name__}: {e}")


def to_rgb(img: PILImage.Image) -> PILImage.Image:
    """Any PIL mode -> 8-bit RGB; transparent pixels are composited on white (how the image is seen)."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grey: rescale to 8 bits instead of PIL's clipping convert.
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img
