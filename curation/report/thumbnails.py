"""Thumbnails for the report: read from the run's own tars by key, decoded as the untrusted bytes they are.

Nothing is extracted to disk. The run may be a local directory or a URL
(s3://...): images are read from where `curation.select.ImageSources` allows
(the run's own storage, the input locations of its plan). Each tar (or image file) is opened once for all
of its sampled rows (`curation.select.read_image_group`), every image goes
through `curation.core.imageio.open_image` (header pixel limit before decoding),
and the report embeds a small JPEG as a data URI.
"""

from __future__ import annotations

import base64
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curation.core.imageio import DEFAULT_MAX_PIXELS, ImageRefused, open_image

THUMBNAIL_SIZE = 192  # pixels of the longer side (shown 1:1)
JPEG_QUALITY = 80


@dataclass(frozen=True)
class Thumbnail:
    data_uri: str
    width: int
    height: int


def thumbnails(
    run: str | Path,
    rows: list[dict[str, Any]],
    size: int = THUMBNAIL_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    images_from: Sequence[str] = (),
) -> tuple[dict[int, Thumbnail | str], list[str]]:
    """For rows with an image: id(row) -> a Thumbnail, or the status that refused it.

    Also returns what could not be read (a missing tar or key), one line each. Images are read from
    the run's output and the locations in `images_from` only (curation.select.ImageSources).
    """
    from curation.select import ImageSources, read_image_group

    sources = ImageSources(run, images_from)

    by_path: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("image_path"):
            by_path[row["image_path"]].append(row)
    out: dict[int, Thumbnail | str] = {}
    unreadable: list[str] = []
    for group in by_path.values():
        # read_image_group matches rows by key; rows sharing a key (duplicate pairs) share an image.
        by_key: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for row in group:
            by_key[row.get("key")].append(row)
        firsts = [same[0] for same in by_key.values()]
        for row, data in read_image_group(run, firsts, unreadable, sources):
            thumb = thumbnail(data, size, max_pixels)
            for same in by_key[row.get("key")]:
                out[id(same)] = thumb
    return out, unreadable


def thumbnail(
    data: bytes, size: int = THUMBNAIL_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Thumbnail | str:
    """A JPEG data URI at most `size` pixels on its longer side, or the status that refused the bytes."""
    from PIL import Image

    try:
        img = open_image(data, max_pixels, draft=(2 * size, 2 * size))
    except ImageRefused as e:
        return e.status
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return Thumbnail(
        "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), img.width, img.height
    )
