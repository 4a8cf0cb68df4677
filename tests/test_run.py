"""`curate run` end to end: every row kept track of, atomic shards, resume, failures, queries."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main
from curation.schema import make_uid
from tests.helpers import LAION_1K, REPO, laion_10k, write_config


def manifest(out) -> pa.Table:
    return pq.read_table(out / "manifests")


def file_ids(out) -> dict[str, tuple[int, int]]:
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "manifests").glob("shard-*.parquet")
    }


def test_every_input_row_appears_once_with_scores_and_decision(tmp_path, capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", LAION_1K, out, rows_per_shard=300)
    assert main(["run", str(cfg)]) == 0
    t = manifest(out)
    src = pq.read_table(LAION_1K)
    assert t.num_rows == src.num_rows == 1000
    assert sorted(t.column("uid").to_pylist()) == sorted(
        make_uid(u, c) for u, c in zip(src.column("URL").to_pylist(), src.column("TEXT").to_pylist())
    )
    assert t.column_names[:4] == ["uid", "shard", "url", "caption"]
    assert t.column_names[-3:] == ["keep", "drop_reason", "drop_stage"]
    con = duckdb.connect()
    con.register("m", t)
    # the decision is exactly the rule applied to the recorded scores
    bad = con.execute(
        """SELECT count(*) FROM m WHERE keep != (caption_complexity >= 2 AND caption_verbs >= 1)
           OR (drop_reason = 'complexity') != (caption_complexity < 2)
           OR (drop_reason IS NULL) != keep
           OR (drop_stage = 'caption_complexity') != (drop_reason = 'complexity')"""
    ).fetchone()[0]
    assert bad == 0
    assert sorted(set(t.column("shard").to_pylist())) == [0, 1, 2, 3]
    assert "4 shard(s) written" in capsys.readouterr().out


def test_two_workers_give_the_same_rows_as_one(tmp_path):
    results = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        cfg = write_config(tmp_path / f"c{workers}.yaml", LAION_1K, out, rows_per_shard=250, workers=workers)
        assert main(["run", str(cfg)]) == 0
        results.append(manifest(out).sort_by([("shard", "ascending"), ("uid", "ascending")]).drop_columns([]))
    assert results[0].equals(results[1])


def test_rerun_of_a_finished_output_does_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", LAION_1K, out, rows_per_shard=500)
    assert main(["run", str(cfg)]) == 0
    before = file_ids(out)
    assert main(["run", str(cfg)]) == 0
    assert file_ids(out) == before
    assert "0 shard(s) written, 2 already done" in capsys.readouterr().out


def test_config_change_that_alters_results_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", LAION_1K, out, rows_per_shard=500)
    assert main(["run", str(cfg)]) == 0
    changed = write_config(
        tmp_path / "c2.yaml", LAION_1K, out, rows_per_shard=500, stages="  - caption_complexity: {min: 3}\n"
    )
    assert main(["run", str(changed)]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "min" in err and "--output" in err
    # a runner change does not alter results and is accepted
    assert main(["run", str(cfg), "--workers", "2"]) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path, workers):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", laion_10k(), out, rows_per_shard=400, workers=workers)
    proc = subprocess.Popen(
        [sys.executable, "-m", "curation.cli", "run", str(cfg)],
        cwd=REPO,
        start_new_session=True,  # its own process group, so workers die with it
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while len(list((out / "ledger").glob("shard-*.json"))) < 3:
        assert proc.poll() is None, "run finished before it could be killed; use more input"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = {f"{p.stem}.parquet" for p in (out / "ledger").glob("shard-?????.json")}
    # A manifest without its ledger entry (killed between the two) is not trusted: it is rewritten.
    done_before = {k: v for k, v in file_ids(out).items() if k in committed}
    assert 3 <= len(done_before) < 25

    assert main(["run", str(cfg)]) == 0
    after = file_ids(out)
    assert len(after) == 25
    assert {k: after[k] for k in done_before} == done_before  # finished shards not rewritten
    t = manifest(out)
    src = pq.read_table(laion_10k())
    want = collections.Counter(
        make_uid(u, c) for u, c in zip(src.column("URL").to_pylist(), src.column("TEXT").to_pylist())
    )
    assert collections.Counter(t.column("uid").to_pylist()) == want
    assert not [p for p in (out / "manifests" / ".tmp").rglob("*") if not p.is_dir()]


def _session(sid: int) -> dict[int, str]:
    """Live processes (not zombies) of session `sid`: pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            # after the command name in parentheses: state ppid pgrp session ...
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            found[int(entry)] = cmdline
    return found


