"""Write webdataset shards in the layout `curate select` produces.

    DIR/00000.tar, 00001.tar, ...   each with {key}.png|.jpg, {key}.txt (caption), {key}.json (uid + scores)
    DIR/sizes.json                  tar file name -> sample count (open_clip's convention)

open_clip's own trainer reads the same directory with `--train-data "DIR/{00000..0000N}.tar"`.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


@dataclass
class ShardSample:
    key: str
    image: Image.Image
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # reproducible bytes
    tar.addfile(info, io.BytesIO(payload))


def write_shards(
    out_dir: str | Path,
    samples: Iterable[ShardSample],
    samples_per_shard: int = 1000,
    image_format: str = "png",
) -> dict[str, int]:
    """Write shards + sizes.json; returns the sizes map. Each tar is written to a temp name then renamed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ext = {"png": "png", "jpeg": "jpg", "jpg": "jpg"}[image_format.lower()]
    sizes: dict[str, int] = {}
    it = iter(samples)
    while chunk := list(itertools.islice(it, samples_per_shard)):
        name = f"{len(sizes):05d}.tar"
        tmp = out / (name + ".tmp")
        with tarfile.open(tmp, "w") as tar:
            for s in chunk:
                buf = io.BytesIO()
                s.image.save(buf, format="PNG" if ext == "png" else "JPEG", quality=95)
                _add(tar, f"{s.key}.{ext}", buf.getvalue())
                _add(tar, f"{s.key}.txt", s.caption.encode())
                _add(tar, f"{s.key}.json", json.dumps({"uid": s.key, **s.meta}).encode())
        tmp.replace(out / name)
        sizes[name] = len(chunk)
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return sizes
