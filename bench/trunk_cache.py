"""What caching a locked trunk's features saves per training step (`data.views` + `data.trunk_cache`).

Three `curate train` runs of curate-lite0 with the trunk locked (LiT), the same shards, seed and steps:

  fresh    `data.views: null`: a fresh augmentation per read, the trunk runs in every step (the default)
  views    `data.views: K`: the same K fixed views per sample, decoded and run through the trunk each step
  cached   `data.views: K, data.trunk_cache: FILE`: the trunk's features of those views, computed once

It prints each run's training throughput (samples/s over the logged windows after the first, from
metrics.jsonl), the cached run's ratio against `views` (the same computation, so the ratio is
the cache alone) and against `fresh`, the time to build the cache (first cached run) and to load it
(second). `views` and `cached` must give the same losses (the test suite checks that); the script
prints the largest difference as a sanity check.

    PYTHONPATH=. python bench/trunk_cache.py --shards 'DIR/{00000..00006}.tar' --steps 30
    PYTHONPATH=. python bench/trunk_cache.py          # 2,048 Fashion-MNIST images written to a temp dir
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def train(
    out: Path, shards: str, steps: int, batch: int, extra: dict[str, object]
) -> tuple[float, list[float], float]:
    """(samples/s after the first log window, losses, wall seconds) of one `curate train` run."""
    sets = {
        "data.shards": shards,
        "data.workers": 0,
        "model.name": "curate-lite0",
        "model.image_init": "efficientnet_lite0",
        "model.lock_image": True,
        "output_dir": str(out),
        "train.steps": steps,
        "train.batch_size": batch,
        "train.log_every": 5,
        "train.progress": False,
        "optim.warmup_steps": 2,
        **extra,
    }
    argv = [
        sys.executable,
        "-m",
        "curation.cli",
        "train",
        str(REPO / "train" / "configs" / "fashion_mnist.yaml"),
    ]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    t = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = sorted({r["samples_per_s"] for r in rows[5:]})  # one value per log window, the first left out
    return statistics.median(windows), [r["loss"] for r in rows], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--shards", help="a brace pattern of webdataset shards (default: Fashion-MNIST, written here)"
    )
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--views", type=int, default=4)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="curate-trunk-cache-") as tmp:
        root = Path(tmp)
        shards = a.shards
        if shards is None:
            from train.fashion_mnist import write_shards

            write_shards(root / "shards", "train", limit=2048, samples_per_shard=256)
            shards = str(root / "shards" / "{00000..00007}.tar")
        print(f"load average at start: {os.getloadavg()}; {a.steps} steps of {a.batch_size}, views {a.views}")
        cache = root / "trunk.pt"
        cached_views = {"data.views": a.views, "data.trunk_cache": cache}
        runs = {
            "fresh augmentations": ("fresh", {}),
            "fixed views": ("views", {"data.views": a.views}),
            "cached (building)": ("cached1", cached_views),
            "cached (cache exists)": ("cached2", cached_views),
        }
        got = {
            name: train(root / folder, shards, a.steps, a.batch_size, sets)
            for name, (folder, sets) in runs.items()
        }
        fresh, views, build, cached = got.values()
        print(f"{'run':>22} {'samples/s':>10} {'wall s':>8}")
        for name, r in got.items():
            print(f"{name:>22} {r[0]:>10.1f} {r[2]:>8.1f}")
        print(
            f"step throughput, cached / fixed views: x{cached[0] / views[0]:.2f}; cached / fresh: x{cached[0] / fresh[0]:.2f}"
        )
        print(
            f"building the cache cost {build[2] - cached[2]:.1f} s more wall than reusing it ({cache.stat().st_size / 1e6:.0f} MB)"
        )
        diff = max(abs(x - y) for x, y in zip(views[1], cached[1]))
        print(f"largest loss difference, fixed views vs cached: {diff:.2e} (the same computation)")
        print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
