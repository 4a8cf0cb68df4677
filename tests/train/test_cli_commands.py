"""Training features as a user runs them: through the `curate` command, not the library behind it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from curation.cli import main


def _mixture(make_config, tmp_path: Path, shards: Path) -> Path:
    cfg = make_config(tmp_path / "mix.yaml", shards, tmp_path / "out")
    data = yaml.safe_load(cfg.read_text())
    data["data"] = {
        "sources": [
            {"shards": f"{shards}/{{00000..00002}}.tar", "weight": 1},
            {"shards": f"{shards}/00003.tar", "weight": 3},
        ],
        "workers": 0,
    }
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def test_a_data_mixture_validates_and_trains_through_the_command(
    fmnist_shards, make_config, tmp_path, capsys
) -> None:
    cfg = _mixture(make_config, tmp_path, fmnist_shards)
    assert main(["validate", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"{fmnist_shards}/{{00000..00002}}.tar: 3 shard(s), 384 samples" in out
    assert f"{fmnist_shards}/00003.tar: 1 shard(s), 128 samples" in out
    assert main(["train", str(cfg)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 4


def test_shards_a_brace_pattern_names_but_nobody_wrote_are_named(
    fmnist_shards, make_config, tmp_path, capsys, caplog
) -> None:
    cfg = make_config(tmp_path / "c.yaml", fmnist_shards, tmp_path / "out")
    data = yaml.safe_load(cfg.read_text())
    data["data"]["shards"] = f"{fmnist_shards}/{{00000..00005}}.tar"  # 4 written
    data["data"]["sizes"] = None
    cfg.write_text(yaml.safe_dump(data))
    assert main(["validate", str(cfg), "--set", "train.steps=2"]) == 0
    out = capsys.readouterr().out
    assert "4 of 6 shards found (2 missing: " in out and "00004.tar" in out and "512 samples" in out
    assert main(["train", str(cfg), "--set", "train.steps=1"]) == 0
    warned = [r.getMessage() for r in caplog.records if "4 of 6 shards found (2 missing" in r.getMessage()]
    assert len(warned) == 1, warned  # said once, though two steps expand the pattern


def test_ctrl_c_of_train_is_one_line_that_says_how_to_resume(fmnist_shards, make_config, tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import REPO, started_as_from_a_terminal

    cfg = make_config(tmp_path / "c.yaml", fmnist_shards, tmp_path / "out", train={"steps": 100000})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "curation.cli", "train", str(cfg)]
    with started_as_from_a_terminal(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics.exists() and metrics.stat().st_size):  # training has started
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        "curate: interrupted: checkpoints are kept; resume with `curate train CONFIG --resume`"
    )


def _tiny_checkpoint(path: Path) -> Path:
    import torch

    from curation.models.clip import build_model

    torch.manual_seed(0)
    built = build_model("curate-tiny")
    torch.save({"state_dict": built.model.state_dict(), "model_name": "curate-tiny"}, path)
    return path


def test_eval_templates_task_and_fashion_mnist_source_through_the_command(tmp_path, capsys) -> None:
    ck = _tiny_checkpoint(tmp_path / "tiny.pt")
    base = ["eval", "--checkpoint", str(ck), "--limit", "40", "--device", "cpu"]
    results = {}
    (tmp_path / "t.txt").write_text("a blurry photo of a {}.\nthe {}, upside down\n")
    zero_shot = [*base, "--zero-shot", "fashion-mnist", "--fashion-mnist-source", "subset"]
    for name, argv in (
        ("default", zero_shot),
        ("templates", ["eval", *zero_shot[1:], "--templates", str(tmp_path / "t.txt")]),
    ):
        assert main([*argv, "--json", str(tmp_path / f"{name}.json")]) == 0
        text = (tmp_path / f"{name}.json").read_text()
        assert json.loads(text)["checkpoint"] == str(ck)  # which checkpoint these numbers are of
        assert not re.search(r"\d\.\d{7,}", text), text  # no float32 noise (0.20399999618530273)
        results[name] = json.loads(text)["zero_shot"]
        capsys.readouterr()
    assert results["default"]["n"] == results["templates"]["n"] == 40
    # Other prompts give other class embeddings: the logits, and so the scores, move.
    assert results["default"] != results["templates"]
    assert main([*base, "--few-shot", "0,2", "--task", "fashion-mnist", "--draws", "1", "--seed", "3",
                 "--json", str(tmp_path / "fs.json")]) == 0  # fmt: skip
    assert "shots" in capsys.readouterr().out


def test_mine_method_and_near_duplicate_through_the_command(
    fmnist_shards, tmp_path, capsys, monkeypatch
) -> None:
    import pyarrow.parquet as pq

    from train.mining.output import read_parameters

    ck = _tiny_checkpoint(tmp_path / "tiny.pt")
    monkeypatch.chdir(tmp_path)
    argv = ["mine", "--shards", f"{fmnist_shards}/{{00000..00001}}.tar", "--checkpoint", str(ck), "-o", "m"]
    assert main([*argv, "--k", "4", "--method", "pool", "--near-duplicate", "0.9", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("m: 256 pairs;")  # the output as named, not made absolute
    params = read_parameters(tmp_path / "m" / "hard_pairs.parquet")
    assert params["near_duplicate"] == 0.9 and params["method"] == "pool"
    assert pq.read_table(tmp_path / "m" / "hard_pairs.parquet").num_rows == 256


def test_resume_of_a_finished_run_says_so_and_prints_valid_json(fmnist_shards, make_config, tmp_path, capsys):
    cfg = make_config(tmp_path / "c.yaml", fmnist_shards, tmp_path / "out", train={"steps": 2})
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume"]) == 0
    out, err = capsys.readouterr()
    assert "curate: already at step 2 of 2: nothing to train" in err
    result = json.loads(out.strip().splitlines()[-1], parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert result["steps"] == 2 and result["final_loss"] is None
    assert result["checkpoint"].endswith("step_00000002.pt")


def test_a_second_train_on_the_same_output_dir_is_refused(
    fmnist_shards, make_config, tmp_path, capsys
) -> None:
    from curation.core.storage import open_store
    from curation.rundir import exclusive_lock_on

    out = tmp_path / "out"
    cfg = make_config(tmp_path / "c.yaml", fmnist_shards, out, train={"steps": 1})
    # The lock a running `curate train` holds (the same helper, as a second process would meet it).
    with exclusive_lock_on(open_store(out), ".lock", f"another `curate train` is writing to {out}"):
        assert main(["train", str(cfg)]) == 2
        assert f"curate: error: another `curate train` is writing to {out}" in capsys.readouterr().err
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    assert main(["train", str(cfg)]) == 0  # released: it runs


def test_into_a_log_train_prints_a_line_per_window_and_no_progress_frames(
    fmnist_shards, make_config, tmp_path
):
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    cfg = make_config(
        tmp_path / "c.yaml", fmnist_shards, tmp_path / "out", train={"progress": True, "log_every": 2}
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "curation.cli", "train", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    assert "step 2/4, loss " in proc.stderr and "step 4/4, loss " in proc.stderr, proc.stderr
