"""The recipes in pipelines/ validate as shipped (with a checkpoint where they need one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from curation.cli import main
from curation.config import load_config
from curation.stages import STAGES
from tests.helpers import REPO

RECIPES = ("datacomp_basic", "cat", "cat_clip")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    from curation.models.clip import build_model

    path = tmp_path_factory.mktemp("ck") / "clip.pt"
    torch.save(
        {"model_name": "curate-tiny", "state_dict": build_model("curate-tiny").model.state_dict()}, path
    )
    return path


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates(name, tmp_path, checkpoint, monkeypatch, capsys):
    pytest.importorskip("img2dataset")
    pytest.importorskip("easyocr")
    monkeypatch.chdir(REPO)  # recipes use paths relative to the repository, like the demo
    cfg = yaml.safe_load((REPO / "pipelines" / f"{name}.yaml").read_text())
    cfg["output"] = str(tmp_path / "out")
    for stage in cfg["stages"]:
        if "clip_score" in stage:
            stage["clip_score"]["checkpoint"] = str(checkpoint)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    names = [s.name for s in load_config(path, stages=STAGES).stages]
    assert names.index("download") < min(
        names.index(s) for s in names if s in ("image_size", "text_spotting", "phash", "clip_score")
    )


def test_datacomp_basic_is_datacomps_rule():
    stages = {
        s.name: s.params
        for s in load_config(REPO / "pipelines" / "datacomp_basic.yaml", stages=STAGES).stages
    }
    assert (stages["caption_length"].min_words, stages["caption_length"].min_chars) == (3, 6)
    assert stages["caption_language"].languages == ["en"] and stages["caption_language"].min_score == 0
    assert (stages["image_size"].min_side, stages["image_size"].max_aspect_ratio) == (200, 3.0)


def test_cat_clip_without_its_checkpoint_says_so(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["validate", "pipelines/cat_clip.yaml"]) == 2
    assert "checkpoint not found: checkpoints/clip.pt" in capsys.readouterr().err
