from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512 Fashion-MNIST training images in 4 shards, in `curate select`'s layout."""
    from train.fashion_mnist import write_shards

    out = tmp_path_factory.mktemp("fmnist_shards")
    write_shards(out, "train", limit=512, samples_per_shard=128)
    return out


def _write_config(path: Path, shards: Path, output_dir: Path, **sections: dict) -> Path:
    """A small training YAML; `sections` override/extend the defaults per section."""
    import yaml

    cfg: dict = {
        "data": {"shards": str(shards / "{00000..00003}.tar"), "workers": 0, "shuffle_buffer": 64},
        "output_dir": str(output_dir),
        "model": {"name": "curate-tiny"},
        "loss": {"name": "infonce"},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"batch_size": 16, "steps": 4, "log_every": 1, "progress": False},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def make_config():
    """make_config(path, shards, output_dir, train={...}, loss={...}) -> path of a small training YAML."""
    return _write_config
