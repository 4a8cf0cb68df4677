"""The notebooks run top to bottom against a real run's manifests."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

from curation.cli import main
from tests.helpers import LAION_1K, REPO, write_config


@pytest.mark.parametrize("name", ["explore_run.ipynb"])
def test_notebook_executes(tmp_path, name, monkeypatch):
    out = tmp_path / "run"
    assert main(["run", str(write_config(tmp_path / "c.yaml", LAION_1K, out, rows_per_shard=500))]) == 0
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    monkeypatch.setenv("CURATE_RUN", str(out))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "complexity >= 2  actions >= 1  keeps" in outputs
    assert (out / "score_histograms.png").stat().st_size > 1000
