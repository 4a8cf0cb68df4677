"""The storage layer on local disk and memory:// (fast); tests/test_storage_s3.py runs it on a real S3 server."""

from __future__ import annotations

import uuid

import pytest

from curation.core.storage import LockHeld, StorageError, open_store, retrying, transient


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(tmp_path / "out")
    return open_store(f"memory://curate-test-{uuid.uuid4().hex}/out")


def test_objects_are_written_whole_and_listed_by_prefix(store):
    assert store.list("ledger") == []
    store.put_json("ledger/shard-00000.json", {"shard": 0})
    store.put_bytes("ledger/shard-00001.json", b'{"shard": 1}')
    store.put_bytes("manifests/shard-00000.parquet", b"x" * 1000)
    assert sorted(store.list("ledger")) == ["shard-00000.json", "shard-00001.json"]  # no temp files left
    assert store.get_json("ledger/shard-00000.json") == {"shard": 0}
    got = store.get_many(["ledger/shard-00000.json", "ledger/shard-00001.json", "ledger/missing.json"])
    assert got == {
        "ledger/shard-00000.json": b'{\n "shard": 0\n}',
        "ledger/shard-00001.json": b'{"shard": 1}',
    }
    store.remove("ledger/shard-00001.json")
    store.remove("ledger/shard-00001.json")  # removing what is gone is fine
    assert store.list("ledger") == ["shard-00000.json"]
    with pytest.raises(FileNotFoundError):
        store.get_bytes("ledger/shard-00001.json")


def test_put_file_commits_a_staged_file(store):
    staged = store.staging() / "part.parquet"
    staged.write_bytes(b"complete")
    store.put_file(staged, "manifests/shard-00003.parquet")
    assert store.get_bytes("manifests/shard-00003.parquet") == b"complete"
    assert not staged.exists()


def test_a_second_lock_holder_is_refused(store):
    with store.lock(".lock", "busy"):
        with pytest.raises(LockHeld, match="busy"), store.lock(".lock", "busy"):
            pass
        assert store.is_locked(".lock")
    assert not store.is_locked(".lock")
    with store.lock(".lock", "busy"):  # released means free again
        pass


def test_transient_errors_are_retried_and_permanent_ones_are_not():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError(111, "Connection refused")
        return "ok"

    assert retrying(flaky, 30, "reading x") == "ok" and len(calls) == 3
    assert not transient(PermissionError("denied")) and not transient(FileNotFoundError("gone"))

    def down():
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(StorageError, match=r"still failing after 0\.5s of retries"):
        retrying(down, 0.5, "reading x")

    def denied():
        calls.append(1)
        raise PermissionError("denied")

    calls.clear()
    with pytest.raises(PermissionError):
        retrying(denied, 30, "reading x")
    assert len(calls) == 1


def test_a_url_without_a_filesystem_is_one_line():
    with pytest.raises(StorageError, match=r"unknown storage protocol nosuchproto://"):
        open_store("nosuchproto://bucket/run")
