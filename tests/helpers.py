"""Test helpers shared across modules (conftest holds only fixtures)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAION_1K = REPO / "data" / "laion_captions_1k.parquet"


@contextlib.contextmanager
def started_as_from_a_terminal(cmd: list[str], **popen) -> Iterator[subprocess.Popen]:
    """`cmd` started with SIGINT at its default action, as a process started from a terminal has it,
    even when the tests themselves run in the background (a shell's `cmd &` makes its job ignore
    SIGINT, and children inherit that: Ctrl-C tests would then wait on a process that cannot be
    interrupted). Killed on the way out, whatever happened."""
    import signal

    proc = subprocess.Popen(cmd, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def kill_run_at_hanging_url(cfg: Path, hanging, timeout: float = 120) -> None:
    """`curate run CFG` in a session of its own, killed with everything it started (SIGKILL to the
    session) once the test's server sets `hanging` (a threading.Event: a request reached a URL that
    never answers). What a crash mid-shard leaves behind is then the caller's to check."""
    import os
    import signal
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "curation.cli", "run", str(cfg)],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert hanging.wait(timeout), "the run never reached the hanging url"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def laion_10k() -> Path:
    """10,000 LAION-style rows for runs that must last long enough to be killed mid-way: the bundled
    1k ten times over, each copy's URLs made distinct (`#copyN`), so every uid differs.

    Built from `data/` once per machine into the temp directory (a user's clone has nothing beside it).
    """
    import hashlib
    import os
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    digest = hashlib.sha256(LAION_1K.read_bytes()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"curate-tests-laion-10k-{digest}.parquet"
    if not path.exists():
        src = pq.read_table(LAION_1K, columns=["URL", "TEXT"])
        urls = src.column("URL").to_pylist()
        copies = [
            pa.table({"URL": [u if i == 0 else f"{u}#copy{i}" for u in urls], "TEXT": src.column("TEXT")})
            for i in range(10)
        ]
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        pq.write_table(pa.concat_tables(copies), tmp)
        os.replace(tmp, path)  # atomic: parallel test processes never read a half-written file
    return path


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
