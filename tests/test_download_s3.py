"""The download stage writing its image tars to s3://, against a real S3 server on 127.0.0.1 (moto's,
bytes over HTTP) and images from a real HTTP server on 127.0.0.1.

The tars, img2dataset's Parquet and stats land under the run's prefix at the local layout's paths,
each put whole before the shard's manifest and ledger entry; a driver killed mid-run, and the store
going away for seconds mid-run, cost nothing but re-downloads of unfinished shards: every input row
once, an image for every success row. A missing bucket or wrong credentials stop the run before any
image is requested.
"""

from __future__ import annotations

import collections
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.cli import main
from curation.schema import make_uid
from tests.helpers import REPO, netns_prefix
from tests.imageserver import ImageServer
from tests.s3server import S3Server, start_authenticating_server
from tests.test_images import GOOD, LOOPBACK, pairs_table, write_download_config
from tests.test_storage_s3 import _env, committed_manifests, ledger


def download_only_config(path: Path, input_path: Path, output: str, rows: int, timeout: int = 5) -> Path:
    """Download as the only stage (no spaCy to load: img2dataset and the stores dominate)."""
    path.write_text(
        f"""input: {{format: parquet, path: {input_path}, rows_per_shard: {rows}}}
output: {output}
runner: {{type: local, workers: 1, progress: false}}
stages:
  - download: {{timeout: {timeout}, thread_count: 8, allow_private_addresses: [{LOOPBACK}]}}
"""
    )
    return path


def url_pairs(server: ImageServer, paths: list[str], path: Path) -> collections.Counter:
    """Write url/caption pairs for `paths` to `path`; the uids they get."""
    urls = [server.url(p) for p in paths]
    pq.write_table(pa.table({"url": urls, "caption": [GOOD] * len(urls)}), path)
    return collections.Counter(make_uid(u, GOOD) for u in urls)


def s3_object(s3: S3Server, bucket: str, key: str) -> bytes:
    return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def assert_an_image_for_every_success_row(s3: S3Server, bucket: str, t: pa.Table) -> None:
    tars: dict[str, dict[str, bytes]] = {}
    for r in t.to_pylist():
        assert (r["image_path"] is not None) == (r["status"] == "success"), r
        if r["image_path"] is None:
            continue
        if r["image_path"] not in tars:
            tars[r["image_path"]] = tar_members(s3_object(s3, bucket, f"run/{r['image_path']}"))
        Image.open(io.BytesIO(tars[r["image_path"]][f"{r['key']}.jpg"])).verify()
        assert json.loads(tars[r["image_path"]][f"{r['key']}.json"])["uid"] == r["uid"]


def staged_downloads() -> set[Path]:
    staging = Path(tempfile.gettempdir()) / "curate-staging"
    return set(staging.glob("download-*")) if staging.exists() else set()


def test_download_to_s3_writes_the_local_layout_and_the_same_manifest(tmp_path, s3, bucket, image_server):
    pq.write_table(pairs_table(image_server), tmp_path / "pairs.parquet")
    cfg = write_download_config(tmp_path / "c.yaml", tmp_path / "pairs.parquet", f"s3://{bucket}/run")
    staged_before = staged_downloads()
    assert main(["validate", str(cfg)]) == 0
    assert main(["run", str(cfg)]) == 0
    local = tmp_path / "local"
    assert main(["run", str(cfg), "-o", str(local)]) == 0

    on_s3 = committed_manifests(s3, bucket, "run").sort_by("uid")
    on_disk = pq.read_table(local / "manifests").sort_by("uid")
    assert on_s3.num_rows == 13 and on_s3.schema == on_disk.schema
    # Everything but img2dataset's error texts (socket errors name their own details) and fetch times.
    same = [c for c in on_disk.column_names if c not in ("error_message", "fetched_at")]
    assert on_s3.select(same).equals(on_disk.select(same))
    # Same relative paths under the prefix as under the local directory: readers of a local run just work.
    local_images = sorted(str(p.relative_to(local)) for p in (local / "images").rglob("*") if p.is_file())
    assert [k.removeprefix("run/") for k in s3.keys(bucket, "run/images/")] == local_images
    assert {Path(p).suffix for p in local_images} == {".tar", ".parquet", ".json"}
    for rel in (p for p in local_images if p.endswith(".tar")):
        assert tar_members(s3_object(s3, bucket, f"run/{rel}")) == tar_members((local / rel).read_bytes())
    assert_an_image_for_every_success_row(s3, bucket, on_s3)
    assert staged_downloads() == staged_before, "a staged download was left on this machine"


