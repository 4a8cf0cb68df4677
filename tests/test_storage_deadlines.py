"""A store endpoint that accepts connections and then says nothing (a stalled proxy or load
balancer) must not hang curate: every attempt has a deadline, retries are counted within a
budget, and the command ends with one line; the run resumes exactly once the store answers.

The proxy (tests/stallproxy.py) sits on 127.0.0.1 in front of the moto server. The deadlines
are shortened through the documented variables so the tests take seconds, not minutes.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from curation.cli import main
from curation.core.storage import StorageError, open_store
from tests.helpers import LAION_1K, REPO, write_config
from tests.stallproxy import StallingProxy
from tests.test_storage_s3 import FAST_STAGE, _env, committed_manifests, ledger, source_uids

SHORT = {"CURATE_STORAGE_TIMEOUT": "1", "CURATE_STORAGE_RETRY_SECONDS": "3"}
# A command must end well within this; without deadlines one request took 417 s.
BOUND_S = 90


@pytest.fixture
def proxy(s3, bucket, monkeypatch):
    with StallingProxy(s3.port) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
        for k, v in SHORT.items():
            monkeypatch.setenv(k, v)
        yield p


def test_every_store_operation_on_a_stalled_endpoint_fails_in_bounded_time_with_one_line(s3, bucket, proxy):
    store = open_store(f"s3://{bucket}/x")
    store.put_bytes("a.json", b"{}")  # through the proxy while it forwards
    assert store.get_bytes("a.json") == b"{}"
    proxy.stall()
    operations = {
        "get": lambda: store.get_bytes("a.json"),
        "put": lambda: store.put_bytes("b.json", b"{}"),
        "exists": lambda: store.exists("a.json"),
        "list": lambda: store.list(""),
        "info": lambda: store.info("a.json"),
        "check": store.check,
    }
    for name, op in operations.items():
        with pytest.raises(StorageError) as e:
            op()
        message = str(e.value)
        assert "\n" not in message and "testing-secret" not in message, (name, message)
        assert "attempt" in message or "cannot use" in message, (name, message)
    proxy.resume()
    assert store.get_bytes("a.json") == b"{}"


def test_status_and_run_against_a_stalled_endpoint_end_with_one_line(tmp_path, s3, bucket, proxy):
    proxy.stall()
    env = _env({**s3.env, "AWS_ENDPOINT_URL": proxy.endpoint, **SHORT})
    cfg = write_config(tmp_path / "c.yaml", LAION_1K, f"s3://{bucket}/run", stages=FAST_STAGE)
    for argv in (["status", f"s3://{bucket}/run"], ["run", str(cfg)], ["validate", str(cfg)]):
        proc = subprocess.run(
            [sys.executable, "-m", "curation.cli", *argv],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=BOUND_S,
        )
        # One line, or for a config the one problem list `validate` prints (a header and a line each).
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert lines[0].startswith("curate: error: ") and len(lines) <= 2, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr and "attempt" in proc.stderr, (argv, proc.stderr)


def test_a_run_whose_store_stalls_midway_stops_in_bounded_time_and_resumes_exactly(
    tmp_path, s3, bucket, proxy
):
    cfg = write_config(
        tmp_path / "c.yaml", LAION_1K, f"s3://{bucket}/run", rows_per_shard=20, workers=1, stages=FAST_STAGE
    )
    env = _env({**s3.env, "AWS_ENDPOINT_URL": proxy.endpoint, **SHORT})
    proc = subprocess.Popen(
        [sys.executable, "-m", "curation.cli", "run", str(cfg), "--no-progress"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 180
        while len(s3.keys(bucket, "run/ledger/")) < 3:
            assert proc.poll() is None, "run finished before the store could stall; use more input"
            assert time.time() < deadline
            time.sleep(0.05)
        proxy.stall()
        _, err = proc.communicate(timeout=BOUND_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (1, 2), err[-2000:]
    assert "Traceback" not in err and "Task exception was never retrieved" not in err, err[-3000:]

    proxy.resume()
    assert main(["run", str(cfg)]) == 0
    assert set(ledger(s3, bucket, "run")) == set(range(50))
    t = committed_manifests(s3, bucket, "run")
    assert collections.Counter(t.column("uid").to_pylist()) == source_uids(LAION_1K)


# ---------------------------------------------------------------------------- stale staging


def _dead_process_staging(location: str, env: dict[str, str] | None = None) -> Path:
    """Stage a half-written file from a process that is then killed with SIGKILL; its folder."""
    code = (
        "import os, sys; from curation.core.storage import open_store; "
        "p = open_store(sys.argv[1]).staging(); (p / 'half.parquet').write_bytes(b'x' * 100); "
        "print(p, flush=True); os.kill(os.getpid(), 9)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, location],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    folder = Path(proc.stdout.strip())
    assert (folder / "half.parquet").exists()
    return folder


def test_staging_left_by_killed_processes_is_removed_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    dead = _dead_process_staging(str(out))
    base = dead.parent
    other_host = base / "another-host-1-1"
    other_host.mkdir()
    old_layout = base / "download-x-00001-abc"
    old_layout.mkdir()
    os.utime(old_layout, (time.time() - 3 * 86400,) * 2)
    recent_old_layout = base / "shard-00002.parquet.tmp"
    recent_old_layout.write_bytes(b"x")

    mine = open_store(str(out)).staging()
    assert mine.parent == base and mine.exists()
    assert not dead.exists() and not old_layout.exists()
    assert other_host.exists() and recent_old_layout.exists()
    # A second process sees this (live) process's folder and keeps it.
    _dead_process_staging(str(out))
    assert mine.exists()


def test_curate_run_cleans_what_a_killed_run_staged_locally_and_for_s3(tmp_path, s3, bucket, monkeypatch):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # gettempdir() caches TMPDIR
    local_cfg = write_config(tmp_path / "l.yaml", LAION_1K, tmp_path / "run", stages=FAST_STAGE)
    s3_cfg = write_config(tmp_path / "s.yaml", LAION_1K, f"s3://{bucket}/run", stages=FAST_STAGE)
    dead_local = _dead_process_staging(str(tmp_path / "run" / "manifests"))
    dead_s3 = _dead_process_staging(f"s3://{bucket}/run", env={**s3.env, "TMPDIR": str(tmp_path / "tmp")})
    assert dead_s3.is_relative_to(tmp_path / "tmp")
    for cfg in (local_cfg, s3_cfg):
        assert main(["run", str(cfg)]) == 0
    assert not dead_local.exists() and not dead_s3.exists()
