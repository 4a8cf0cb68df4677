"""Test helpers shared across modules (conftest holds only fixtures)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _shared_data(name: str) -> Path:
    """`shared/` lies beside the checkout (CI's clean clone, a developer's main); worktrees sit deeper."""
    for parent in REPO.parents:
        candidate = parent / "shared" / "data" / name
        if candidate.exists():
            return candidate
    return REPO.parent / "shared" / "data" / name


LAION_10K = _shared_data("laion_captions_10k.parquet")
LAION_1K = REPO / "data" / "laion_captions_1k.parquet"


def write_config(path: Path, input_path: str | Path, output: str | Path, **extra) -> Path:
    """A caption-only pipeline config over LAION-style Parquet input."""
    rows = extra.pop("rows_per_shard", 100)
    workers = extra.pop("workers", 1)
    stages = extra.pop("stages", "  - caption_complexity: {min: 2}\n  - caption_action: {min: 1}\n")
    path.write_text(
        f"""input:
  format: parquet
  path: {input_path}
  url_column: URL
  caption_column: TEXT
  rows_per_shard: {rows}
output: {output}
runner: {{type: local, workers: {workers}, progress: false}}
stages:
{stages}"""
    )
    return path


def netns_prefix() -> list[str] | None:
    """A command prefix that runs its argument in a fresh network namespace with loopback up
    (nothing outside this machine is reachable from it); None where one cannot be made."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return None
    # -n needs root (CAP_SYS_ADMIN); -rn maps the user to root in a new user namespace.
    for flags in (["-n"], ["-rn"]):
        probe = subprocess.run(["unshare", *flags, "ip", "link", "set", "lo", "up"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", *flags, "sh", "-c", 'ip link set lo up && exec "$@"', "netns"]
    return None