def test_missing_bucket_stops_a_download_run_before_any_image_is_requested(tmp_path, s3, bucket, capsys):
    with ImageServer() as server:
        url_pairs(server, ["/img/a.jpg", "/img/b.jpg"], tmp_path / "p.parquet")
        cfg = download_only_config(
            tmp_path / "c.yaml", tmp_path / "p.parquet", "s3://no-such-bucket-dl/run", 2
        )
        assert main(["run", str(cfg)]) == 2
        problems = capsys.readouterr().err.strip().splitlines()[1:]  # under the config's "N problem(s)"
        assert problems == [
            "  - output (line 2): bucket 'no-such-bucket-dl' does not exist "
            f"(s3://no-such-bucket-dl at {s3.endpoint}); create it first"
        ]
        assert sum(server.hits.values()) == 0


def test_wrong_credentials_stop_a_download_run_before_any_image_is_requested(tmp_path):
    server = start_authenticating_server("guarded")
    try:
        with ImageServer() as images:
            url_pairs(images, ["/img/a.jpg", "/img/b.jpg"], tmp_path / "p.parquet")
            cfg = download_only_config(tmp_path / "c.yaml", tmp_path / "p.parquet", "s3://guarded/run", 2)
            wrong = {
                "AWS_ENDPOINT_URL": server.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": server.key_id,
                "AWS_SECRET_ACCESS_KEY": "not-the-secret",
            }
            bad = subprocess.run(
                [sys.executable, "-m", "curation.cli", "run", str(cfg)],
                cwd=REPO,
                env=_env(wrong),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert sum(images.hits.values()) == 0
        assert bad.returncode == 2, bad.stderr
        (problem,) = bad.stderr.strip().splitlines()[1:]  # under the config's "N problem(s)"
        assert problem.startswith("  - output (line 2): access denied to s3://guarded at ")
        assert "AWS_ACCESS_KEY_ID" in problem and "not-the-secret" not in bad.stderr
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)


