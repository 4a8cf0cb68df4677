"""Real photos and hostile image bytes, shared by the tests of the image stages and of dedup."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Distinct real photos from scikit-image (`cat` is `chelsea` again, so it is not listed).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "horse", "retina", "page", "moon")


def photo(name: str) -> Image.Image:
    import skimage.data

    a = getattr(skimage.data, name)()
    if a.dtype != np.uint8:
        a = (255 * a).astype(np.uint8) if a.max() <= 1 else a.astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def near_duplicates(img: Image.Image) -> dict[str, Image.Image | bytes]:
    """Copies a crawler meets: re-encoded as a low-quality JPEG, resized, slightly cropped (1% a side)."""
    w, h = img.size
    dx, dy = max(1, w // 100), max(1, h // 100)
    return {
        "jpeg60": encode(img, "JPEG", quality=60),
        "half": img.resize((w // 2, h // 2), Image.Resampling.BILINEAR),
        "crop": img.crop((dx, dy, w - dx, h - dy)),
    }
