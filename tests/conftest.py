from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import LAION_1K

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def laion_1k() -> pa.Table:
    """1,000 real LAION url + caption rows (bundled)."""
    return pq.read_table(LAION_1K, columns=["URL", "TEXT"])


@pytest.fixture(scope="session")
def scorer():
    from curation.stages.caption import CaptionScorer

    s = CaptionScorer()
    s.load()
    return s


@pytest.fixture(scope="module")
def s3():
    """A real S3-protocol server (moto) on 127.0.0.1, one per test module (tests/s3server.py)."""
    from tests.s3server import S3Server

    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3, monkeypatch) -> str:
    """A fresh bucket on `s3`, with the server's endpoint and credentials in the environment."""
    name = f"curate-{uuid.uuid4().hex[:12]}"
    s3.ensure_running()
    s3.client().create_bucket(Bucket=name)
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    return name


@pytest.fixture
def image_server():
    """A real HTTP server on 127.0.0.1 (see tests/imageserver.py)."""
    from tests.imageserver import ImageServer

    with ImageServer() as server:
        yield server