@pytest.mark.slow
def test_driver_killed_mid_download_on_s3_then_rerun_has_every_row_once_with_its_image(tmp_path, s3, bucket):
    with ImageServer(hang_seconds=120) as server:
        # Shards of 4: 0 and 1 download at once, shard 2 waits on a url that hangs until released.
        paths = (
            [f"/img/k{i}.jpg" for i in range(8)] + ["/hang/k8.jpg"] + [f"/img/k{i}.jpg" for i in range(9, 12)]
        )
        uids = url_pairs(server, paths, tmp_path / "p.parquet")
        cfg = download_only_config(tmp_path / "c.yaml", tmp_path / "p.parquet", f"s3://{bucket}/run", 4, 60)
        proc = subprocess.Popen(
            [sys.executable, "-m", "curation.cli", "run", str(cfg)],
            cwd=REPO,
            env=_env(s3.env),
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert server.hanging.wait(300), "the run never reached the hanging url"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert sorted(ledger(s3, bucket, "run")) == [0, 1]
        assert not s3.keys(bucket, "run/images/shard-00002/"), "images of a shard still downloading"
        # Shard 1 as if killed after its tar was put but before its manifest and ledger entry:
        # a truncated tar at its key, no ledger entry. It must be rewritten, never trusted.
        c = s3.client()
        c.delete_object(Bucket=bucket, Key="run/ledger/shard-00001.json")
        c.delete_object(Bucket=bucket, Key="run/manifests/shard-00001.parquet")
        (shard1_tar,) = [k for k in s3.keys(bucket, "run/images/shard-00001/") if k.endswith(".tar")]
        c.put_object(Bucket=bucket, Key=shard1_tar, Body=s3_object(s3, bucket, shard1_tar)[:700])
        server.release.set()
        before = dict(server.hits)

        assert main(["run", str(cfg)]) == 0  # takes over the dead driver's lock (same host, pid gone)
        assert sorted(ledger(s3, bucket, "run")) == [0, 1, 2]
        for i in range(4):  # shard 0 was committed: not downloaded again
            assert server.hits[f"/img/k{i}.jpg"] == before[f"/img/k{i}.jpg"] == 1
        for i in range(4, 8):  # shard 1 was not: downloaded again, its tar replaced
            assert server.hits[f"/img/k{i}.jpg"] == 2
        assert server.hits["/hang/k8.jpg"] == 2
    t = committed_manifests(s3, bucket, "run")
    assert collections.Counter(t.column("uid").to_pylist()) == uids
    assert t.column("status").to_pylist() == ["success"] * 12
    assert_an_image_for_every_success_row(s3, bucket, t)


@pytest.mark.slow
def test_s3_down_for_seconds_mid_download_run_loses_and_duplicates_nothing(tmp_path, s3, bucket):
    shards = 40
    with ImageServer() as server:
        uids = url_pairs(server, [f"/img/d{i}.jpg" for i in range(4 * shards)], tmp_path / "p.parquet")
        cfg = download_only_config(tmp_path / "c.yaml", tmp_path / "p.parquet", f"s3://{bucket}/run", 4)
        proc = subprocess.Popen(
            [sys.executable, "-m", "curation.cli", "run", str(cfg)],
            cwd=REPO,
            env=_env(s3.env),
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.time() + 300
            while len(s3.keys(bucket, "run/ledger/")) < 3:
                assert proc.poll() is None, "run finished before the server could be stopped; use more input"
                assert time.time() < deadline
                time.sleep(0.05)
            s3.stop()  # connections refused from now on: image puts, manifests, ledger entries
            time.sleep(4)
            assert proc.poll() is None, "the run gave up while the store was down for 4 s"
            s3.start()  # same port, same objects
            _, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode in (0, 1), err[-2000:]
        if proc.returncode == 1:  # shards that ran out of retries are recorded; a re-run finishes them
            assert "failed" in err
            assert main(["run", str(cfg)]) == 0
    assert set(ledger(s3, bucket, "run")) == set(range(shards))
    t = committed_manifests(s3, bucket, "run")
    assert collections.Counter(t.column("uid").to_pylist()) == uids
    assert t.column("status").to_pylist() == ["success"] * (4 * shards)
    assert_an_image_for_every_success_row(s3, bucket, t)


# ---------------------------------------------------------------------------- Ray

NETNS = netns_prefix()

# Inside the namespace: an S3 server and an image server on its loopback, `curate run --runner ray`
# with download to s3://, then the local runner on the same input to a local directory.
RAY_DRIVER = textwrap.dedent(
    r"""
    import io, json, os, sys
    from pathlib import Path
    import pyarrow as pa, pyarrow.parquet as pq
    from tests.s3server import S3Server, start_authenticating_server
    from tests.imageserver import ImageServer
    from tests.test_download_s3 import download_only_config, url_pairs
    tmp = sys.argv[1]
    server = S3Server(); server.start()
    os.environ.update(server.env)
    server.client().create_bucket(Bucket="raybucket")
    from curation.cli import main
    with ImageServer() as images:
        url_pairs(images, [f"/img/r{i}.jpg" for i in range(12)] + ["/404/x.jpg"], f"{tmp}/p.parquet")
        cfg = download_only_config(Path(f"{tmp}/c.yaml"), f"{tmp}/p.parquet", "s3://raybucket/run", 4)
        print("RUN", main(["run", str(cfg), "--runner", "ray", "--workers", "2"]), flush=True)
        print("LOCAL", main(["run", str(cfg), "-o", f"{tmp}/local", "--runner", "local"]), flush=True)
    c = server.client()
    tables = [
        pq.read_table(io.BytesIO(c.get_object(Bucket="raybucket", Key=k)["Body"].read()))
        for k in sorted(server.keys("raybucket", "run/manifests/"))
    ]
    pq.write_table(pa.concat_tables(tables), f"{tmp}/from_s3.parquet")
    tars = {
        k.removeprefix("run/"): c.get_object(Bucket="raybucket", Key=k)["Body"].read().hex()
        for k in server.keys("raybucket", "run/images/") if k.endswith(".tar")
    }
    with open(f"{tmp}/tars.json", "w") as f:
        json.dump(tars, f)
    server.stop()
    """
)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(NETNS is None, reason="cannot create a network namespace; Ray must stay on loopback")
def test_ray_runner_downloads_to_s3_inside_its_namespace(tmp_path):
    from tests.test_ray_runner import SESSION_TOKEN

    env = _env({"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=SESSION_TOKEN)
    proc = subprocess.run(
        [*NETNS, sys.executable, "-c", RAY_DRIVER, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert "RUN 0" in proc.stdout and "LOCAL 0" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    on_s3 = pq.read_table(tmp_path / "from_s3.parquet").sort_by("uid")
    local = tmp_path / "local"
    on_disk = pq.read_table(local / "manifests").sort_by("uid")
    assert on_s3.num_rows == 13 and len(set(on_s3.column("uid").to_pylist())) == 13
    same = [c for c in on_disk.column_names if c not in ("error_message", "fetched_at")]
    assert on_s3.select(same).equals(on_disk.select(same))
    assert on_s3.column("status").to_pylist().count("success") == 12
    tars = {rel: bytes.fromhex(h) for rel, h in json.loads((tmp_path / "tars.json").read_text()).items()}
    assert sorted(tars) == sorted(str(p.relative_to(local)) for p in (local / "images").rglob("*.tar"))
    for r in on_s3.to_pylist():
        if r["status"] == "success":
            Image.open(io.BytesIO(tar_members(tars[r["image_path"]])[f"{r['key']}.jpg"])).verify()
