"""A run directory, its ledger and run.json are untrusted input (issue 28): a lying or damaged ledger is
checked, named in one line and repaired by redoing shards; nothing is lost, mixed or widened.
Local disk, memory:// and a real S3 server (moto's, on 127.0.0.1)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from curation.cli import main
from curation.manifest import RunDir, shard_name
from tests.test_ledger import SHARDS, committed_uids, output, tiny_run  # noqa: F401 (fixture)


def status(capsys, out: str) -> dict:
    capsys.readouterr()
    main(["status", out, "--format", "json"])
    return json.loads(capsys.readouterr().out)


def query_count(capsys, out: str) -> tuple[int, int, str]:
    capsys.readouterr()
    code = main(
        ["query", out, "SELECT count(*) AS n, count(DISTINCT uid) AS u FROM samples", "--format", "json"]
    )
    got = capsys.readouterr()
    if code != 0:
        return code, -1, got.err
    rows = [json.loads(line) for line in got.out.splitlines() if line.strip()]
    row = rows[0][0] if isinstance(rows[0], list) else rows[0]
    return row["n"], row["u"], got.err


def test_a_lying_ledger_is_checked_named_and_repaired_by_redoing_shards(tmp_path, output, capsys):  # noqa: F811
    cfg = tiny_run(tmp_path, output)
    assert main(["run", str(cfg)]) == 0
    run = RunDir(output)
    # A lost manifest (or a hand-made "redo" done halfway); a part naming shards outside the plan; a part
    # claiming 1000x the rows of a shard.
    run.manifest_store.remove(f"{shard_name(3)}.parquet")
    entry5 = run.committed(5)
    run.write_folded_part(
        [{**entry5, "rows": 1000, "kept": 1000}]
        + [{"shard": i, "rows": 7, "kept": 7, "drop_reasons": {}, "seconds": 0} for i in range(100, 150)]
    )

    st = status(capsys, output)
    assert st["shards_total"] == SHARDS and st["shards_done"] <= SHARDS, st  # never "150/12"
    assert st["rows_done"] <= SHARDS and "5" in st["not_trusted"], st
    assert any("outside the plan" in line for line in st["ignored"])

    n, uids, err = query_count(capsys, output)
    assert (n, uids) == (SHARDS - 2, SHARDS - 2), err  # readers skip what is missing, and say so
    assert f"{shard_name(3)}.parquet is missing" in err and "says 1,000 rows" in err

    capsys.readouterr()
    assert main(["run", str(cfg)]) == 0
    got = capsys.readouterr()
    assert "2 shard(s) written" in got.out, got
    assert "redoing the shard" in got.err and f"{shard_name(3)}.parquet is missing" in got.err
    st = status(capsys, output)
    assert (st["shards_done"], st["rows_done"], st["not_trusted"]) == (SHARDS, SHARDS, {}), st
    n, uids, err = query_count(capsys, output)
    assert (n, uids, err) == (SHARDS, SHARDS, "")
    uids = committed_uids(RunDir(output))
    assert len(uids) == SHARDS == len(set(uids))


def test_a_replaced_manifest_is_redone_not_read(tmp_path, output, capsys):  # noqa: F811
    cfg = tiny_run(tmp_path, output)
    assert main(["run", str(cfg)]) == 0
    run = RunDir(output)
    run.manifest_store.put_bytes(f"{shard_name(2)}.parquet", b"<html>a report</html>")
    n, _, err = query_count(capsys, output)
    assert n == SHARDS - 1 and "replaced or truncated" in err, err
    assert main(["run", str(cfg)]) == 0
    assert query_count(capsys, output)[:2] == (SHARDS, SHARDS)


def test_run_json_deleted_then_a_changed_config_is_refused_the_same_one_adopted(tmp_path, output, capsys):  # noqa: F811
    cfg = tiny_run(tmp_path, output)
    assert main(["run", str(cfg)]) == 0
    run = RunDir(output)
    run.store.remove("run.json")
    changed = tmp_path / "changed.yaml"
    changed.write_text(cfg.read_text().replace("caption_length: {}", "caption_length: {min_words: 5}"))
    capsys.readouterr()
    assert main(["run", str(changed)]) == 2
    err = capsys.readouterr().err
    assert "no run.json" in err and "different config" in err and len(err.strip().splitlines()) == 1, err
    assert not RunDir(output).exists(), "nothing adopted"

    assert main(["run", str(cfg)]) == 0  # the same config: every entry says so, so they are adopted
    assert f"{SHARDS} already done" in capsys.readouterr().out
    # Entries that do not say which config made them (an older version, another tool): refused.
    run = RunDir(output)
    for i in range(SHARDS):
        entry = run.committed(i)
        entry.pop("config")
        run.ledger_store.put_json(f"{shard_name(i)}.json", entry)
    run.remove_folded_parts(run.folded_store.list(""))
    run.store.remove("run.json")
    assert main(["run", str(cfg)]) == 2
    assert "unknown config" in capsys.readouterr().err


BAD_ENTRIES = {
    1: b"null",
    2: b'{"shard": "2", "rows": 1, "kept": 1}',
    4: b'{"shard": 4, "kept": 1}',
    6: b'{"shard": 6, "rows": 1, "ke',
    7: b'{"shard": 8, "rows": 1, "kept": 1}',  # another shard's entry under this name
}


def test_damaged_ledger_parts_entries_and_run_json_are_one_line_and_repaired(tmp_path, output, capsys):  # noqa: F811
    cfg = tiny_run(tmp_path, output)
    assert main(["run", str(cfg)]) == 0
    run = RunDir(output)
    for i, data in BAD_ENTRIES.items():
        run.ledger_store.put_bytes(f"{shard_name(i)}.json", data)
    run.folded_store.put_bytes(
        "00000000000000000001-bad.jsonl", b'{"shard": 0, "rows": 1, "kept": 1}\nnull\n'
    )
    run.folded_store.put_bytes("00000000000000000002-bin.jsonl", b"\xff\xfe\x00garbage")

    st = status(capsys, output)
    assert st["shards_done"] == SHARDS - len(BAD_ENTRIES), st
    assert sorted(int(k) for k in st["not_trusted"]) == sorted(BAD_ENTRIES)
    assert sum("is damaged" in line for line in st["ignored"]) == 2, st["ignored"]
    assert query_count(capsys, output)[0] == SHARDS - len(BAD_ENTRIES)

    capsys.readouterr()
    assert main(["run", str(cfg)]) == 0
    assert f"{len(BAD_ENTRIES)} shard(s) written" in capsys.readouterr().out
    run = RunDir(output)
    state = run.ledger_state()
    assert sorted(state.done) == list(range(SHARDS)) and not state.broken and not state.bad_parts
    assert len(state.parts) == 1, "the damaged parts were rewritten from the good entries"
    uids = committed_uids(run)
    assert len(uids) == SHARDS == len(set(uids))

    # A truncated (or edited) run.json: one line naming it, from every command.
    record = run.store.get_bytes("run.json")
    for damaged in (record[: len(record) // 2], b"[]", record.replace(b'"index": 3', b'"index": 2')):
        run.store.put_bytes("run.json", damaged)
        for argv in (
            ["status", output],
            ["query", output, "SELECT 1"],
            ["run", str(cfg)],
            ["report", output, "--out", str(tmp_path / "r.html")],
        ):
            capsys.readouterr()
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith("curate: error: ") and "run.json is damaged" in err, (argv, err)
            # one line (`run` puts it under the config's "1 problem(s):" header, as every config problem)
            assert len(err.strip().splitlines()) == (2 if argv[0] == "run" else 1) and "Traceback" not in err


@pytest.mark.parametrize("kind", ["local"])
def test_status_of_a_plan_listing_a_shard_twice_is_one_line(tmp_path, kind, capsys):
    out = tmp_path / "out"
    cfg = tiny_run(tmp_path, str(out))
    assert main(["run", str(cfg)]) == 0
    record = json.loads((out / "run.json").read_text())
    record["shards"].append(record["shards"][0])
    Path(out / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["status", str(out)]) == 2
    assert "lists shard 0 twice" in capsys.readouterr().err


def test_report_query_and_select_never_write_inside_the_run(tmp_path, output, capsys):  # noqa: F811
    cfg = tiny_run(tmp_path, output)
    assert main(["run", str(cfg)]) == 0
    run = RunDir(output)
    before = {n: run.manifest_store.get_bytes(n) for n in run.committed_manifests()}
    record = run.store.get_bytes("run.json")
    inside = [run.manifest_path(3), run.record_path, run.ledger_store.url_of(f"{shard_name(0)}.json")]
    for out in inside:
        for argv in (
            ["report", output, "--out", out, "--force"],
            [
                "select",
                output,
                "--where",
                "true",
                "--uids-only",
                "--out",
                out.replace(".json", ".parquet"),
                "--force",
            ],
        ):
            capsys.readouterr()
            assert main(argv) == 2, argv
            assert "is inside the run directory" in capsys.readouterr().err
    if run.local:
        capsys.readouterr()
        assert main(["query", output, "SELECT 1", "--out", str(Path(output) / "x.csv")]) == 2
        assert "is inside the run directory" in capsys.readouterr().err
    assert {n: run.manifest_store.get_bytes(n) for n in run.committed_manifests()} == before
    assert run.store.get_bytes("run.json") == record
    assert query_count(capsys, output)[:2] == (SHARDS, SHARDS)


def test_a_where_comment_cannot_escape_the_balancing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(tiny_run(tmp_path, str(out)))]) == 0
    entries = tmp_path / "entries.txt"
    entries.write_text("caption\n")
    balance = ["--balance", str(entries), "--balance-t", "1", "--uids-only"]
    capsys.readouterr()
    assert main(["select", str(out), "--where", "true", *balance, "--out", str(tmp_path / "ok.parquet")]) == 0
    got = capsys.readouterr().out
    kept = int(re.search(r"(\d+) of 12 rows kept", got).group(1))
    assert 0 < kept < SHARDS and f"wrote {kept} uids" in got, got
    escaped = tmp_path / "escaped.parquet"
    assert main(["select", str(out), "--where", "true) --", *balance, "--out", str(escaped)]) == 2
    assert "--where 'true) --'" in capsys.readouterr().err and not escaped.exists()
