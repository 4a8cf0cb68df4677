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


CONCEPT_VOCABULARY = [f"concept {i}" for i in range(30)]


def concept_targets_for(label: int, index: int) -> dict:
    """Targets that depend on the class (learnable), with k varying between samples (padding)."""
    ids = [3 * label, 3 * label + 1, 3 * label + 2][: 3 - index % 2]
    return {"ids": ids, "probs": [0.6, 0.25, 0.1][: len(ids)]}


@pytest.fixture(scope="session")
def fmnist_concept_shards(fmnist_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 512 samples with `{key}.concepts.json` members and vocabulary.txt, as `curate select` writes."""
    import io
    import json
    import shutil
    import tarfile

    out = tmp_path_factory.mktemp("fmnist_concept_shards")
    for src in sorted(fmnist_shards.glob("*.tar")):
        with tarfile.open(src) as tin, tarfile.open(out / src.name, "w") as tout:
            index = 0
            for member in tin:
                data = tin.extractfile(member).read()
                tout.addfile(member, io.BytesIO(data))
                if member.name.endswith(".json"):
                    key = member.name.split(".")[0]
                    payload = json.dumps(concept_targets_for(json.loads(data)["label"], index)).encode()
                    info = tarfile.TarInfo(f"{key}.concepts.json")
                    info.size = len(payload)
                    tout.addfile(info, io.BytesIO(payload))
                    index += 1
    shutil.copy(fmnist_shards / "sizes.json", out / "sizes.json")
    (out / "vocabulary.txt").write_text("".join(f"{n}\n" for n in CONCEPT_VOCABULARY))
    return out
