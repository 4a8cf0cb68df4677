"""Heavier runs (marked slow; `make test` and CI run them): real Fashion-MNIST training, torchrun with 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.config import load_train_config
from train.loop import train

# Measured (BENCHMARKS.md, Trainer): this config reached 0.797 zero-shot top-1 (top-5 0.993) on the 2,000
# committed test images after 200 steps (25.6k samples, ~4 epochs of the 6,000-image subset); a 150-step
# variant without clipping reached 0.774;
# chance is 0.10. The threshold leaves room for thread-count / platform numerics, not for a regression.
MIN_ZERO_SHOT_TOP1 = 0.65

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_fashion_mnist_zero_shot_far_above_chance(tmp_path: Path) -> None:
    from curation.models.clip import load_for_eval
    from train import fashion_mnist
    from train.evaluate import fashion_mnist_zero_shot

    shards = tmp_path / "shards"
    fashion_mnist.write_shards(shards, "train")  # all 6,000 subset training images
    overrides = {
        "data.shards": str(shards / "{00000..00005}.tar"),
        "output_dir": str(tmp_path / "run"),
        "train.progress": False,
    }
    cfg = load_train_config(REPO / "train" / "configs" / "fashion_mnist.yaml", overrides=overrides)
    result = train(cfg)
    zs = fashion_mnist_zero_shot(load_for_eval(str(result.checkpoint)))
    print(f"zero-shot top1={zs.top1:.4f} top5={zs.top5:.4f} n={zs.n} final_loss={result.final_loss:.4f}")
    assert zs.n == 2000
    assert zs.top1 >= MIN_ZERO_SHOT_TOP1


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch", [None, 4], ids=["whole", "micro"])
def test_torchrun_two_cpu_ranks(fmnist_shards: Path, tmp_path: Path, make_config, micro_batch) -> None:
    """The real multi-process path: torchrun -m train with 2 gloo ranks, DDP, global-batch HN-NCE with the
    local loss; with micro-batches DDP skips the all-reduce (no_sync) in all but the last backward."""
    out = tmp_path / "run"
    cfg = make_config(
        tmp_path / "c.yaml",
        fmnist_shards,
        out,
        train={"steps": 3, "batch_size": 8, "micro_batch": micro_batch},
        loss={"name": "hn_nce"},
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "train",
            str(cfg),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    ck = torch.load(out / "checkpoints" / "step_00000003.pt", weights_only=True)
    assert ck["world_size"] == 2 and not any(k.startswith("module.") for k in ck["state_dict"])
