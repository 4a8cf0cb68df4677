"""`curate query`, `stats`, `status` and `select` on hostile SQL, hostile captions, repeated pairs,
closed pipes and bad numbers: refused with one clear line, printed inertly, nothing written where it
must not be, no row lost or duplicated."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.cli import main
from curation.query import connect
from tests.helpers import REPO, write_config

GOOD = "A man rides a red bicycle down the street."
HOSTILE = "A dog \x1b[31mruns\x1b[0m in the park\x07 with\x00 a ball \u202egpj.exe and\ta tab"
PAIRS = [
    ("http://example.com/a.jpg", GOOD),
    ("http://example.com/a.jpg", GOOD),  # the same pair three times
    ("http://example.com/b.jpg", HOSTILE),
    ("http://example.com/a.jpg", GOOD),
    ("http://example.com/c.jpg", "A woman reads a book in the garden."),
    ("http://example.com/d.jpg", "cat"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("q")
    urls, captions = zip(*PAIRS)
    pq.write_table(pa.table({"URL": list(urls), "TEXT": list(captions)}), tmp / "in.parquet")
    cfg = write_config(tmp / "c.yaml", tmp / "in.parquet", tmp / "out", rows_per_shard=4)
    assert main(["run", str(cfg)]) == 0
    return tmp / "out"


def fingerprint(out: Path) -> dict[str, str]:
    """Every file of a run directory and the hash of its bytes."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def curate(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "curation.cli", *argv], cwd=REPO, capture_output=True, text=True, **kw
    )


# ---------------------------------------------------------------------------- SQL


