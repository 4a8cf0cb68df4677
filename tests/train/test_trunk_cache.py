"""`data.views` + `data.trunk_cache`: the locked trunk's features of fixed views, computed once, train
exactly as the same views decoded and run through the trunk at every step (train/trunk_cache.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from curation.cli import main

LIT = {"name": "curate-lite0", "image_init": "efficientnet_lite0", "lock_image": True}


def _run(tmp_path: Path, make_config, shards: Path, name: str, *extra: str, pattern: str = "{00000..00003}.tar",
         **data) -> tuple[int, Path]:  # fmt: skip
    out = tmp_path / name
    cfg = make_config(
        tmp_path / f"{name}.yaml",
        shards,
        out,
        model=LIT,
        data={"shards": str(shards / pattern), **data},
        train={"steps": 4, "batch_size": 16, "checkpoint_every": 4},
        optim={"lr": 5e-3, "warmup_steps": 1},
    )
    return main(["train", str(cfg), *extra]), out


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "step_00000004.pt", weights_only=True)["state_dict"]


def test_cached_trunk_trains_as_the_decoded_views(fmnist_shards, make_config, tmp_path) -> None:
    cache = tmp_path / "trunk.pt"
    assert _run(tmp_path, make_config, fmnist_shards, "decoded", views=2)[0] == 0
    assert _run(tmp_path, make_config, fmnist_shards, "cached", views=2, trunk_cache=str(cache))[0] == 0
    decoded, cached = tmp_path / "decoded", tmp_path / "cached"
    # Same views, same batches, same steps: the trunk ran once per view instead of once per step
    # (other batch shapes, so float summation may differ in the last bits).
    assert _losses(cached) == pytest.approx(_losses(decoded), rel=1e-4, abs=1e-5)
    a, b = _state(decoded), _state(cached)
    assert a.keys() == b.keys()  # the checkpoint holds the trunk, as any other
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), k
    saved = torch.load(cache, weights_only=True)
    assert saved["features"].shape == (512, 2, 1280) and len(set(saved["keys"])) == 512
    # Fresh augmentations (no views) are another run: the comparison above can fail.
    assert _run(tmp_path, make_config, fmnist_shards, "fresh")[0] == 0
    assert _losses(tmp_path / "fresh") != pytest.approx(_losses(decoded), rel=1e-4, abs=1e-5)


def test_one_cache_serves_subsets_and_grows_with_new_images(
    fmnist_shards, make_config, tmp_path, caplog
) -> None:
    cache = tmp_path / "trunk.pt"
    code, _ = _run(tmp_path, make_config, fmnist_shards, "half", pattern="{00000..00001}.tar", views=1,
                   trunk_cache=str(cache))  # fmt: skip
    assert code == 0 and len(torch.load(cache, weights_only=True)["keys"]) == 256
    assert _run(tmp_path, make_config, fmnist_shards, "whole", views=1, trunk_cache=str(cache))[0] == 0
    assert len(torch.load(cache, weights_only=True)["keys"]) == 512  # the other 256 were added
    before = cache.stat().st_mtime_ns
    assert _run(tmp_path, make_config, fmnist_shards, "again", views=1, trunk_cache=str(cache))[0] == 0
    assert cache.stat().st_mtime_ns == before  # nothing to add: not rewritten


def test_a_cache_made_for_something_else_is_refused(fmnist_shards, make_config, tmp_path, capsys) -> None:
    cache = tmp_path / "trunk.pt"
    assert (
        _run(
            tmp_path, make_config, fmnist_shards, "two", pattern="00000.tar", views=2, trunk_cache=str(cache)
        )[0]
        == 0
    )
    capsys.readouterr()
    code, _ = _run(
        tmp_path, make_config, fmnist_shards, "three", pattern="00000.tar", views=3, trunk_cache=str(cache)
    )
    err = capsys.readouterr().err
    assert code != 0 and "was made for another views" in err and "Traceback" not in err
    cache.write_bytes(b"not a cache")
    code, _ = _run(
        tmp_path, make_config, fmnist_shards, "bad", pattern="00000.tar", views=2, trunk_cache=str(cache)
    )
    assert code != 0 and "not a readable trunk cache" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        (LIT, {"trunk_cache": "t.pt"}, "needs data.views"),
        ({"name": "curate-lite0"}, {"views": 2, "trunk_cache": "t.pt"}, "needs model.lock_image: true"),
        (LIT, {"views": 2, "trunk_cache": "s3://b/t.pt"}, "a local file path"),
        (LIT, {"views": 0}, "data.views"),
    ],
)
def test_config_rules(fmnist_shards, make_config, tmp_path, capsys, model, data, message) -> None:
    cfg = make_config(tmp_path / "c.yaml", fmnist_shards, tmp_path / "o", model=model, data=data)
    assert main(["train", str(cfg)]) == 2
    assert message in capsys.readouterr().err


def test_micro_batches_of_features_train_as_the_whole_batch(fmnist_shards, make_config, tmp_path) -> None:
    cache = str(tmp_path / "trunk.pt")
    one = "00000.tar"
    assert (
        _run(tmp_path, make_config, fmnist_shards, "whole", pattern=one, views=2, trunk_cache=cache)[0] == 0
    )
    code, _ = _run(tmp_path, make_config, fmnist_shards, "split", "--set", "train.micro_batch=4", pattern=one,
                   views=2, trunk_cache=cache)  # fmt: skip
    assert code == 0
    # GradCache over rows of trunk features: the gradients, so the losses, are those of the whole batch.
    assert _losses(tmp_path / "split") == pytest.approx(_losses(tmp_path / "whole"), rel=1e-4, abs=1e-5)


def test_an_image_that_cannot_be_decoded_is_named_when_the_cache_is_built(
    make_config, tmp_path, capsys
) -> None:
    import io
    import tarfile

    from tests.imageserver import png_header_bomb

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for key, data in (("000000000", png_header_bomb()), ("000000001", png_header_bomb())):
            for ext, body in (("png", data), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    (shards / "sizes.json").write_text('{"00000.tar": 2}')
    code, _ = _run(tmp_path, make_config, shards, "bomb", pattern="00000.tar", views=1,
                   trunk_cache=str(tmp_path / "t.pt"))  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "cannot decode 000000000.png in" in err and "too_large" in err, err
    assert "Traceback" not in err and not (tmp_path / "t.pt").exists()