def test_kill_9_of_the_driver_ends_its_workers_and_the_resource_tracker(tmp_path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", LAION_1K, out, rows_per_shard=40, workers=2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "curation.cli", "run", str(cfg)],
        cwd=REPO,
        start_new_session=True,  # a session of its own: how this test finds every process it starts
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while len(list((out / "ledger").glob("shard-*.json"))) < 2:
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
        children = {pid: cmd for pid, cmd in _session(proc.pid).items() if pid != proc.pid}
        assert sum("spawn_main" in cmd for cmd in children.values()) == 2, children
        assert any("resource_tracker" in cmd for cmd in children.values()), children
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: nobody tells the workers
        proc.wait()
        dead_at = time.time()
        deadline = dead_at + 30
        while _session(proc.pid):
            assert time.time() < deadline, f"left running after the driver died: {_session(proc.pid)}"
            time.sleep(0.05)
    finally:
        for pid in _session(proc.pid):  # never leave strays behind, even when the test fails
            os.kill(pid, signal.SIGKILL)
    written = [*(out / "manifests").glob("shard-*.parquet"), *(out / "ledger").glob("shard-*.json")]
    # a rename in flight at the instant of the kill may land; nothing may be written afterwards
    assert all(p.stat().st_ctime < dead_at + 0.5 for p in written)
    done = len(list((out / "ledger").glob("shard-*.json")))
    assert 2 <= done < 25

    assert main(["run", str(cfg)]) == 0
    t = manifest(out)
    src = pq.read_table(LAION_1K)
    want = collections.Counter(
        make_uid(u, c) for u, c in zip(src.column("URL").to_pylist(), src.column("TEXT").to_pylist())
    )
    assert collections.Counter(t.column("uid").to_pylist()) == want


def _corrupt_data_pages(path) -> None:
    """Damage column data but keep the footer, so validation passes and reading fails."""
    raw = bytearray(path.read_bytes())
    for i in range(200, len(raw) // 2):
        raw[i] = 0xFF
    path.write_bytes(bytes(raw))


def test_a_failed_shard_is_recorded_others_finish_and_rerun_retries_it(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    src = pq.read_table(LAION_1K, columns=["URL", "TEXT"])
    pq.write_table(src.slice(0, 500), data / "a.parquet")
    pq.write_table(src.slice(500, 500), data / "b.parquet", compression="none")
    good_b = (data / "b.parquet").read_bytes()
    _corrupt_data_pages(data / "b.parquet")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", f"{data}/*.parquet", out, rows_per_shard=250)

    assert main(["run", str(cfg)]) == 1
    captured = capsys.readouterr()
    assert "2 failed" in captured.out and "shard 2 failed" in captured.err
    assert main(["status", str(out)]) == 1
    st = capsys.readouterr().out
    assert "2/4 done, 2 failed" in st
    assert manifest(out).num_rows == 500

    (data / "b.parquet").write_bytes(good_b)
    a_files = file_ids(out)
    assert main(["run", str(cfg)]) == 0
    assert manifest(out).num_rows == 1000
    assert {k: file_ids(out)[k] for k in a_files} == a_files
    assert not list((out / "ledger").glob("*.failed.json"))


def test_limit_and_query_stats_status(tmp_path, capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", LAION_1K, out, rows_per_shard=100)
    assert main(["run", str(cfg), "--limit", "250"]) == 0
    capsys.readouterr()
    assert main(["query", str(out), "SELECT count(*) AS n, count(DISTINCT shard) AS s FROM samples"]) == 0
    text = capsys.readouterr().out
    assert "250" in text and " 3" in text

    assert main(["query", str(out), "SELECT drop_reason, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1",
                 "--format", "json"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sum(r["n"] for r in rows) == 250

    assert main(["query", str(out), "SELECT uid, caption FROM samples WHERE keep", "--format", "csv"]) == 0
    csv_lines = capsys.readouterr().out.splitlines()
    assert csv_lines[0] == "uid,caption"

    target = tmp_path / "kept.parquet"
    assert main(["query", str(out), "SELECT * FROM samples WHERE keep", "--out", str(target)]) == 0
    capsys.readouterr()
    kept = pq.read_table(target).num_rows
    assert kept == len(csv_lines) - 1  # bundled captions hold no newlines

    assert main(["stats", str(out), "--format", "json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["rows"] == 250 and st["kept"] == kept
    f0, f1 = st["filters"]
    assert f0["stage"] == "caption_complexity" and f0["reached"] == 250
    assert f1["reached"] == 250 - f0["dropped"]
    assert sum(n for _, n in st["histograms"]["caption_complexity"]["buckets"]) == 250

    assert main(["stats", str(out)]) == 0
    assert "pass rate" in capsys.readouterr().out
    assert main(["status", str(out)]) == 0
    assert "3/3 done" in capsys.readouterr().out

    assert main(["query", str(out), "SELECT nope FROM samples"]) == 2
    assert "query failed" in capsys.readouterr().err
    assert main(["stats", str(tmp_path / "nowhere")]) == 2


def test_queries_work_while_a_run_is_in_progress(tmp_path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", laion_10k(), out, rows_per_shard=500)
    proc = subprocess.Popen(
        [sys.executable, "-m", "curation.cli", "run", str(cfg)], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not list((out / "ledger").glob("shard-*.json")):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        cmd = [sys.executable, "-m", "curation.cli"]
        st = subprocess.run([*cmd, "status", str(out)], capture_output=True, text=True, cwd=REPO)
        q = subprocess.run([*cmd, "query", str(out), "SELECT count(*) FROM samples"], capture_output=True,
                           text=True, cwd=REPO)  # fmt: skip
        second = subprocess.run([*cmd, "run", str(cfg)], capture_output=True, text=True, cwd=REPO)
    finally:
        proc.wait(timeout=120)
    assert "a run is in progress" in st.stdout or proc.returncode == 0
    assert q.returncode == 0
    assert second.returncode == 2 and "another `curate run`" in second.stderr


def test_fsspec_url_glob_input(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    src = pq.read_table(LAION_1K, columns=["URL", "TEXT"])
    pq.write_table(src.slice(0, 120), data / "part-0.parquet")
    pq.write_table(src.slice(120, 80), data / "part-1.parquet")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", f"file://{data}/part-*.parquet", out, rows_per_shard=100)
    assert main(["run", str(cfg)]) == 0
    t = manifest(out)
    assert t.num_rows == 200
    assert sorted(set(t.column("shard").to_pylist())) == [0, 1, 2]  # shards never span files
