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


def test_byte_ranges_are_read_in_order_and_a_short_one_is_an_error(store):
    store.put_bytes("a.tar", bytes(range(256)) * 4)
    store.put_bytes("b.tar", b"0123456789")
    assert store.read_ranges([("b.tar", 3, 4), ("a.tar", 510, 3), ("b.tar", 0, 0)]) == [
        b"3456",
        b"\xfe\xff\x00",
        b"",
    ]
    assert store.read_ranges([]) == []
    with pytest.raises(StorageError, match=r"b\.tar: 5 bytes at 8 asked, 2 read"):
        store.read_ranges([("b.tar", 8, 5)])
    with pytest.raises(FileNotFoundError):
        store.read_ranges([("gone.tar", 0, 1)])


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

    with pytest.raises(StorageError, match=r"still failing after \d+ attempts in [01]s"):
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


def test_shards_and_checkpoints_on_a_store(store, tmp_path):
    """select's writer, the trainer's shard patterns and its checkpoints, on local disk and memory://."""
    import torch

    from curation.core.shards import TarWriter, read_samples
    from train.checkpoints import CheckpointDir, load_checkpoint
    from train.data import count_from_sizes, expand_shards

    with TarWriter(store.url, shard_size=2, mtime=0) as writer:
        for i in range(5):
            writer.add(f"{i:04d}", {"txt": f"caption {i}".encode(), "jpg": b"\xff\xd8 not decoded"})
    assert sorted(store.list("")) == ["00000.tar", "00001.tar", "00002.tar", "sizes.json"]
    base = store.url_of()
    shards = expand_shards(f"{base}/{{00000..00003}}.tar")  # 00003 does not exist: left out
    assert shards == [f"{base}/{i:05d}.tar" for i in range(3)]
    assert expand_shards(f"{base}/0000[12].tar") == shards[1:]
    assert count_from_sizes(shards) == 5
    assert [s.members["txt"] for s in read_samples(shards[2])] == [b"caption 4"]
    with pytest.raises(FileNotFoundError):
        expand_shards(f"{base}/{{00007..00009}}.tar")

    ckpts = CheckpointDir(store.url_of("train"))
    assert ckpts.latest() is None
    for step in (3, 6, 9):
        ckpts.save(step, {"step": step, "w": torch.full((2,), float(step))})
    ckpts.prune(2)
    assert ckpts.names() == ["step_00000006.pt", "step_00000009.pt"]
    latest = ckpts.latest()
    assert str(latest).endswith("train/checkpoints/step_00000009.pt")
    assert torch.equal(load_checkpoint(latest)["w"], torch.full((2,), 9.0))
