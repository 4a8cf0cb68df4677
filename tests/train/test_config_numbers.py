"""Training configs: numbers as users type them, NaN/infinity, sizes.json, `curate validate` and `eval --set`."""

from __future__ import annotations

import json
import re

import pytest

from curation.cli import main
from train.config import parse_overrides, parse_train_config

BASE = "data: {shards: x.tar}\noutput_dir: out\ntrain: {steps: 1}\n"


def test_scientific_notation_everywhere():
    cfg = parse_train_config(BASE + "optim: {lr: 1e-3, min_lr: 2.0e-5, eps: 1e-06, weight_decay: 5E-2}\n")
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.eps, cfg.optim.weight_decay) == (1e-3, 2e-5, 1e-6, 5e-2)
    over = parse_overrides(["optim.lr=1e-3", "optim.grad_clip_norm=1.0e0", "train.steps=10"])
    assert over == {"optim.lr": 1e-3, "optim.grad_clip_norm": 1.0, "train.steps": 10}
    assert parse_train_config(BASE, overrides=over).optim.lr == 1e-3
    # The trainer's own config.json (eps: 1e-06) reads back as the config it was written from.
    written = json.dumps(cfg.to_dict(), indent=1)
    assert '"eps": 1e-06' in written
    assert parse_train_config(written).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.grad_clip_norm=.nan", "must be a finite number, got nan"),
        ("loss.beta=.nan", "must be a finite number, got nan"),
        ("loss.alpha=.inf", "must be a finite number, got inf"),
        ("train.epochs=.inf", "must be a finite number, got inf"),
        ("optim.lr=1e400", "must be a finite number, got inf"),
        ("optim.lr=-1e-3", "must be > 0, got -0.001"),
        ("optim.min_lr=1", "must be >= 0 and <= lr (0.001), got 1"),
    ],
)
def test_train_refuses_nan_infinity_and_out_of_range_with_the_key(
    fmnist_shards, make_config, tmp_path, capsys, override, message
):
    cfg = make_config(tmp_path / "t.yaml", fmnist_shards, tmp_path / "run")
    extra = ["--set", "train.steps=null"] if override.startswith("train.epochs") else []
    assert main(["train", str(cfg), "--set", override, *extra]) == 2
    err = capsys.readouterr().err
    key = override.partition("=")[0]
    assert re.search(rf"\n  - {re.escape(key)} \(line \d+\): {re.escape(message)}\n$", err), err
    assert "1 problem(s)" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ("[128, 128, 128, 128]", "expected an object of tar name -> sample count, got a list"),
        (
            '{"00000.tar": 1e400, "00001.tar": 1, "00002.tar": 1, "00003.tar": 1}',
            "00000.tar: expected a sample",
        ),
        ('{"00000.tar": -5, "00001.tar": 1, "00002.tar": 1, "00003.tar": 1}', "got -5"),
        ('{"00000.tar": "9", "00001.tar": 1, "00002.tar": 1, "00003.tar": 1}', "got '9'"),
    ],
)
def test_hostile_sizes_json_is_refused(fmnist_shards, make_config, tmp_path, capsys, sizes, message):
    (tmp_path / "sizes.json").write_text(sizes)
    cfg = make_config(
        tmp_path / "t.yaml",
        fmnist_shards,
        tmp_path / "run",
        data={"sizes": str(tmp_path / "sizes.json")},
        train={"steps": None, "epochs": 1},
    )
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert main(["validate", str(cfg)]) == 2  # the dry run finds it too, under its key
    assert f"data.sizes (line 4): {tmp_path / 'sizes.json'}: " in capsys.readouterr().err


