"""`curate compact`: a run's manifests rewritten as a few large files; every command sees the same rows
before and after, on local disk and S3; kill -9 at any moment then again loses and duplicates nothing;
a run resumed after a compaction is folded in by the next; a reader that started before keeps reading."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main
from curation.query import NoManifests, connect
from curation.rundir import RunDir, data_files
from tests.helpers import LAION_1K, REPO, write_config

STAGES = "  - caption_length: {min_words: 4}\n"
QUESTIONS = [
    "SELECT uid, keep, drop_reason, shard, caption FROM samples ORDER BY uid, shard",
    "SELECT drop_reason, count(*) AS n FROM samples GROUP BY ALL ORDER BY ALL",
    "SELECT count(*), count(DISTINCT uid), sum(caption_words) FROM samples WHERE keep",
]


def make_run(tmp: Path, output: str | Path, rows: int = 300, per_shard: int = 20, limit: int | None = None):
    data = tmp / "in.parquet"
    if not data.exists():
        pq.write_table(pq.read_table(LAION_1K).slice(0, rows), data)
    cfg = write_config(tmp / "c.yaml", data, output, rows_per_shard=per_shard, stages=STAGES)
    argv = ["run", str(cfg)] + (["--limit", str(limit)] if limit else [])
    assert main(argv) in (0, 1)
    return cfg


def answers(output: str | Path) -> list[list[tuple]]:
    con = connect(output)
    return [con.execute(q).fetchall() for q in QUESTIONS]


def curate(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "curation.cli", *argv], cwd=REPO, capture_output=True, text=True, **kw
    )


def command_outputs(output: str, tmp: Path, tag: str, capsys) -> dict:
    """What status, stats, select --uids-only and report say about the run."""
    out = {}
    for name, argv in {
        "status": ["status", output, "--format", "json"],
        "stats": ["stats", output, "--format", "json"],
    }.items():
        capsys.readouterr()
        assert main(argv) == 0, name
        out[name] = json.loads(capsys.readouterr().out)
    out["status"].pop("output")
    uids = tmp / f"uids-{tag}.parquet"
    assert main(["select", output, "--where", "keep", "--uids-only", "--out", str(uids)]) == 0
    out["select"] = pq.read_table(uids).column("uid").to_pylist()
    report = tmp / f"report-{tag}.html"
    assert main(["report", output, "--out", str(report), "--sample", "4"]) == 0
    out["report"] = capsys.readouterr().out.splitlines()[-1].split("): ")[-1]  # rows, charts, samples
    return out


def test_compact_keeps_every_answer_and_a_resumed_run_is_folded_in_next_time(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = make_run(tmp_path, out, limit=200)  # 10 shards of 300 rows' 15: resumed below
    before = answers(out)
    commands = command_outputs(str(out), tmp_path, "before", capsys)
    assert main(["compact", str(out), "--row-group-rows", "64"]) == 0
    said = capsys.readouterr().out
    assert "compacted 10 shard(s), 200 rows, into 1 file(s); 10 file(s) retired" in said
    files = data_files(RunDir(out))
    assert files.singles == [] and len(files.parts) == 1
    part = out / "manifests" / "compacted" / files.parts[0]["name"]
    meta = pq.ParquetFile(part).metadata
    assert meta.num_rows == 200 and [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [
        64,
        64,
        64,
        8,
    ]
    assert answers(out) == before
    assert command_outputs(str(out), tmp_path, "after", capsys) == commands
    # retired, not yet removed: a command that listed them before may still read them
    assert len(list((out / "manifests").glob("shard-*.parquet"))) == 10

    # resume beyond the limit: 5 new shards, read from their own manifests, then folded in
    assert main(["run", str(cfg)]) == 0
    grown = answers(out)
    assert len(grown[0]) == 300 and set(before[0]) < set(grown[0])
    assert len(data_files(RunDir(out)).singles) == 5
    assert main(["compact", str(out), "--retain", "0"]) == 0
    said = capsys.readouterr().out
    assert "compacted 15 shard(s), 300 rows" in said  # the small part is folded in with the new shards
    assert "removed 16 retired file(s)" in said
    assert answers(out) == grown
    files = data_files(RunDir(out))
    assert files.singles == [] and len(files.parts) == 1 and sorted(files.covered) == list(range(15))
    assert not list((out / "manifests").glob("shard-*.parquet"))
    assert main(["status", str(out)]) == 0 and "15/15 done" in capsys.readouterr().out
    assert main(["run", str(cfg)]) == 0  # nothing redone
    assert "0 shard(s) written, 15 already done" in capsys.readouterr().out
    assert main(["compact", str(out)]) == 0
    assert "nothing to compact" in capsys.readouterr().out
    assert answers(out) == grown


def test_kill_9_at_any_moment_of_a_compaction_then_again_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "run"
    make_run(tmp_path, out, rows=400, per_shard=5)  # 80 shards, one small part each: a long compaction
    before = answers(out)
    compacted = out / "manifests" / "compacted"
    points = [
        ("a part staged", lambda: any((compacted / ".tmp").glob(".part-*"))),
        ("a part committed", lambda: any(compacted.glob("part-*"))),
        ("the index written", lambda: (compacted / "index.json").exists()),
    ]
    killed_at = []
    for what, reached in points:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "curation.cli",
                "compact",
                str(out),
                "--part-mb",
                "1",
                "--row-group-rows",
                "7",
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while proc.poll() is None and not reached() and time.monotonic() < deadline:
            time.sleep(0.001)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed_at.append(what)
        proc.wait()
        assert answers(out) == before, what  # readers see the same rows after the kill
    assert killed_at, "no kill landed mid-compaction"
    done = curate("compact", str(out), "--retain", "0")
    assert done.returncode == 0, done.stderr
    assert answers(out) == before
    files = data_files(RunDir(out))
    assert files.singles == [] and sorted(files.covered) == list(range(80))
    names = {p["name"] for p in files.parts}
    assert {p.name for p in compacted.glob("part-*")} == names  # orphans of the killed ones removed
    assert not list(out.glob("manifests/shard-*.parquet"))


def test_a_reader_that_started_before_a_compaction_reads_the_same_rows(tmp_path):
    out = tmp_path / "run"
    make_run(tmp_path, out, rows=100, per_shard=10)
    con = connect(out)  # lists the shard manifests
    before = [con.execute(q).fetchall() for q in QUESTIONS]
    assert main(["compact", str(out)]) == 0
    assert [con.execute(q).fetchall() for q in QUESTIONS] == before  # retired files are still there
    assert answers(out) == before
    # a reader running while compactions commit and remove files
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom curation.query import connect\n"
            "for _ in range(30):\n"
            f"    n = connect({str(out)!r}).execute('SELECT count(*), count(DISTINCT uid) FROM samples').fetchall()\n"
            "    print(n, flush=True)\n",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(3):
        assert main(["compact", str(out), "--retain", "5"]) == 0
    stdout, stderr = reader.communicate(timeout=120)
    assert reader.returncode == 0, stderr
    assert set(stdout.splitlines()) == {str([(100, len({r[0] for r in before[0]}))])}


def test_compact_refuses_what_is_not_a_run_in_one_line(tmp_path, capsys):
    assert main(["compact", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no run.json" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["compact", str(tmp_path), "--retain", "-1"])
    assert "--retain: must be >= 0" in capsys.readouterr().err


def test_compacted_s3_run_answers_as_the_local_one_and_hostile_sql_is_refused(tmp_path, s3, bucket, capsys):
    url = f"s3://{bucket}/run"
    make_run(tmp_path, url, rows=200, per_shard=20)
    local = tmp_path / "local"
    make_run(tmp_path, local, rows=200, per_shard=20)
    want = answers(local)
    assert answers(url) == want
    assert main(["compact", url, "--row-group-rows", "50"]) == 0
    assert "compacted 10 shard(s), 200 rows, into 1 file(s)" in capsys.readouterr().out
    assert answers(url) == want
    assert main(["compact", str(local)]) == 0
    assert answers(local) == want
    for sql in (
        "SELECT * FROM read_parquet('/etc/passwd')",
        f"SELECT * FROM read_parquet('s3://{bucket}/run/manifests/compacted/*.parquet')",
        f"SELECT * FROM read_text('s3://{bucket}/run/run.json')",
        "SELECT * FROM glob('.tmp/*')",
        "COPY samples TO '/tmp/x.csv'",
        "INSTALL httpfs",
    ):
        capsys.readouterr()
        assert main(["query", url, sql]) == 2, sql
        err = capsys.readouterr().err
        assert err.startswith("curate: error: query ") and err.count("\n") == 1, err
    assert main(["compact", url, "--retain", "0"]) == 0
    keys = s3.keys(bucket, "run/manifests/")
    assert not [k for k in keys if k.rsplit("/", 1)[-1].startswith("shard-")]
    assert answers(url) == want


def hostile_cases(tmp: Path, manifest: str) -> dict[str, str]:
    """tests/test_query_hostile.py's statements, aimed at this run's files."""
    other = tmp / "elsewhere.parquet"
    pq.write_table(pa.table({"secret": [1]}), other)
    return {
        f"COPY samples TO '{tmp}/x.csv'": "query refused: COPY is refused",
        f"COPY (SELECT * FROM samples) TO '{manifest}' (USE_TMP_FILE false)": "query refused: COPY is refused",
        f"ATTACH '{tmp}/y.db'": "query refused: ATTACH statements are refused",
        f"EXPORT DATABASE '{tmp}/exp'": "query refused: EXPORT statements are refused",
        "INSTALL httpfs": "statements are refused",
        "LOAD httpfs": "query refused: LOAD statements are refused",
        "SET enable_external_access = true": "query refused: SET statements are refused",
        "PRAGMA enable_profiling": "query refused: PRAGMA statements are refused",
        "CREATE TABLE t AS SELECT 1": "query refused: CREATE statements are refused",
        f"SELECT 1; COPY samples TO '{tmp}/z.csv'": "query refused: one statement at a time (got 2)",
        "SELECT * FROM read_csv('/etc/passwd')": "Permission Error",
        "SELECT * FROM read_text('/etc/passwd')": "Permission Error",
        "SELECT * FROM read_blob('/proc/self/environ')": "Permission Error",
        "SELECT * FROM glob('/etc/*')": "Permission Error",
        f"SELECT * FROM read_parquet('{other}')": "Permission Error",
        f"SELECT * FROM '{other}'": "Permission Error",
        "SELECT * FROM glob('.tmp/*')": "Permission Error",
    }


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_hostile_statements_are_refused_on_compacted_runs(where, tmp_path, request, capsys):
    if where == "s3":
        s3, bucket = request.getfixturevalue("s3"), request.getfixturevalue("bucket")
        output = f"s3://{bucket}/run"
    else:
        output = str(tmp_path / "run")
    make_run(tmp_path, output, rows=60, per_shard=20)
    assert main(["compact", output, "--retain", "0"]) == 0
    [part] = data_files(RunDir(output)).parts
    manifest = f"{output}/manifests/compacted/{part['name']}"
    before = answers(output)
    for sql, message in hostile_cases(tmp_path, manifest).items():
        capsys.readouterr()
        assert main(["query", output, sql]) == 2, sql
        err = capsys.readouterr().err
        assert err.startswith("curate: error: query ") and message in err, (sql, err)
        assert err.count("\n") == 1, err
    assert answers(output) == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("in.", "c."))) == [
        "elsewhere.parquet",
        *(["run"] if where == "local" else []),
    ]
    if where == "s3":
        assert all(
            "run/manifests/compacted/" in k or not k.startswith("run/manifests/") for k in s3.keys(bucket)
        )


def test_compacting_a_run_while_it_runs_loses_and_duplicates_nothing(tmp_path, capsys):
    """`curate compact` beside a live `curate run` (no lock between them): each compaction folds the
    shards done so far; the run goes on; in the end every row is there once."""
    out = tmp_path / "run"
    data = tmp_path / "in.parquet"
    pq.write_table(pq.read_table(LAION_1K).slice(0, 400), data)
    cfg = write_config(tmp_path / "c.yaml", data, out, rows_per_shard=5, stages=STAGES)
    run = subprocess.Popen(
        [sys.executable, "-m", "curation.cli", "run", str(cfg)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    compactions = 0
    while run.poll() is None:
        if (out / "run.json").exists():
            assert main(["compact", str(out), "--retain", "0"]) == 0
            compactions += 1
            try:
                uids = [r[0] for r in answers(out)[0]]
            except NoManifests:  # no shard finished yet
                continue
            assert len(uids) == len(set(uids))  # never a row twice, mid-run (the input has no repeats)
        time.sleep(0.2)
    assert run.returncode == 0, run.stderr
    assert compactions >= 2
    assert main(["compact", str(out), "--retain", "0"]) == 0
    reference = tmp_path / "reference"
    make_run(tmp_path, reference, rows=400, per_shard=5)
    assert answers(out) == answers(reference)
    assert len(answers(out)[0]) == 400


def test_an_index_from_a_stranger_cannot_name_files_outside_the_run(tmp_path, capsys):
    """manifests/compacted/index.json is untrusted input: a part `../../secret.parquet` or a retired
    `../run.json` would make every reader read, and compact delete, files outside manifests/."""
    out = tmp_path / "run"
    make_run(tmp_path, out, rows=40, per_shard=20)
    secret = tmp_path / "secret.parquet"
    pq.write_table(pa.table({"uid": ["stolen"]}), secret)
    assert main(["compact", str(out)]) == 0
    index_path = out / "manifests" / "compacted" / "index.json"
    good = json.loads(index_path.read_text())
    part = good["parts"][0]
    bad_indexes = {
        "part": {**good, "parts": [{**part, "name": "../../../secret.parquet"}]},
        "retired": {**good, "retired": [{"name": "../run.json", "since": 0}]},
        "shards": {**good, "parts": [{**part, "shards": [["0", 20]]}]},
        "shape": [1, 2],
    }
    for what, bad in bad_indexes.items():
        index_path.write_text(json.dumps(bad))
        for argv in (
            ["query", str(out), "SELECT count(*) FROM samples"],
            ["compact", str(out), "--retain", "0"],
        ):
            capsys.readouterr()
            assert main(argv) == 2, (what, argv)
            err = capsys.readouterr().err
            assert "index.json: " in err and err.count("\n") == 1, (what, err)
    assert (out / "run.json").exists() and secret.exists()
    index_path.write_text(json.dumps(good))
    assert len(answers(out)[0]) == 40
