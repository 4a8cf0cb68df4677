from __future__ import annotations

import pytest

from train.config import ConfigError, parse_overrides, parse_train_config
from train.validation import parse_checked_train_config

GOOD = """\
data:
  shards: x/{00000..00001}.tar
output_dir: runs/x
train:
  steps: 10
"""


def test_defaults_and_overrides() -> None:
    cfg = parse_train_config(
        GOOD, overrides=parse_overrides(["loss.name=hn_nce", "loss.beta=0.25", "train.precision=bf16"])
    )
    assert cfg.train.steps == 10 and cfg.train.batch_size == 64
    assert cfg.loss.name == "hn_nce" and cfg.loss.beta == 0.25 and cfg.loss.alpha == 1.0
    assert cfg.train.precision == "bf16" and cfg.model.name == "curate-tiny" and cfg.model.pretrained is None
    assert cfg.to_dict()["optim"]["lr"] == 5e-4


def test_every_problem_is_reported_with_key_and_line() -> None:
    text = """\
data:
  shards: x.tar
  shufle_buffer: 10
output_dir: runs/x
loss:
  name: hnnce
optim:
  lr: fast
train:
  steps: 10
  epochs: 2
"""
    with pytest.raises(ConfigError) as exc:
        parse_train_config(text, source="bad.yaml")
    msg = str(exc.value)
    assert "bad.yaml" in msg
    assert "data.shufle_buffer (line 3): unknown key" in msg
    assert "loss.name (line 6): expected one of ['infonce', 'hn_nce']" in msg
    assert "optim.lr (line 8): expected a number" in msg


def test_semantic_checks() -> None:
    with pytest.raises(ConfigError, match=r"exactly one of train\.steps or train\.epochs"):
        parse_train_config(GOOD.replace("steps: 10", "steps: 10\n  epochs: 1"))
    with pytest.raises(ConfigError, match="missing or not a string"):
        parse_train_config("data: {shards: a.tar}\ntrain: {steps: 1}\n")
    parse_train_config(GOOD + "model: {pretrained: laion2b_s34b_b79k}\n")  # the text is fine: the file is not
    with pytest.raises(ConfigError, match=r"model.pretrained.*nothing is downloaded"):
        parse_checked_train_config(GOOD + "model: {pretrained: laion2b_s34b_b79k}\n")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_train_config(GOOD + "optimizer: {}\n")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["train.steps"])


def test_type_and_range_problems_are_reported_in_one_pass() -> None:
    text = """\
data:
  shards: x.tar
  workers: -1
output_dir: runs/x
loss:
  alpha: -1
optim:
  lr: fast
train:
  steps: 10
  batch_size: 0
"""
    with pytest.raises(ConfigError) as exc:
        parse_train_config(text, source="bad.yaml")
    errors = exc.value.errors
    assert "optim.lr (line 8): expected a number, got 'fast'" in errors
    assert "train.batch_size (line 11): must be >= 1, got 0" in errors
    assert "loss.alpha (line 6): must be >= 0, got -1" in errors
    assert "data.workers (line 3): must be >= 0, got -1" in errors
    assert len(errors) == 4


def test_validate_and_train_check_the_world_in_one_function(fmnist_shards, make_config, tmp_path, capsys):
    """`curate validate` and `curate train` both call train.validation.load_checked_train_config: the
    same problems, worded the same; a mixture (data.sources) is checked source by source."""
    from curation.cli import main

    sources = [
        {"shards": str(fmnist_shards / "{00000..00001}.tar"), "weight": 1},
        {"shards": str(fmnist_shards / "{00002..00003}.tar"), "weight": 3},
    ]
    mixture = make_config(
        tmp_path / "mix.yaml", fmnist_shards, tmp_path / "run", data={"shards": None, "sources": sources}
    )
    assert main(["validate", str(mixture)]) == 0
    missing = {"name": "curate-tiny", "pretrained": str(tmp_path / "none.pt")}
    cfg = make_config(tmp_path / "c.yaml", fmnist_shards, tmp_path / "run", model=missing)
    lines = []
    for command in ("validate", "train"):
        assert main([command, str(cfg)]) == 2
        err = capsys.readouterr().err
        lines.append([ln for ln in err.splitlines() if "model.pretrained" in ln])
    assert lines[0] == lines[1] and len(lines[0]) == 1 and "not a local file" in lines[0][0]
    assert not (tmp_path / "run").exists()
