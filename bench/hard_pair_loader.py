"""Does the hard-pair loader keep up with the trainer?

On the 6,000 committed Fashion-MNIST training images (`curate select`'s shard layout) with a
hard-pair table of k=50 (mined from random embeddings: the loader's cost does not depend on
which partners it reads), batch 128, curate-tiny, CPU:

1. loader alone: samples/s of HardPairStream (random access by offset) and of the usual
   ShardStream (sequential read + shuffle buffer), each through the trainer's DataLoader with
   --workers workers, timed after --warmup batches;
2. the trainer: samples/s of `train()` on hard-pair batches with HNML (metrics.jsonl, the
   windows after the first), same workers.

The loader keeps up when (1) for HardPairStream exceeds (2). Rounds alternate the three
measurements so that load from other processes hits all of them alike; medians are reported.

    python bench/hard_pair_loader.py                 # ~5 min on 2 cores
    python bench/hard_pair_loader.py --rounds 1 --batches 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def loader_rate(stream, workers: int, batches: int, warmup: int) -> float:
    from train.data import make_loader

    it = iter(make_loader(stream, workers))
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)["uid"])
    rate = n / (time.perf_counter() - t)
    del it
    return rate


def trainer_rate(shards: str, table: Path, out: Path, workers: int, steps: int) -> float:
    from train.config import parse_train_config
    from train.loop import train

    cfg = parse_train_config(
        json.dumps(
            {
                "data": {"shards": shards, "workers": workers},
                "output_dir": str(out),
                "model": {"name": "curate-tiny"},
                "hard_pairs": {"path": str(table), "top": 50},
                "loss": {"name": "infonce", "hnml": 0.3},
                "optim": {"lr": 5e-4, "warmup_steps": 5},
                "train": {"batch_size": 128, "steps": steps, "log_every": 5, "progress": False},
            }
        )
    )
    train(cfg)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    windows = sorted({r["samples_per_s"] for r in recs[5:]})  # skip the first window (start-up)
    return statistics.median(windows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()

    import torch

    from curation.models.clip import build_model
    from train.data import ShardStream, expand_shards
    from train.fashion_mnist import write_shards
    from train.hard_pairs import HardPairStream, TarIndex
    from train.mining.output import write_hard_pairs
    from train.mining.search import mine_hard_pairs

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(root / "shards", "train")
        pattern = str(root / "shards" / "{00000..00005}.tar")
        shards = expand_shards(pattern)
        t = time.perf_counter()
        index = TarIndex(shards)
        index_s = time.perf_counter() - t
        g = torch.Generator().manual_seed(0)
        u = torch.nn.functional.normalize(torch.randn(len(index), 64, generator=g), dim=1)
        v = torch.nn.functional.normalize(torch.randn(len(index), 64, generator=g), dim=1)
        idx, scores = mine_hard_pairs(u, v, 50)
        table = root / "hard_pairs.parquet"
        write_hard_pairs(table, index.uids, idx, scores, {"k": 50})
        built = build_model("curate-tiny")
        common = (shards, 128, built.preprocess_train, built.tokenizer)
        rates: dict[str, list[float]] = {
            "hard-pair loader": [],
            "shard stream loader": [],
            "trainer (hard pairs + HNML)": [],
        }
        for r in range(a.rounds):
            hard = HardPairStream(*common, table_path=table, top=50, seed=r)
            rates["hard-pair loader"].append(loader_rate(hard, a.workers, a.batches, a.warmup))
            plain = ShardStream(*common, seed=r, shuffle_buffer=2000)
            rates["shard stream loader"].append(loader_rate(plain, a.workers, a.batches, a.warmup))
            rates["trainer (hard pairs + HNML)"].append(
                trainer_rate(pattern, table, root / f"train{r}", a.workers, a.steps)
            )
            print({k: round(v[-1], 1) for k, v in rates.items()}, flush=True)

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nindex of {len(index):,} samples built in {index_s:.2f}s")
    print(f"load average: {Path('/proc/loadavg').read_text().strip()}; workers={a.workers}, batch 128")
    print("| measurement | samples/s (median of rounds) | rounds |")
    print("|---|---|---|")
    for k, v in rates.items():
        print(f"| {k} | {med[k]:,.0f} | {', '.join(f'{x:,.0f}' for x in v)} |")
    print(
        f"\nhard-pair loader / trainer = {med['hard-pair loader'] / med['trainer (hard pairs + HNML)']:.2f}"
    )
    print(
        f"hard-pair loader / shard stream loader = {med['hard-pair loader'] / med['shard stream loader']:.2f}"
    )


if __name__ == "__main__":
    main()