def test_hostile_statements_are_refused_with_one_line_and_write_nothing(run, tmp_path, capsys):
    before = fingerprint(run)
    other = tmp_path / "elsewhere.parquet"
    pq.write_table(pa.table({"secret": [1]}), other)
    shard0 = run / "manifests" / "shard-00000.parquet"
    cases = {
        f"COPY samples TO '{tmp_path}/x.csv'": "query refused: COPY is refused",
        f"COPY (SELECT * FROM samples) TO '{shard0}' (USE_TMP_FILE false)": "query refused: COPY is refused",
        f"ATTACH '{tmp_path}/y.db'": "query refused: ATTACH statements are refused",
        f"EXPORT DATABASE '{tmp_path}/exp'": "query refused: EXPORT statements are refused",
        "INSTALL httpfs": "statements are refused",
        "LOAD httpfs": "query refused: LOAD statements are refused",
        "SET enable_external_access = true": "query refused: SET statements are refused",
        "PRAGMA enable_profiling": "query refused: PRAGMA statements are refused",
        "CREATE TABLE t AS SELECT 1": "query refused: CREATE statements are refused",
        f"SELECT 1; COPY samples TO '{tmp_path}/z.csv'": "query refused: one statement at a time (got 2)",
        "SELECT * FROM read_csv('/etc/passwd')": "Permission Error",
        "SELECT * FROM read_text('/etc/passwd')": "Permission Error",
        "SELECT * FROM read_blob('/proc/self/environ')": "Permission Error",
        "SELECT * FROM glob('/etc/*')": "Permission Error",
        f"SELECT * FROM read_parquet('{other}')": "Permission Error",
        f"SELECT * FROM '{other}'": "Permission Error",
    }
    for sql, message in cases.items():
        capsys.readouterr()
        assert main(["query", str(run), sql]) == 2, sql
        err = capsys.readouterr().err
        assert err.startswith("curate: error: query ") and message in err, (sql, err)
        assert err.count("\n") == 1, err  # one line, no traceback
        if "Permission" in message:
            assert "reads only this run's finished manifests" in err
    assert fingerprint(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.parquet"]
    assert main(["query", str(run), "SELECT count(*) AS n FROM samples"]) == 0
    assert capsys.readouterr().out.split()[-1] == str(len(PAIRS))
    assert main(["status", str(run)]) == 0


def test_the_connection_itself_reads_only_the_manifests_and_stays_locked(run, tmp_path):
    con = connect(run)
    for sql in (
        "SELECT * FROM read_csv('/etc/passwd')",
        f"COPY (SELECT 1) TO '{tmp_path}/x.csv'",
        f"ATTACH '{tmp_path}/y.db'",
    ):
        with pytest.raises(duckdb.PermissionException):
            con.execute(sql)
    for sql in (
        "SET enable_external_access = true",
        "SET allowed_paths = ['/etc']",
        "RESET lock_configuration",
    ):
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute(sql)
    with pytest.raises(duckdb.Error):
        con.execute("LOAD httpfs")
    assert con.execute("SELECT count(*) FROM samples").fetchall() == [(len(PAIRS),)]
    assert not list(tmp_path.iterdir())


def test_readonly_selects_of_every_kind_still_work(run, capsys):
    for sql in (
        "DESCRIBE samples",
        "SUMMARIZE samples",
        "FROM samples SELECT uid LIMIT 2",
        "WITH k AS (SELECT * FROM samples WHERE keep) SELECT count(*) FROM k",
        "SELECT drop_reason, count(*) FROM samples GROUP BY ALL ORDER BY ALL",
    ):
        assert main(["query", str(run), sql]) == 0, sql
    capsys.readouterr()


# ---------------------------------------------------------------------------- --out


def test_out_writes_parquet_csv_json_outside_the_run_only_and_never_over_a_file(run, tmp_path, capsys):
    sql = "SELECT uid, caption FROM samples ORDER BY uid"
    want = duckdb.sql(f"SELECT uid, caption FROM read_parquet('{run}/manifests/*.parquet') ORDER BY uid")
    want = want.fetchall()
    for name in ("r.parquet", "r.csv", "r.json", "sub/r.jsonl"):
        assert main(["query", str(run), sql, "--out", str(tmp_path / name)]) == 0, name
        assert f"wrote {len(PAIRS)} rows" in capsys.readouterr().out
    assert [tuple(r.values()) for r in pq.read_table(tmp_path / "r.parquet").to_pylist()] == want
    rows = list(csv.reader(io.StringIO((tmp_path / "r.csv").read_text(), newline="")))
    assert rows[0] == ["uid", "caption"] and [tuple(r) for r in rows[1:]] == want  # control chars exact
    for name in ("r.json", "sub/r.jsonl"):
        lines = (tmp_path / name).read_text().splitlines()
        assert [tuple(json.loads(ln).values()) for ln in lines] == want

    before = fingerprint(run)
    (tmp_path / "into-run").symlink_to(run / "manifests")
    refusals = {
        str(tmp_path / "r.csv"): "exists; choose a new file or pass --force",
        str(run / "manifests" / "shard-00009.parquet"): "inside the run directory",
        str(run / "sel.csv"): "inside the run directory",
        str(tmp_path / "into-run" / "shard-00000.parquet"): "inside the run directory",  # via a symlink
        str(tmp_path / "r.txt"): "--out must end in .parquet, .csv, .json, .jsonl",
    }
    for out, message in refusals.items():
        capsys.readouterr()
        assert main(["query", str(run), sql, "--out", out]) == 2, out
        assert message in capsys.readouterr().err, out
    assert main(["query", str(run), sql, "--out", str(tmp_path / "new.csv"), "--format", "json"]) == 2
    assert "contradicts" in capsys.readouterr().err
    assert (
        main(["select", str(run), "--uids-only", "--out", str(run / "manifests" / "shard-00009.parquet")])
        == 2
    )
    assert "inside the run directory" in capsys.readouterr().err
    assert fingerprint(run) == before

    (tmp_path / "r.csv").write_text("mine")
    assert main(["query", str(run), "SELECT 1 AS one", "--out", str(tmp_path / "r.csv"), "--force"]) == 0
    assert (tmp_path / "r.csv").read_bytes() == b"one\r\n1\r\n"
    assert not [p for p in tmp_path.rglob(".*tmp")]


# ---------------------------------------------------------------------------- printing


def test_table_output_escapes_control_characters_csv_and_json_keep_them(run):
    sql = "SELECT caption FROM samples WHERE url LIKE '%b.jpg'"
    table = curate("query", str(run), sql)
    assert table.returncode == 0, table.stderr
    for raw in ("\x1b", "\x07", "\x00", "\u202e", "\t"):
        assert raw not in table.stdout
    assert r"A dog \x1b[31mruns\x1b[0m in the park\x07 with\x00 a ball \u202egpj.exe and\t..." in table.stdout
    as_csv = curate("query", str(run), sql, "--format", "csv")
    assert list(csv.reader(io.StringIO(as_csv.stdout))) == [["caption"], [HOSTILE]]
    as_json = curate("query", str(run), sql, "--format", "json")
    assert json.loads(as_json.stdout) == {"caption": HOSTILE}


@pytest.mark.parametrize(
    "argv",
    [
        ["query", "RUN", "SELECT range AS n FROM range(300000)"],
        ["query", "RUN", "SELECT range AS n FROM range(300000)", "--format", "csv"],
        ["query", "RUN", "SELECT range AS n FROM range(300000)", "--format", "json"],
        ["stats", "RUN"],
        ["stats", "RUN", "--format", "json"],
        ["status", "RUN"],
        ["status", "RUN", "--format", "json"],
        ["validate", "CONFIG"],
    ],
)
def test_a_reader_that_goes_away_ends_the_command_quietly(run, argv):
    """`curate ... | head -1`: the pipe's reader is gone before curate writes; no traceback, exit 141."""
    argv = [str(run) if a == "RUN" else a for a in argv]
    argv = [str(run.parent / "c.yaml") if a == "CONFIG" else a for a in argv]
    proc = subprocess.Popen(
        [sys.executable, "-m", "curation.cli", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader goes away before the first write
    err = proc.stderr.read().decode()
    assert proc.wait() == 141, err
    assert err == ""


def test_head_on_a_real_shell_pipe(run):
    proc = subprocess.run(
        [
            "bash",
            "-c",
            f'{sys.executable} -m curation.cli query {run} "SELECT * FROM range(500000)" | head -1',
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout.split() == ["range"] and proc.stderr == ""


# ---------------------------------------------------------------------------- numbers


def test_numeric_options_are_validated_like_the_config(run, capsys):
    cfg = str(run.parent / "c.yaml")
    cases = [
        (["stats", str(run), "--bins", "0"], "argument --bins: must be >= 1, got 0"),
        (["stats", str(run), "--bins", "-3"], "argument --bins: must be >= 1, got -3"),
        (["stats", str(run), "--bins", "x"], "argument --bins: expected an integer, got 'x'"),
        (["query", str(run), "SELECT 1", "--max-rows", "-1"], "argument --max-rows: must be >= 0, got -1"),
        (["run", cfg, "--limit", "0"], "argument --limit: must be >= 1, got 0"),
        (
            ["select", str(run), "--out", "x", "--shard-size", "0"],
            "argument --shard-size: must be >= 1, got 0",
        ),
        (
            ["select", str(run), "--out", "x", "--max-pixels", "0"],
            "argument --max-pixels: must be >= 1, got 0",
        ),
        (["eval", "--model", "curate-tiny", "--limit", "0"], "argument --limit: must be >= 1, got 0"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage error
            code = e.code
        assert code == 2, argv
        assert message in capsys.readouterr().err, argv
    # --workers 0 is what `runner: {workers: 0}` is: the config's own error, with its key
    assert main(["run", cfg, "--workers", "0"]) == 2
    assert "runner.workers (line 8): must be >= 1, got 0" in capsys.readouterr().err
    assert main(["run", cfg, "--workers", "auto"]) == 0  # and auto works on the CLI too


def test_stats_histograms_with_one_bin(run, capsys):
    assert main(["stats", str(run), "--bins", "1", "--format", "json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == len(PAIRS)


# ---------------------------------------------------------------------------- repeated pairs


def test_repeated_pairs_keep_their_rows_stats_count_them_select_writes_each_uid_once(run, tmp_path, capsys):
    rows = pq.read_table(run / "manifests").to_pylist()
    assert len(rows) == len(PAIRS)  # one manifest row per input row: nothing lost
    a = [r for r in rows if r["url"].endswith("a.jpg")]
    assert len(a) == 3 and len({r["uid"] for r in a}) == 1
    assert main(["stats", str(run), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["repeated_rows"] == 2
    assert main(["stats", str(run)]) == 0
    assert "repeats    2 rows repeat an earlier row's (url, caption) pair" in capsys.readouterr().out
    out = tmp_path / "uids.parquet"
    assert main(["select", str(run), "--where", "true", "--out", str(out), "--uids-only"]) == 0
    uids = pq.read_table(out).column("uid").to_pylist()
    assert uids == sorted(set(uids)) and len(uids) == len(set(PAIRS))


def test_select_shards_hold_each_uid_once(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (16, 16), (7, 8, 9)).save(folder / f"{name}.jpg")
    pairs = [(f"file:{folder}/a.jpg", GOOD)] * 3 + [(f"file:{folder}/b.jpg", GOOD)]
    pq.write_table(
        pa.table({"url": [u for u, _ in pairs], "caption": [c for _, c in pairs]}), tmp_path / "p.parquet"
    )
    (tmp_path / "c.yaml").write_text(
        f"input: {{path: {tmp_path / 'p.parquet'}}}\noutput: {tmp_path / 'out'}\n"
        "runner: {workers: 1, progress: false}\n"
        f"stages:\n  - download: {{allow_local: [{folder}], thread_count: 4}}\n"
    )
    assert main(["run", str(tmp_path / "c.yaml")]) == 0
    manifest = pq.read_table(tmp_path / "out" / "manifests").to_pylist()
    assert len(manifest) == 4 and all(r["status"] == "success" for r in manifest)
    assert main(["select", str(tmp_path / "out"), "--out", str(tmp_path / "sel")]) == 0
    assert json.loads((tmp_path / "sel" / "sizes.json").read_text()) == {"00000.tar": 2}
    import tarfile

    with tarfile.open(tmp_path / "sel" / "00000.tar") as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert sorted(m["uid"] for m in metas) == sorted({r["uid"] for r in manifest})


# ---------------------------------------------------------------------------- validate


def test_validate_says_when_the_output_holds_a_different_run(run, capsys):
    cfg = run.parent / "c.yaml"
    assert main(["validate", str(cfg)]) == 0
    changed = run.parent / "changed.yaml"
    changed.write_text(
        cfg.read_text().replace("caption_complexity: {min: 2}", "caption_complexity: {min: 3}")
    )
    capsys.readouterr()
    assert main(["validate", str(changed)]) == 2
    err = capsys.readouterr().err
    assert "output (line 7):" in err and "holds a run made with a different config" in err
    assert "stages[0].caption_complexity.min: 2 -> 3" in err
    # A limit says how many rows, not what a row's result is: a run can be limited, then extended.
    assert main(["validate", str(cfg), "--limit", "3"]) == 0
    assert os.path.exists(run / "run.json")
