"""The notebooks run top to bottom against a real run's manifests, and leave the run as they found it."""

from __future__ import annotations

import os

import duckdb
import nbformat
import pytest
from nbclient import NotebookClient

from curation.cli import main
from curation.report.collect import plotted
from tests.helpers import LAION_1K, REPO, write_config


def snapshot(folder) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("name", ["explore_run.ipynb"])
def test_notebook_executes(tmp_path, name, monkeypatch):
    out = tmp_path / "run"
    assert main(["run", str(write_config(tmp_path / "c.yaml", LAION_1K, out, rows_per_shard=500))]) == 0
    before = snapshot(out)
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    monkeypatch.setenv("CURATE_RUN", str(out))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "complexity >= 2  actions >= 1  keeps" in text
    # every numeric score of the run is plotted (not only the caption ones), shown inline
    columns = dict(
        duckdb.sql(
            f"SELECT column_name, column_type FROM (DESCRIBE FROM '{out}/manifests/*.parquet')"
        ).fetchall()
    )
    numeric = [name for name, _, _ in plotted(columns)[0]]
    assert len(numeric) == 4 and f"plotted: {', '.join(numeric)}\n" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
    # and nothing was written into the run directory
    assert snapshot(out) == before
