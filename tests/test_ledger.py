"""The folded ledger (curation/rundir.py): parts written while a run goes, merged, read instead of
one object per shard; a kill at any point of a fold leaves a ledger that resumes every row exactly once.
Local disk, memory:// and a real S3 server (moto's, on 127.0.0.1); tests/test_storage_s3.py also
kills a driver there with SIGKILL and resumes."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import rundir
from curation.cli import main
from curation.rundir import LedgerFolder, RunDir, ShardResult, shard_name
from curation.sources.base import Shard
from tests.helpers import write_config

SHARDS = 12


@pytest.fixture(params=["local", "memory", "s3"])
def output(request, tmp_path, monkeypatch) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    if request.param == "memory":
        return f"memory://curate-ledger-{uuid.uuid4().hex}/out"
    server = request.getfixturevalue("s3")
    bucket = f"curate-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=bucket)
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    return f"s3://{bucket}/out"


@pytest.fixture
def small_folds(monkeypatch):
    """Fold every 3 commits and merge beyond 2 parts, so a 12-shard run folds and merges mid-run."""
    monkeypatch.setattr(rundir, "FOLD_EVERY", 3)
    monkeypatch.setattr(rundir, "COMPACT_AT", 2)
    monkeypatch.setattr(rundir, "FOLD_MIN", 0)


def tiny_run(tmp_path: Path, output: str) -> Path:
    """A config over SHARDS one-row shards with distinct captions (the uids are the URLs)."""
    data = tmp_path / "rows.parquet"
    pq.write_table(
        pa.table(
            {
                "URL": [f"https://example.com/{i}.jpg" for i in range(SHARDS)],
                "TEXT": [f"caption {i}" for i in range(SHARDS)],
            }
        ),
        data,
    )
    return write_config(
        tmp_path / "c.yaml", data, output, rows_per_shard=1, stages="  - caption_length: {}\n"
    )


def committed_uids(run: RunDir) -> list[str]:
    """The uids of every committed manifest, as readers see them (duplicates kept, to be counted)."""
    uids: list[str] = []
    for name in run.committed_manifests():
        uids += pq.read_table(io.BytesIO(run.manifest_store.get_bytes(name))).column("uid").to_pylist()
    return uids


def test_a_run_folds_as_it_goes_keeps_the_single_entries_and_ends_with_one_part(
    tmp_path, output, small_folds, capsys
):
    assert main(["run", str(tiny_run(tmp_path, output))]) == 0, capsys.readouterr().err
    run = RunDir(output)
    parts = run.folded_store.list("")
    assert len(parts) == 1, parts  # 4 parts of 3 were written; merged mid-run and at the end
    singles = [n for n in run.ledger_store.list("") if rundir.LEDGER_ENTRY.fullmatch(n)]
    assert len(singles) == SHARDS, "single entries are the truth: folding never removes them"
    state = run.ledger_state()
    assert sorted(state.done) == list(range(SHARDS)) and not state.unfolded and state.parts == parts
    assert {k: v["rows"] for k, v in state.done.items()} == {i: 1 for i in range(SHARDS)}
    assert state.done == {i: run.committed(i) for i in range(SHARDS)}  # the folded copy is the entry

    assert main(["run", str(tiny_run(tmp_path, output))]) == 0
    assert f"0 shard(s) written, {SHARDS} already done" in capsys.readouterr().out
    assert run.folded_store.list("") == parts, "a run with nothing new to fold rewrites nothing"
    assert sorted(committed_uids(run)) == sorted(set(committed_uids(run)))


def kill_states(run: RunDir) -> None:
    """Turn a finished run's ledger into what a driver killed during a fold leaves (several at once:
    each kill point leaves a subset of these), using the same writes the driver makes."""
    entries = [run.committed(i) for i in range(SHARDS)]
    run.remove_folded_parts(run.folded_store.list(""))
    # Killed after a merged part was written, before the parts it merges were removed: both stay.
    run.write_folded_part(entries[:4])
    run.write_folded_part(entries[2:6])
    run.write_folded_part(entries[:6])
    # Killed before shards 6-8 were folded: single entries only. Shard 9: killed between its manifest
    # and its ledger entry (the manifest is not trusted). Shards 10-11: never ran.
    for i in (9, 10, 11):
        run.ledger_store.remove(f"{shard_name(i)}.json")
    run.manifest_store.remove(f"{shard_name(10)}.parquet")
    run.manifest_store.remove(f"{shard_name(11)}.parquet")
    if run.local:  # a part being written when the driver died: its temp file, never a part
        (Path(run.folded_store.root) / ".00000000000000000001-dead.jsonl.99.dead.tmp").write_text(
            '{"shard": 11'
        )


def test_a_driver_killed_mid_fold_resumes_with_every_row_exactly_once(tmp_path, output, small_folds, capsys):
    cfg = tiny_run(tmp_path, output)
    assert main(["run", str(cfg)]) == 0
    run = RunDir(output)
    kill_states(run)

    state = RunDir(output).ledger_state()
    assert sorted(state.done) == list(range(9)), "a folded part twice, or a stray temp file, changes nothing"
    assert sorted(state.unfolded) == [6, 7, 8]
    capsys.readouterr()
    assert main(["status", output, "--format", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["shards_done"], status["rows_done"], status["shards_failed"]) == (9, 9, 0)

    assert main(["run", str(cfg)]) == 0
    assert "3 shard(s) written, 9 already done" in capsys.readouterr().out
    run = RunDir(output)
    state = run.ledger_state()
    assert sorted(state.done) == list(range(SHARDS)) and not state.unfolded
    assert len(state.parts) == 1, "the resumed run folds what the killed one left and merges the parts"
    uids = committed_uids(run)
    assert len(uids) == SHARDS == len(set(uids))


def test_few_unfolded_entries_are_looked_up_many_are_listed_and_both_agree(output):
    run = RunDir(output)
    plan = [Shard(i, "in.parquet", i, i + 1) for i in range(400)]
    run.prepare({"k": 1}, "h", plan, ["caption_length"])
    for i in range(390):
        run.commit_ledger(ShardResult(i, 1, 1, {}, 0.0))
    run.write_folded_part([run.committed(i) for i in range(380)])
    run.record_failure(395, "boom")
    run.record_failure(3, "stale: shard 3 committed after this failure")

    few = RunDir(output).ledger_state()  # 20 shards not folded: looked up by name
    many = RunDir(output).ledger_state(with_failures=True)  # failures need the listing
    assert sorted(few.done) == sorted(many.done) == list(range(390))
    assert sorted(few.unfolded) == sorted(many.unfolded) == list(range(380, 390))
    assert sorted(many.failed) == [395], "a failure entry of a done shard is stale"
    assert few.failed == {}

    # Earlier versions folded into one ledger/done.jsonl: read, and its entries get a part.
    legacy = RunDir(output)
    legacy.remove_folded_parts(legacy.folded_store.list(""))
    legacy.ledger_store.put_bytes(
        rundir.LEGACY_FOLDED, "".join(f'{{"shard": {i}, "rows": 1}}\n' for i in range(100)).encode()
    )
    state = legacy.ledger_state(with_failures=True)
    assert sorted(state.done) == list(range(390)) and sorted(state.unfolded) == list(range(390))
    folder = LedgerFolder(legacy, state)  # what `curate run` does first: fold what it found unfolded
    folder.close()
    after = RunDir(output).ledger_state()
    assert sorted(after.done) == list(range(390)) and not after.unfolded and len(after.parts) == 1
