"""Fashion-MNIST, the built-in real benchmark: class captions for training, test split for zero-shot.

Two sources:
- "subset" (default): `train/assets/fashion_mnist_subset.npz`, committed (3.5 MB): the first 600
  train images of each class (6,000) and the first 200 test images of each class (2,000).
- "debian": all 70,000 images from the Debian package `dataset-fashion-mnist`
  (`apt-get install dataset-fashion-mnist`, files under /usr/share/datasets/fashion-mnist).

Regenerate the subset from the Debian package:  python -m train.fashion_mnist subset
Write training shards:                          python -m train.fashion_mnist shards OUT_DIR
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path
from typing import Literal

import numpy as np

CLASSES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
# Captions for training shards (rotated per sample) and the zero-shot prompt ensemble.
TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}."]
SUBSET = Path(__file__).parent / "assets" / "fashion_mnist_subset.npz"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
Source = Literal["subset", "debian"]


def _idx(path: Path, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(path).read(), np.uint8, offset=offset)


def load(split: Literal["train", "test"], source: Source = "subset") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N])."""
    if source == "subset":
        with np.load(SUBSET) as z:
            return z[f"{split}_images"], z[f"{split}_labels"].astype(np.int64)
    prefix = "train" if split == "train" else "t10k"
    images_path = DEBIAN_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise FileNotFoundError(
            f"{images_path} missing: apt-get install dataset-fashion-mnist, or use source='subset'"
        )
    images = _idx(images_path, 16).reshape(-1, 28, 28)
    labels = _idx(DEBIAN_DIR / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return images, labels


def make_subset(out: Path = SUBSET, train_per_class: int = 600, test_per_class: int = 200) -> Path:
    """The committed subset: the first N images of each class, in file order, from the Debian package."""
    arrays = {}
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        images, labels = load(split, "debian")  # type: ignore[arg-type]
        idx = np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(len(CLASSES))]))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[idx], labels[idx].astype(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return out


def write_shards(
    out_dir: str | Path,
    split: Literal["train", "test"] = "train",
    source: Source = "subset",
    limit: int | None = None,
    samples_per_shard: int = 1000,
) -> dict[str, int]:
    """Shards in `curate select`'s layout; caption i uses TEMPLATES[i % len(TEMPLATES)]."""
    from PIL import Image

    from train.shards import ShardSample
    from train.shards import write_shards as _write

    images, labels = load(split, source)
    n = len(images) if limit is None else min(limit, len(images))

    def samples():
        for i in range(n):
            cls = CLASSES[int(labels[i])]
            yield ShardSample(
                key=f"fmnist-{split}-{i:06d}",
                image=Image.fromarray(images[i], mode="L"),
                caption=TEMPLATES[i % len(TEMPLATES)].format(cls),
                meta={"label": int(labels[i]), "class": cls},
            )

    return _write(out_dir, samples(), samples_per_shard=samples_per_shard)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.fashion_mnist",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("subset", help="regenerate the committed subset from the Debian package")
    s.add_argument("--out", type=Path, default=SUBSET)
    w = sub.add_parser("shards", help="write webdataset shards + sizes.json")
    w.add_argument("out_dir", type=Path)
    w.add_argument("--split", choices=["train", "test"], default="train")
    w.add_argument("--source", choices=["subset", "debian"], default="subset")
    w.add_argument("--limit", type=int, default=None)
    w.add_argument("--samples-per-shard", type=int, default=1000)
    a = p.parse_args(argv)
    if a.cmd == "subset":
        print(make_subset(a.out))
    else:
        sizes = write_shards(a.out_dir, a.split, a.source, a.limit, a.samples_per_shard)
        print(f"wrote {sum(sizes.values())} samples in {len(sizes)} shards to {a.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
