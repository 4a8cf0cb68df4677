"""bench/gpu_check.py's reduced CPU form: every CUDA path's code runs, so the GPU check cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_cpu_form_passes_every_path(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    report = json.loads(out.read_text())
    failed = {k: r.get("error") for k, r in report["checks"].items() if not r["ok"]}
    assert proc.returncode == 0 and report["all_ok"], (failed, proc.stdout[-2000:], proc.stderr[-2000:])
    assert set(report["checks"]) == {
        "text_spotting", "clip_score", "concepts", "mining_exact", "train", "train_compile",
        "train_micro_batch", "train_distill_hard_pairs", "ddp",
    }  # fmt: skip
    assert all(r["target"] for r in report["checks"].values())
    assert report["checks"]["ddp"]["backend"] == "gloo" and report["checks"]["ddp"]["world_size"] == 2
