"""Object storage vs local disk (issue 16), against a real S3 server (moto's) on 127.0.0.1.

    nice -n 10 python bench/storage.py                            # all parts, ~8 min on 2 busy cores
    nice -n 10 python bench/storage.py --rows 20000 --repeats 2 --shards 1000 2000

(a) Throughput: the caption pipeline (`caption_complexity` + `caption_action`), `curate run`
    end to end in a subprocess, 1 worker, the default shard size (100,000 rows: the whole input
    is one shard when --rows is smaller), output on local disk vs on the S3 server; best of
    --repeats, alternating. Target: s3/local >= 0.9.
(b) Driver overhead for a plan of many tiny shards (1 row each) on the S3 server, by shard count:
    plan (read the input's plan, write run.json), `curate run` when every shard is done (first
    time: list the ledger, read every entry, fold them into ledger/done.jsonl; after that: list
    + one GET), and `curate status`. The ledger is synthesized (N PUTs, not timed) so the sizes
    stay affordable; `curate query` over the manifests is (c).
(c) `curate query` (copy the committed manifests, then DuckDB) on s3 vs local, on (a)'s runs.

The S3 server runs in its own process (moto_server), so it does not share this process's GIL.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
LAION_1K = REPO / "data" / "laion_captions_1k.parquet"
CAPTIONS = "  - caption_complexity: {min: 2}\n  - caption_action: {min: 1}\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, dict[str, str]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    return proc, env


def s3_client(env: dict[str, str]):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def make_input(folder: Path, rows: int) -> Path:
    """The committed 1k LAION pairs repeated with distinct URLs (every uid unique)."""
    t = pq.read_table(LAION_1K, columns=["URL", "TEXT"])
    parts, k = [], 0
    while sum(p.num_rows for p in parts) < rows:
        parts.append(t.set_column(0, "URL", pa.array([f"{u}#{k}" for u in t.column(0).to_pylist()])))
        k += 1
    path = folder / f"captions_{rows}.parquet"
    pq.write_table(pa.concat_tables(parts).slice(0, rows), path)
    return path


def write_config(path: Path, data: Path, output: str, rows_per_shard: int, stages: str) -> Path:
    path.write_text(
        f"input: {{path: {data}, url_column: URL, caption_column: TEXT, rows_per_shard: {rows_per_shard}}}\n"
        f"output: {output}\nrunner: {{type: local, workers: 1, progress: false}}\nstages:\n{stages}"
    )
    return path


def curate(args: list[str], env: dict[str, str]) -> float:
    full = {**os.environ, **env, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "curation.cli", *args], env=full, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"curate {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return seconds


def throughput(tmp: Path, env: dict[str, str], rows: int, repeats: int) -> None:
    data = make_input(tmp, rows)
    s3 = s3_client(env)
    best = {"local": float("inf"), "s3": float("inf")}
    for r in range(repeats):
        for where in ("local", "s3"):
            if where == "s3":
                bucket = f"tp{r}"
                s3.create_bucket(Bucket=bucket)
                out = f"s3://{bucket}/run"
            else:
                out = str(tmp / f"local{r}")
            cfg = write_config(tmp / f"{where}{r}.yaml", data, out, 100_000, CAPTIONS)
            best[where] = min(best[where], curate(["run", str(cfg)], env))
    print(f"(a) caption pipeline, {rows:,} rows, 1 worker, `curate run` wall time (best of {repeats})")
    for where in ("local", "s3"):
        print(f"    {where:5s} {best[where]:7.2f} s  {rows / best[where]:8,.0f} rows/s")
    print(f"    s3/local throughput ratio: {best['local'] / best['s3']:.3f}  (target >= 0.9)")
    sql = "SELECT count(*), avg(caption_complexity) FROM samples WHERE keep"
    q_local = min(curate(["query", str(tmp / "local0"), sql], env) for _ in range(repeats))
    q_s3 = min(curate(["query", "s3://tp0/run", sql], env) for _ in range(repeats))
    print(f"(c) curate query (wall, incl. start-up): local {q_local:.2f} s, s3 {q_s3:.2f} s")


def driver_overhead(tmp: Path, env: dict[str, str], counts: list[int]) -> None:
    os.environ.update(env)
    from curation.config import load_config
    from curation.manifest import RunDir
    from curation.pipeline import Pipeline
    from curation.stages import model_fingerprints

    s3 = s3_client(env)
    print("(b) driver overhead, 1-row shards on the S3 server (seconds)")
    print(f"    {'shards':>8} {'plan':>8} {'run,done(1st)':>14} {'run,done':>9} {'status':>8}")
    for n in counts:
        bucket = f"ov{n}"
        s3.create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/run"
        data = make_input(tmp, n)
        cfg = write_config(tmp / f"ov{n}.yaml", data, url, 1, "  - caption_length: {}\n")
        config = load_config(cfg)
        t0 = time.perf_counter()
        pipeline = Pipeline(config)
        plan = pipeline.source.plan(None)
        fp, h = config.run_fingerprint(None, model_fingerprints(pipeline.stages))
        RunDir(url).prepare(fp, h, plan, [s.name for s in config.stages])
        t_plan = time.perf_counter() - t0

        def put(i: int, bucket: str = bucket) -> None:
            entry = {
                "shard": i,
                "rows": 1,
                "kept": 1,
                "drop_reasons": {},
                "seconds": 0.0,
                "finished": time.time(),
            }
            s3.put_object(
                Bucket=bucket, Key=f"run/ledger/shard-{i:05d}.json", Body=json.dumps(entry).encode()
            )

        with cf.ThreadPoolExecutor(32) as pool:
            list(pool.map(put, range(n)))
        t_first = curate(["run", str(cfg)], env)
        t_done = curate(["run", str(cfg)], env)
        t_status = curate(["status", url], env)
        print(f"    {n:>8,} {t_plan:>8.2f} {t_first:>14.2f} {t_done:>9.2f} {t_status:>8.2f}")
    print("    (run/status: wall time of the command, incl. ~1-2 s of Python start-up and imports)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="rows for (a): one default-size shard")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--shards", type=int, nargs="+", default=[500, 1000, 2000, 4000], help="shard counts for (b)"
    )
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-overhead", action="store_true")
    args = p.parse_args()
    server, env = start_server()
    tmp = Path(tempfile.mkdtemp(prefix="curate-bench-storage-"))
    try:
        if not args.skip_throughput:
            throughput(tmp, env, args.rows, args.repeats)
        if not args.skip_overhead:
            driver_overhead(tmp, env, args.shards)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
