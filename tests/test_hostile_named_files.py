"""Files a user names on the command line (`select --balance`, `eval --templates`) are untrusted:
a FIFO must not hang the command, a link to /dev/zero must not fill memory, a folder or a
missing file is one line, and a template `str.format` would act on is refused before it can
build a 2 GB string. Through the `curate` command, on real FIFOs and links.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main
from tests.helpers import REPO, write_config


def _curate(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "curation.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curate: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def hostile_files(tmp_path):
    fifo = tmp_path / "entries.fifo"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.txt"
    zero.symlink_to("/dev/zero")
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:  # sparse: 300 MB that take no disk
        f.truncate(300 * 2**20)
    folder = tmp_path / "folder"
    folder.mkdir()
    return {
        "fifo": (fifo, "not a regular file"),
        "zero": (zero, "not a regular file"),
        "big": (big, "bytes > the limit"),
        "folder": (folder, "is a folder"),
        "missing": (tmp_path / "nope.txt", "No such file"),
    }


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("balance")
    pq.write_table(
        pa.table(
            {
                "URL": [f"https://example.com/{i}.jpg" for i in range(40)],
                "TEXT": [f"a red dog number {i}" if i % 2 else f"a blue cat number {i}" for i in range(40)],
            }
        ),
        tmp / "pairs.parquet",
    )
    cfg = write_config(
        tmp / "p.yaml", tmp / "pairs.parquet", tmp / "run", stages="  - caption_length: {min_words: 1}\n"
    )
    assert main(["run", str(cfg)]) == 0
    return tmp / "run"


def test_select_balance_refuses_fifos_devices_huge_files_folders_and_missing_files(
    caption_run, hostile_files, tmp_path
):
    for name, (path, why) in hostile_files.items():
        proc = _curate(
            "select",
            str(caption_run),
            "--balance",
            str(path),
            "--uids-only",
            "--out",
            str(tmp_path / f"{name}.parquet"),
        )
        _one_line(proc, "--balance", why)
        assert not (tmp_path / f"{name}.parquet").exists()


def test_select_balance_seed_must_be_non_negative_and_a_good_file_still_balances(
    caption_run, tmp_path, capsys
):
    entries = tmp_path / "entries.txt"
    entries.write_text("dog\ncat\n")
    proc = _curate(
        "select",
        str(caption_run),
        "--balance",
        str(entries),
        "--balance-seed",
        "-1",
        "--uids-only",
        "--out",
        str(tmp_path / "s.parquet"),
    )
    _one_line(proc, "--balance-seed", ">= 0")
    out = tmp_path / "ok.parquet"
    argv = ["select", str(caption_run), "--balance", str(entries), "--balance-t", "5", "--balance-seed", "3"]
    assert main([*argv, "--uids-only", "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == 10  # 5 per entry, both entries have 20 rows


def test_eval_templates_refuses_hostile_files_before_loading_anything(hostile_files):
    for path, why in hostile_files.values():
        _one_line(
            _curate("eval", "--model", "curate-tiny", "--templates", str(path), "--limit", "8"),
            "--templates",
            why,
        )


@pytest.mark.parametrize(
    "line, why",
    [
        ("a photo of a {:>2000000000}.", "exactly one plain {}"),
        ("a photo of {1}.", "exactly one plain {}"),
        ("a photo of {x}.", "exactly one plain {}"),
        ("a {} and a {}.", "exactly one plain {}"),
        ("a photo of a {!r}.", "exactly one plain {}"),
        ("no class name here.", "exactly one plain {}"),
        ("a photo of a {.", "line 2"),
        ("x" * 5000 + " {}", "characters"),
    ],
)
def test_eval_templates_refuses_what_format_would_act_on(tmp_path, line, why):
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {}.\n" + line + "\n")
    _one_line(_curate("eval", "--model", "curate-tiny", "--templates", str(path), "--limit", "8"), why)


def test_eval_with_good_templates_runs_through_the_command(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {}.\n\n  a drawing of a {{curly}} {}.  \n")
    out = tmp_path / "zs.json"
    proc = _curate(
        "eval",
        "--model",
        "curate-tiny",
        "--templates",
        str(path),
        "--limit",
        "20",
        "--json",
        str(out),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert "zero_shot" in json.dumps(results)
