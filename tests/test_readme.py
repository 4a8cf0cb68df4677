"""The README runs: its ```bash blocks, in order, on a fresh copy of the repository.

The convention (stated in the README): a ```bash block runs from the repository
root of a fresh clone with the environment's `bin/` first on the PATH, on CPU, in
about a minute; a ```text block is an example that is not run. The copy holds
exactly the files git tracks (what a clone has), so a block that depends on
something a developer happens to have (an earlier `make demo`, a downloaded
dataset) fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)


def bash_blocks(markdown: str) -> list[str]:
    return BLOCK.findall(markdown)


def test_blocks_are_found_in_order_and_text_blocks_are_not():
    text = "a\n```bash\necho 1\n```\n```text\nrm -rf /\n```\n```bash\necho 2\necho 3\n```\n"
    assert bash_blocks(text) == ["echo 1\n", "echo 2\necho 3\n"]


def fresh_copy(dest: Path) -> Path:
    """The tracked files of this checkout (with their working-tree content), as a clone would have them."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    for name in listed.stdout.decode().split("\0"):
        if name and (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.mark.slow
def test_readme_bash_blocks_run_in_order_on_a_fresh_copy(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: no list of tracked files")
    root = fresh_copy(tmp_path / "clone")
    blocks = bash_blocks((root / "README.md").read_text())
    assert len(blocks) >= 3
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(root),  # the copy's code, also for the `curate` entry point
        NO_ALBUMENTATIONS_UPDATE="1",
        HF_HUB_OFFLINE="1",
    )
    for i, block in enumerate(blocks):
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        where = (
            f"README block {i + 1}:\n{block}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
        assert proc.returncode == 0, where
        assert "Traceback" not in proc.stderr, where
        assert "Warning" not in proc.stderr, where  # e.g. torch's quantization warnings on image runs


def test_docs_link_only_to_files_the_repository_has():
    """Relative links in the docs resolve inside the repository (no `../shared/...`)."""
    docs = [REPO / "README.md", REPO / "train" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    link = re.compile(r"\]\(([^)\s]+)\)")
    for doc in docs:
        for target in link.findall(doc.read_text()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            assert path.is_relative_to(REPO) and path.exists(), (
                f"{doc.relative_to(REPO)}: broken link {target}"
            )
    for folder in ("curation", "train", "pipelines", "docs"):
        for f in (REPO / folder).rglob("*"):
            if f.suffix in (".py", ".md", ".yaml"):
                assert "shared/METHODS.md" not in f.read_text(), f


def test_no_tracked_file_holds_merge_conflict_markers():
    """A merge left unresolved shows the reader two versions of one passage (docs/storage.md once did)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    marker = re.compile(r"^(<{7} |={7}$|>{7} )", re.MULTILINE)
    bad = []
    for name in files.stdout.splitlines():
        path = REPO / name
        if path.suffix in {".parquet", ".png", ".jpg", ".tar", ".pt", ".ipynb"} or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        bad += [f"{name}:{text.count(chr(10), 0, m.start()) + 1}" for m in marker.finditer(text)]
    assert not bad, f"merge-conflict markers: {bad}"


def test_make_demo_writes_only_under_its_own_folder():
    """`make demo` must never delete the runs the README has the user make by hand (runs/demo, ...)."""
    script = (REPO / "pipelines" / "demo.sh").read_text()
    outputs = re.findall(r"^(?:out|subset)=(\S+)", script, re.MULTILINE)
    assert outputs and all(o.startswith("runs/make_demo/") for o in outputs), outputs
    removed = re.findall(r"rm -rf (.+)", script)
    assert removed and all(set(re.findall(r'"\$(\w+)"', r)) <= {"out", "subset"} for r in removed), removed
    readme_runs = set(
        re.findall(r"curate run \S+ (?:--output|-o) (runs/\S+)", (REPO / "README.md").read_text())
    )
    readme_runs |= {"runs/demo", "runs/demo_images", "runs/demo_subset"}
    assert not readme_runs & set(outputs)
