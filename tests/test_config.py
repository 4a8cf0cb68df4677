"""Bad input gets a clear error, all problems at once, before any work starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main
from curation.config import ConfigError, load_config
from curation.stages import STAGES, manifest_columns
from curation.validation import parse_checked_config
from tests.helpers import LAION_1K, REPO, write_config


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_checked_config(text, source="x.yaml")
    return e.value.errors


def test_valid_config_loads(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", LAION_1K, tmp_path / "out"), stages=STAGES)
    assert [s.name for s in cfg.stages] == ["caption_complexity", "caption_action"]
    assert cfg.stages[0].params.min == 2 and cfg.stages[1].params.min == 1
    assert cfg.input.url_column == "URL"


def test_malformed_yaml_names_the_line():
    (msg,) = errors_of("input:\n  path: a\n  url_column: [oops\noutput: x\n")
    assert "malformed YAML" in msg and "line" in msg


def test_all_problems_reported_at_once_with_key_paths_and_lines(tmp_path):
    text = f"""input:
  path: {LAION_1K}
  url_column: URL
  caption_column: NOPE
  rows_per_shard: many
  colour: blue
output: {tmp_path}/out
runner: {{type: spark}}
stages:
  - caption_complexity: {{min: two}}
  - caption_mood: {{}}
"""
    errs = errors_of(text)
    joined = "\n".join(errs)
    assert "input.rows_per_shard (line 5): expected an integer, got 'many'" in joined
    assert "input.colour (line 6): unknown key" in joined
    assert "runner.type (line 8): expected one of ['local', 'ray']" in joined
    assert "stages[0].caption_complexity.min (line 10): expected an integer" in joined
    assert "stages[1] (line 11): unknown stage 'caption_mood'; known stages:" in joined
    assert "caption_action" in joined and "caption_complexity" in joined


def test_missing_caption_column_names_the_file_and_its_columns(tmp_path):
    errs = errors_of(
        f"input: {{path: {LAION_1K}, url_column: URL, caption_column: caption}}\n"
        f"output: {tmp_path}/o\nstages: [caption_action]\n"
    )
    (msg,) = errs
    assert "input.caption_column" in msg and str(LAION_1K) in msg and "it has: URL, TEXT" in msg


def test_missing_and_non_parquet_inputs(tmp_path):
    (tmp_path / "notes.parquet").write_text("this is not parquet")
    errs = errors_of(
        f"input: {{path: {tmp_path}/nothing*.parquet}}\noutput: {tmp_path}/o\nstages: [caption_action]\n"
    )
    assert "no files match" in errs[0]
    errs = errors_of(
        f"input: {{path: {tmp_path}/notes.parquet}}\noutput: {tmp_path}/o\nstages: [caption_action]\n"
    )
    assert "is not a readable Parquet file" in errs[0]


def test_unwritable_output(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    cfg = write_config(tmp_path / "c.yaml", LAION_1K, ro / "x")
    if os.geteuid() != 0:
        ro.chmod(0o500)
        errs = errors_of(cfg.read_text())
        assert "not writable" in errs[0]
        return
    # root writes anywhere: run the check as an unprivileged user instead
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv")
    # pytest's own tmp root is private to root; use a world-readable one
    tmp = Path(tempfile.mkdtemp(prefix="curate-ro-"))
    tmp.chmod(0o755)
    ro = tmp / "ro"
    ro.mkdir()
    cfg = write_config(tmp / "c.yaml", LAION_1K, ro / "x")
    cfg.chmod(0o644)
    cmd = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        sys.executable,
        "-m",
        "curation.cli",
    ]
    proc = subprocess.run([*cmd, "validate", str(cfg)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    shutil.rmtree(tmp)
    assert "output" in proc.stderr and "not writable" in proc.stderr


def test_output_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    errs = errors_of(
        f"input: {{path: {LAION_1K}, url_column: URL, caption_column: TEXT}}\noutput: {f}/x\nstages: [caption_action]\n"
    )
    assert "is not a directory" in errs[0]


def test_caption_stages_must_agree_on_the_shared_parse(tmp_path):
    errs = errors_of(
        f"input: {{path: {LAION_1K}, url_column: URL, caption_column: TEXT}}\noutput: {tmp_path}/o\n"
        "stages:\n  - caption_complexity: {max_chars: 100}\n  - caption_action: {max_chars: 200}\n"
    )
    assert "share one computation: set model, max_chars, batch_size" in errs[0]


def test_validate_command_exit_codes(tmp_path, capsys):
    good = write_config(tmp_path / "good.yaml", LAION_1K, tmp_path / "out")
    assert main(["validate", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: {path: x}\nstages: [nope]\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "output" in err and "unknown stage 'nope'" in err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert not (tmp_path / "out").exists()  # validation does no work


def test_carried_columns_that_collide_are_prefixed(tmp_path):
    src = tmp_path / "in.parquet"
    t = pq.read_table(LAION_1K).slice(0, 5)
    t = t.append_column("keep", pa.array(["x"] * 5)).append_column("similarity", pa.array([0.3] * 5))
    pq.write_table(t, src)
    cfg = load_config(write_config(tmp_path / "c.yaml", src, tmp_path / "out"), stages=STAGES)
    from curation.sources import make_source

    names = make_source(cfg.input, manifest_columns()).carried_schema().names
    assert "input_keep" in names and "similarity" in names and "__index_level_0__" not in names
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
