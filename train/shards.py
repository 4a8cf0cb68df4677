"""Write webdataset shards in the layout `curate select` produces (`curation.core.shards` owns it).

open_clip's own trainer reads the same directory with `--train-data "DIR/{00000..0000N}.tar"`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from curation.core.shards import CAPTION, META, TarWriter


@dataclass
class ShardSample:
    key: str
    image: Image.Image
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


def write_shards(
    out_dir: str | Path,
    samples: Iterable[ShardSample],
    samples_per_shard: int = 1000,
    image_format: str = "png",
) -> dict[str, int]:
    """Write shards + sizes.json (`curation.core.shards`'s writer); returns the sizes map."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ext = {"png": "png", "jpeg": "jpg", "jpg": "jpg"}[image_format.lower()]
    with TarWriter(out, samples_per_shard, mtime=0) as writer:  # mtime 0: reproducible bytes
        for s in samples:
            buf = io.BytesIO()
            s.image.save(buf, format="PNG" if ext == "png" else "JPEG", quality=95)
            meta = json.dumps({"uid": s.key, **s.meta}).encode()
            writer.add(s.key, {ext: buf.getvalue(), CAPTION: s.caption.encode(), META: meta})
    return writer.sizes
