"""`curate train`, `eval` and `mine` on inputs that cannot feed them: one `curate: error:` line, exit 2.

Real tars (not a tar, cut short, empty), a real checkpoint with a pickle payload, real shards
sharing a file name in two folders.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from curation.cli import main as curate


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("curate: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from curation.models.clip import build_model

    torch.manual_seed(0)
    built = build_model("curate-tiny")
    path = tmp_path_factory.mktemp("ck") / "tiny.pt"
    torch.save({"state_dict": built.model.state_dict(), "model_name": "curate-tiny"}, path)
    return path


@pytest.fixture
def bad_shards(fmnist_shards, tmp_path) -> dict[str, Path]:
    """Folders of one shard each: not a tar, a tar cut short, a tar holding no sample."""
    good = (fmnist_shards / "00000.tar").read_bytes()
    out = {}
    for name, data in (
        ("not_a_tar", b"this is not a tar file " * 100),
        ("truncated", good[: len(good) // 40]),  # a few samples, then the cut
        ("empty", tarfile.BLOCKSIZE * 2 * b"\0"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "00000.tar").write_bytes(data)
        out[name] = folder
    return out


@pytest.mark.parametrize("case", ["not_a_tar", "truncated", "empty"])
def test_train_on_unusable_shards_is_one_error_line_before_training(
    case, bad_shards, tmp_path, make_config, capsys
):
    out = tmp_path / "run"
    cfg = make_config(
        tmp_path / "c.yaml", bad_shards[case], out, data={"shards": str(bad_shards[case] / "00000.tar")}
    )
    assert curate(["train", str(cfg)]) == 2
    line = _error_line(capsys)
    assert "00000.tar" in line
    expected = {"not_a_tar": "not a readable tar", "truncated": "not a readable tar", "empty": "no sample"}
    assert expected[case] in line, line
    assert not list(out.glob("checkpoints/*.pt"))  # no step was taken


def test_eval_retrieval_on_an_empty_set_says_so(bad_shards, checkpoint, capsys):
    shards = str(bad_shards["empty"] / "00000.tar")
    assert curate(["eval", "--checkpoint", str(checkpoint), "--retrieval", shards, "--device", "cpu"]) == 2
    assert "no image-caption pair" in _error_line(capsys)


def test_eval_of_a_checkpoint_with_a_pickle_payload_never_advises_unsafe_loading(tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "bad.pt"
    torch.save({"model_name": "curate-tiny", "x": Payload()}, bad)
    assert curate(["eval", "--checkpoint", str(bad), "--device", "cpu", "--limit", "8"]) == 2
    line = _error_line(capsys)
    assert "pickle payload" in line and "weights_only" not in line and not marker.exists()


def test_mine_on_an_empty_tar_says_so(bad_shards, checkpoint, tmp_path, capsys):
    argv = ["mine", "--shards", str(bad_shards["empty"] / "00000.tar"), "--checkpoint", str(checkpoint)]
    assert curate([*argv, "-o", str(tmp_path / "m"), "--no-progress"]) == 2
    line = _error_line(capsys)
    assert "no image-caption pair" in line and "list_size" not in line


def test_mine_refuses_two_shards_with_one_file_name(fmnist_shards, checkpoint, tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(fmnist_shards / "00000.tar", tmp_path / folder / "00000.tar")
    shards = f"{tmp_path}/{{a,b}}/00000.tar"
    argv = ["mine", "--shards", shards, "--checkpoint", str(checkpoint), "-o", str(tmp_path / "m")]
    assert curate([*argv, "--no-progress"]) == 2
    line = _error_line(capsys)
    assert "same file name" in line and "uid twice" not in line
    assert not (tmp_path / "m" / "embeddings").exists() or not list(
        (tmp_path / "m" / "embeddings").glob("*.parquet")
    )


def test_eval_few_shot_prints_a_table_and_keeps_the_json_in_its_file(
    fmnist_shards, checkpoint, tmp_path, capsys
):
    out = tmp_path / "fs.json"
    argv = ["eval", "--checkpoint", str(checkpoint), "--few-shot", "0,2", "--draws", "1", "--limit", "40"]
    assert curate([*argv, "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "{" not in printed and "shots" in printed
    rows = [ln.split() for ln in printed.splitlines() if ln.strip() and ln.split()[0] in ("0", "2")]
    assert [r[0] for r in rows] == ["0", "2"] and "±" in rows[1]
    import json

    data = json.loads(out.read_text())
    assert data["few_shot"]["shots"] == [0, 2] and out.with_suffix(".png").exists()
    # The table shows the file's numbers, rounded.
    mean = next(p["mean"] for p in data["few_shot"]["curves"]["linear_probe"] if p["shots"] == 2)
    assert f"{100 * mean:.1f}" in printed


def test_python_m_train_runs_the_same_cli(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run(
        [sys.executable, "-m", "train", str(tmp_path / "none.yaml")], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2 and proc.stderr.startswith("curate: error: config file not found"), (
        proc.stderr
    )