def test_validate_dry_runs_a_training_config(fmnist_shards, make_config, tmp_path, capsys):
    cfg = make_config(tmp_path / "t.yaml", fmnist_shards, tmp_path / "run")
    assert main(["validate", str(cfg)]) == 0
    assert "ok (training config: model curate-tiny" in capsys.readouterr().out
    bad = make_config(
        tmp_path / "bad.yaml",
        tmp_path / "nowhere",
        tmp_path / "run",
        model={"name": "no-such-model", "pretrained": str(cfg)},
        optim={"lr": "1e-3x"},
    )
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "optim.lr (line 11): expected a number, got '1e-3x'" in err
    bad.write_text(bad.read_text().replace("lr: 1e-3x", "lr: 1e-3"))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "data.shards (line 2): no shards match" in err
    assert "model.name (line 8): unknown open_clip model 'no-such-model'" in err
    assert "unknown key" not in err


def test_validate_checks_pretrained_weights(fmnist_shards, make_config, tmp_path, capsys):
    import torch

    class Payload:
        def __reduce__(self):
            return (print, ("pickle payload ran",))

    ck = tmp_path / "ck.pt"
    torch.save({"state_dict": Payload()}, ck)
    cfg = make_config(tmp_path / "t.yaml", fmnist_shards, tmp_path / "run", model={"pretrained": str(ck)})
    assert main(["validate", str(cfg)]) == 2
    out = capsys.readouterr()
    assert "model.pretrained (line 9): cannot read checkpoint" in out.err
    assert "pickle payload ran" not in out.out + out.err


def test_open_clip_json_with_a_hugging_face_text_tower_is_refused(
    fmnist_shards, make_config, tmp_path, capsys
):
    hf = tmp_path / "hf.json"
    hf.write_text(
        json.dumps(
            {
                "embed_dim": 8,
                "vision_cfg": {"image_size": 32},
                "text_cfg": {"hf_tokenizer_name": "bert-base-uncased"},
            }
        )
    )
    cfg = make_config(tmp_path / "t.yaml", fmnist_shards, tmp_path / "run", model={"name": str(hf)})
    assert main(["train", str(cfg)]) == 2
    assert "model.name (line 8): " in capsys.readouterr().err
    assert main(["validate", str(cfg)]) == 2
    assert "text_cfg.hf_tokenizer_name names a Hugging Face model" in capsys.readouterr().err


def test_eval_set_overrides_the_training_config(fmnist_shards, make_config, tmp_path, capsys):
    cfg = make_config(tmp_path / "t.yaml", fmnist_shards, tmp_path / "run")
    assert main(["eval", str(cfg), "--set", f"output_dir={tmp_path / 'other'}"]) == 2
    assert f"no checkpoint in {tmp_path / 'other'}/checkpoints" in capsys.readouterr().err
    # The trainer's config.json, with its eps: 1e-06, is a config eval reads back.
    written = tmp_path / "config.json"
    written.write_text(json.dumps(parse_train_config(cfg.read_text()).to_dict(), indent=1))
    assert '"eps": 1e-06' in written.read_text()
    assert main(["eval", str(written), "--set", "optim.lr=1e-3"]) == 2
    assert f"no checkpoint in {tmp_path / 'run'}/checkpoints" in capsys.readouterr().err
    assert main(["eval", "--model", "curate-tiny", "--set", "optim.lr=1"]) == 2
    assert "--set overrides keys of a training config" in capsys.readouterr().err


def test_mine_refuses_a_hugging_face_text_tower_and_reads_numbers_as_typed(tmp_path, capsys):
    hf = tmp_path / "hf.json"
    hf.write_text(
        json.dumps({"embed_dim": 8, "vision_cfg": {"image_size": 32}, "text_cfg": {"hf_model_name": "x"}})
    )
    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"")
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        f"data: {{shards: x}}\noutput: o\nencoders: {{checkpoint: {ck}, model: {hf}}}\n"
        "mining: {near_duplicate: 9.9e-1, k: 1e1}\n"
    )
    assert main(["mine", str(cfg)]) == 2
    assert "mining.k (line 4): expected an integer, got 10.0" in capsys.readouterr().err  # as in Python
    cfg.write_text(cfg.read_text().replace("k: 1e1", "k: 10"))
    assert main(["mine", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "encoders.model (line 3): " in err and "text_cfg.hf_model_name names a Hugging Face model" in err
    assert "near_duplicate" not in err  # 9.9e-1 is read as the number it is
