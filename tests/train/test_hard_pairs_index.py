"""The hard-pair index (`train.hard_pairs.TarIndex`) reads tars through `curation.core.shards`: its
name splitting and member size cap, plain tars only, and a URL's scan retried as the storage layer
retries."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from train.hard_pairs import TarIndex


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _plain_tar(path: Path, keys: list[str], prefix: str = "") -> Path:
    with tarfile.open(path, "w") as tar:
        for key in keys:
            _add(tar, f"{prefix}{key}.jpg", f"image {key}".encode())
            _add(tar, f"{prefix}{key}.txt", f"caption {key}".encode())
            _add(tar, f"{prefix}{key}.json", json.dumps({"uid": f"u-{key}"}).encode())
    return path


def test_members_are_found_by_offset_with_the_shard_formats_names(tmp_path):
    tar = _plain_tar(tmp_path / "00000.tar", ["a", "b"], prefix="./")  # `tar -C dir -cf x.tar .` names
    index = TarIndex([str(tar)])
    assert index.uids == ["u-a", "u-b"]
    sample = index.read(index.position["u-b"], {})
    assert sample["__key__"] == "b"  # "./b" is the same sample as "b"
    assert sample["jpg"] == b"image b" and sample["txt"] == b"caption b"


def test_a_compressed_tar_is_refused_and_an_oversized_member_left_out(tmp_path):
    gz = tmp_path / "00000.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        _add(tar, "a.json", b'{"uid": "u-a"}')
    with pytest.raises(ValueError, match="reads samples by offset from plain"):
        TarIndex([str(gz)])
    # A GNU sparse member: 1 KB on disk, declaring 1 GiB, over the shard reader's member cap.
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "big.jpg", "wb") as f:
        f.write(b"x")
        f.truncate(2**30)
    (src / "big.json").write_text('{"uid": "u-big"}')
    (src / "ok.jpg").write_bytes(b"image")
    (src / "ok.json").write_text('{"uid": "u-ok"}')
    sparse = tmp_path / "00001.tar"
    names = ["big.jpg", "big.json", "ok.jpg", "ok.json"]
    subprocess.run(["tar", "--sparse", "-C", str(src), "-cf", str(sparse), *names], check=True)
    assert sparse.stat().st_size < 100_000
    assert TarIndex([str(sparse)]).uids == ["u-ok"]


def test_a_url_tar_is_scanned_through_a_store_outage(tmp_path, s3, bucket, monkeypatch):
    # botocore's own retries off, so that the outage outlasts what s3fs retries by itself (about 2 s)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    tar = _plain_tar(tmp_path / "00000.tar", ["a", "b", "c"])
    s3.client().upload_file(str(tar), bucket, "sel/00000.tar")
    s3.stop()  # connections refused until the thread below starts it again (same port, same objects)
    restart = threading.Timer(4.0, s3.start)
    restart.start()
    try:
        index = TarIndex([f"s3://{bucket}/sel/00000.tar"])
    finally:
        restart.join()
    assert index.uids == ["u-a", "u-b", "u-c"]
    got = index.read_many([index.position["u-c"]], {}, {})
    assert got[0]["jpg"] == b"image c"
