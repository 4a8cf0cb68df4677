"""`curate query` within bounds: DuckDB spills to a private folder no statement can read (never the
current directory's `.tmp`), memory, threads and a statement timeout set before the configuration is
locked and overridable by flags; on S3 only the byte ranges a question needs are fetched, once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation import query
from curation.cli import main
from curation.rundir import RunDir, data_files
from tests.helpers import REPO
from tests.test_compact import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("limits")
    make_run(tmp, tmp / "run", rows=100, per_shard=50)
    return tmp / "run"


def curate(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "curation.cli", *argv], cwd=cwd, capture_output=True, text=True, env=env
    )


def test_the_current_directorys_tmp_folder_is_not_readable(run, tmp_path):
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.txt").write_text("hunter2")
    for sql in (
        "SELECT * FROM glob('.tmp/*')",
        "SELECT content FROM read_text('.tmp/secret.txt')",
        f"SELECT content FROM read_text('{tmp_path}/.tmp/secret.txt')",
    ):
        proc = curate("query", str(run), sql, cwd=tmp_path)
        assert proc.returncode == 2, (sql, proc.stdout)
        assert "Permission Error" in proc.stderr and "hunter2" not in proc.stdout + proc.stderr
        assert proc.stderr.count("\n") == 1
    # DuckDB's own spill folder: fresh, private, empty of anything but DuckDB's files
    proc = curate(
        "query", str(run), "SELECT current_setting('temp_directory') AS t", "--format", "json", cwd=tmp_path
    )
    spill = json.loads(proc.stdout)["t"]
    assert Path(spill).name.startswith("curate-duckdb-") and not Path(spill).is_relative_to(tmp_path)
    con = query.connect(run)
    [(spill,)] = con.execute("SELECT current_setting('temp_directory')").fetchall()
    assert con.execute(f"SELECT * FROM glob('{spill}/*')").fetchall() == []


def test_memory_threads_and_timeout_flags(run, capsys):
    sql = "SELECT current_setting('memory_limit') AS m, current_setting('threads') AS t"
    assert main(["query", str(run), sql, "--format", "json"]) == 0
    default_threads = query.duckdb.connect().execute("SELECT current_setting('threads')").fetchall()[0][0]
    assert json.loads(capsys.readouterr().out) == {"m": "3.7 GiB", "t": default_threads}
    # the commands without the flag (select, report): 3.5 GB, so the whole process stays within 4 GB
    [(limit,)] = query.connect(run).execute("SELECT current_setting('memory_limit')").fetchall()
    assert limit == "3.2 GiB"
    assert (
        main(["query", str(run), sql, "--format", "json", "--memory-limit", "256MB", "--threads", "1"]) == 0
    )
    assert json.loads(capsys.readouterr().out) == {"m": "244.1 MiB", "t": 1}
    # a statement past its time is stopped, in one line
    slow = "SELECT count(*) FROM range(100000000000) t(a) WHERE a % 7 = 3"
    assert main(["query", str(run), slow, "--timeout", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err == "curate: error: query stopped after 0.5 s (raise --timeout, or 0 for no limit)\n"
    # a memory limit a query needs more than: DuckDB's own error, one line
    big = "SELECT list(range) FROM range(50000000)"
    assert main(["query", str(run), big, "--memory-limit", "20MB", "--format", "json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curate: error: query failed: Out of Memory Error") and err.count("\n") == 1
    for argv, message in (
        (["--memory-limit", "lots"], "--memory-limit: 'lots' is not a size such as 4GB, 512MB or 50%"),
        (["--timeout", "-1"], "--timeout must be a number of seconds >= 0"),
    ):
        assert main(["query", str(run), "SELECT 1", *argv]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["query", str(run), "SELECT 1", "--threads", "0"])
    assert "--threads: must be >= 1" in capsys.readouterr().err


def _column_bytes(path: Path, column: str) -> int:
    meta = pq.ParquetFile(path).metadata
    i = meta.schema.names.index(column)
    return sum(meta.row_group(g).column(i).total_compressed_size for g in range(meta.num_row_groups))


def test_s3_query_fetches_only_the_columns_it_reads_and_never_twice(tmp_path, s3, bucket, monkeypatch):
    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / "cache"))
    url = f"s3://{bucket}/run"
    make_run(tmp_path, url, rows=1000, per_shard=100)
    assert main(["compact", url, "--retain", "0", "--row-group-rows", "100"]) == 0
    [part] = data_files(RunDir(url)).parts
    local = tmp_path / "part.parquet"
    s3.client().download_file(bucket, f"run/manifests/compacted/{part['name']}", str(local))
    size = local.stat().st_size

    con = query.connect(url)
    cache = query._caches[-1]
    assert con.execute("SELECT count(DISTINCT caption) FROM samples").fetchall()
    caption = _column_bytes(local, "caption")
    footer = min(size, 64 << 10)  # Arrow reads the footer in one 64 KiB read from the end
    assert caption + footer > cache.fetched >= caption, (cache.fetched, caption, size)
    assert cache.fetched < size  # not the whole file
    first = cache.fetched
    # the same column again, here and in another connection: nothing more is downloaded
    assert con.execute("SELECT max(length(caption)) FROM samples").fetchall()
    assert query.connect(url).execute("SELECT min(caption) FROM samples").fetchall()
    assert sum(c.fetched for c in query._caches if c.folder == cache.folder) == first
    # a second column: its chunks only
    assert con.execute("SELECT sum(caption_words) FROM samples").fetchall()
    assert cache.fetched - first <= 1.5 * _column_bytes(local, "caption_words")
    # `curate report` (fresh cache): the charts read their columns, the sample grid whole rows only
    # from the row groups holding the picked samples, so captions and urls are mostly not fetched
    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / "cache-report"))
    assert main(["report", url, "--out", str(tmp_path / "r.html"), "--sample", "1"]) == 0
    report = query._caches[-1]
    assert report.folder == tmp_path / "cache-report" / "ranges"
    # (reading every column, as before, fetches the whole part; the 64 KiB footer read of this small
    # part holds the last columns' pages, so some caption and url bytes come with it)
    assert report.fetched < 0.85 * size, (report.fetched, size)


def test_balance_streams_in_batches_and_equals_the_whole_table_computation(run):
    """`select --balance` reads uid and caption in batches (flat memory): the same uids as `balance`
    over all the rows at once, whatever the batch size."""
    from curation.balance import BalanceSpec, balance, balance_run, match_entries

    con = query.connect(run)
    rows = con.execute("SELECT uid, caption FROM samples").fetchall()
    spec = BalanceSpec(t=3, metadata=("a", "the", "of", "in", "with"), seed=7)
    entries = match_entries([r[1] for r in rows], spec.metadata)
    want = balance([r[0] for r in rows], entries, spec.t, spec.seed)
    for batch_rows in (1, 7, 1000):
        got = balance_run(con, "true", spec, batch_rows=batch_rows)
        assert sorted(got.kept.to_pylist()) == sorted(want.kept)
        assert (got.rows, got.unmatched, got.entry_counts, got.kept_per_entry) == (
            want.rows,
            want.unmatched,
            want.entry_counts,
            want.kept_per_entry,
        )
    assert 0 < len(want.kept) < len(rows)


def test_datacomp_uids_per_batch_and_a_malformed_one_named():
    import pyarrow as pa

    from curation.select import SelectError, datacomp_uids

    uids = [f"{i:032x}" for i in (5, 1, 2**127 + 3)]
    array = datacomp_uids(pa.array(uids))
    assert array.tolist() == [(0, 1), (0, 5), (2**63, 3)]
    assert (datacomp_uids(uids) == array).all()
    with pytest.raises(SelectError, match="'xyz' is not 32 hex digits"):
        datacomp_uids(pa.array([uids[0], "xyz"]))


def test_a_range_cache_folder_others_may_write_is_not_used(tmp_path):
    from curation.remote import RangeCache

    folder = tmp_path / "world_writable"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    assert not RangeCache(folder).enabled
    folder.chmod(0o700)
    assert RangeCache(folder).enabled
