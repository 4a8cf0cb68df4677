"""Object storage vs local disk (issue 16), against a real S3 server (moto's) on 127.0.0.1.

    PYTHONPATH=. nice -n 10 python bench/storage.py --skip-overhead --repeats 2      # (a) (c) (d), ~5 min
    PYTHONPATH=. nice -n 10 python bench/storage.py --skip-throughput --skip-loader  # (b), ~19 min

(a) Throughput: the caption pipeline (`caption_complexity` + `caption_action`), `curate run`
    end to end in a subprocess, 1 worker, the default shard size (100,000 rows: the whole input
    is one shard when --rows is smaller), output on local disk vs on the S3 server; best of
    --repeats, alternating. Target: s3/local >= 0.9.
(b) Driver overhead for a plan of many tiny shards (1 row each) on the S3 server, by shard count
    (--shards, default 1k/10k/100k): plan (the input's plan, run.json); every single ledger entry
    written (64 concurrent PUTs, not timed); `curate run` with no folded part (earlier versions'
    ledger, or a driver killed before its first fold: a listing and one GET per entry; up to
    --legacy-max shards); then the folded parts a driver killed after its last commit leaves
    (written by the driver's own LedgerFolder, the last --unfolded entries unfolded) and
    `curate run` (first after the kill; then when all is done) and `curate status`. Prints the
    growth against the smallest count (time ratio / shard-count ratio: 1.0 = linear).
(c) `curate query` (copy the committed manifests, then DuckDB) on s3 vs local, on (a)'s runs.
(d) The trainer's data loader (ShardStream + make_loader, 2 workers, curate-tiny preprocessing)
    on the same `curate select` shards on local disk vs the S3 server: samples/s and the ratio,
    against what a curate-tiny training step (CPU) consumes in the same run.

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
    from botocore.config import Config

    return boto3.client(
        "s3",
        config=Config(max_pool_connections=64),
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


def driver_overhead(
    tmp: Path, env: dict[str, str], counts: list[int], legacy_max: int, unfolded: int
) -> None:
    from curation.config import load_config
    from curation.pipeline import Pipeline
    from curation.rundir import LedgerFolder, LedgerState, RunDir
    from curation.stages import STAGES

    s3 = s3_client(env)
    print(f"(b) driver overhead, 1-row shards on the S3 server (seconds; {unfolded:,} entries left unfolded)")
    print(
        f"    {'shards':>8} {'plan':>7} {'singles':>8} {'no parts':>9} "
        f"{'killed':>7} {'done':>7} {'status':>7}   (synthesis of the single entries is not timed)"
    )
    results = []
    for n in counts:
        bucket = f"ov{n}"
        s3.create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/run"
        data = make_input(tmp, n)
        cfg = write_config(tmp / f"ov{n}.yaml", data, url, 1, "  - caption_length: {}\n")
        config = load_config(cfg, stages=STAGES)
        t0 = time.perf_counter()
        pipeline = Pipeline(config)
        plan = pipeline.source.plan(None)
        fp, h = config.run_fingerprint(pipeline.stages)
        RunDir(url).prepare(fp, h, plan, [s.name for s in config.stages])
        t_plan = time.perf_counter() - t0

        now = time.time()
        entries = [
            {"shard": i, "rows": 1, "kept": 1, "drop_reasons": {}, "seconds": 0.0, "finished": now}
            for i in range(n)
        ]

        def put(entry: dict, bucket: str = bucket) -> None:
            key = f"run/ledger/shard-{entry['shard']:05d}.json"
            s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(entry, indent=1).encode())

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(64) as pool:  # every single entry, as the workers commit them
            list(pool.map(put, entries))
        t_singles = time.perf_counter() - t0
        # The ledger of earlier versions (and of a run killed before its first fold): single entries
        # only, so the first `curate run` lists ledger/ and GETs every entry (then folds them).
        t_legacy = curate(["run", str(cfg)], env) if n <= legacy_max else None
        # What a driver killed after its last commit leaves: the parts it folded every 1,000 commits
        # (merged beyond 32) from the same code the driver runs, and the last entries unfolded.
        run = RunDir(url)
        run.remove_folded_parts(run.folded_store.list(""))
        folder = LedgerFolder(run, LedgerState({}, {}, {}, []))
        for entry in entries[: max(0, n - unfolded)]:
            folder.add(entry)
        t_killed = curate(["run", str(cfg)], env)
        t_done = curate(["run", str(cfg)], env)
        t_status = curate(["status", url], env)
        results.append((n, t_plan, t_legacy, t_killed, t_done, t_status))
        legacy = f"{t_legacy:9.2f}" if t_legacy is not None else f"{'-':>9}"
        print(
            f"    {n:>8,} {t_plan:>7.2f} {t_singles:>8.1f} {legacy} {t_killed:>7.2f} {t_done:>7.2f} {t_status:>7.2f}",
            flush=True,
        )
    base = results[0]
    print(
        f"    growth vs {base[0]:,} shards (time ratio / shard-count ratio; linear = 1.0, less = sublinear):"
    )
    for n, *times in results[1:]:
        k = n / base[0]
        cells = []
        for name, t, t0 in zip(("plan", "no parts", "killed", "done", "status"), times, base[1:]):
            if t is not None and t0 is not None:
                cells.append(f"{name} {t / t0:.2f}x time = {t / t0 / k:.3f}")
        print(f"    {n:>8,} ({k:g}x shards): " + ", ".join(cells))
    for n, _, t_legacy, t_killed, *_ in results:
        if t_legacy is not None:
            print(f"    {n:>8,}: first run after a kill, no parts / folded parts: {t_legacy / t_killed:.1f}x")
    print("    (each command's wall time includes ~3-4 s of Python start-up and imports)")


def loader_throughput(
    tmp: Path, env: dict[str, str], samples: int, batch: int, batches: int, repeats: int
) -> None:
    """The trainer's data loader on `select` shards from local disk vs the S3 server, and a training step."""
    import torch

    from curation.models.clip import build_model
    from train.data import ShardStream, expand_shards, make_loader
    from train.fashion_mnist import write_shards
    from train.loop import forward_backward
    from train.losses import TrainingObjective, build_loss

    write_shards(tmp / "fmnist", "train", limit=samples, samples_per_shard=256)
    run = tmp / "ld-run"
    cfg = tmp / "ld.yaml"
    cfg.write_text(
        f"input: {{format: webdataset, path: '{tmp}/fmnist/*.tar', rows_per_shard: 256}}\n"
        f"output: {run}\nrunner: {{type: local, workers: 1, progress: false}}\n"
        "stages:\n  - caption_length: {}\n"
    )
    curate(["run", str(cfg)], env)
    s3_client(env).create_bucket(Bucket="loader")
    curate(["select", str(run), "--out", str(tmp / "ld-sel"), "--shard-size", "256"], env)
    curate(["select", str(run), "--out", "s3://loader/sel", "--shard-size", "256"], env)
    last = (samples + 255) // 256 - 1
    patterns = {
        "local": f"{tmp}/ld-sel/{{00000..{last:05d}}}.tar",
        "s3": f"s3://loader/sel/{{00000..{last:05d}}}.tar",
    }
    torch.manual_seed(0)
    built = build_model("curate-tiny")
    best = {"local": 0.0, "s3": 0.0}
    sample_batch = None
    for _ in range(repeats):
        for where, pattern in patterns.items():
            stream = ShardStream(
                expand_shards(pattern), batch, built.preprocess_train, built.tokenizer, shuffle_buffer=256
            )
            it = iter(make_loader(stream, workers=2))
            sample_batch = next(it)  # workers started, first shards opened
            t0 = time.perf_counter()
            for _ in range(batches):
                next(it)
            best[where] = max(best[where], batches * batch / (time.perf_counter() - t0))
            del it
    print(
        f"(d) trainer data loader, curate-tiny preprocessing, 2 loader workers, batch {batch}, "
        f"{batches} batches after the first (best of {repeats}); {samples:,} samples in 256-sample select shards"
    )
    for where in ("local", "s3"):
        print(f"    {where:5s} {best[where]:8,.0f} samples/s")
    print(f"    s3/local loader throughput ratio: {best['s3'] / best['local']:.3f}")
    model = built.model.train()
    objective = TrainingObjective(build_loss("infonce"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    assert sample_batch is not None
    step_batch = {"image": sample_batch["image"], "text": sample_batch["text"]}

    def step() -> None:
        forward_backward(model, objective, step_batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    need = batch / step_s
    print(
        f"    curate-tiny training step (CPU, {torch.get_num_threads()} threads, batch {batch}): {step_s:.3f} s "
        f"= {need:,.0f} samples/s; loader from s3 / trainer: {best['s3'] / need:.2f}x "
        f"({'keeps up' if best['s3'] >= need else 'does NOT keep up'})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="rows for (a): one default-size shard")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--shards", type=int, nargs="+", default=[1000, 10_000, 100_000], help="shard counts for (b)"
    )
    p.add_argument(
        "--legacy-max",
        type=int,
        default=10_000,
        help="largest count for (b)'s no-parts column (one GET per entry)",
    )
    p.add_argument("--unfolded", type=int, default=1000, help="(b): entries a killed driver left unfolded")
    p.add_argument("--loader-samples", type=int, default=4096)
    p.add_argument("--loader-batches", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-loader", action="store_true")
    args = p.parse_args()
    server, env = start_server()
    os.environ.update(env)
    tmp = Path(tempfile.mkdtemp(prefix="curate-bench-storage-"))
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    try:
        if not args.skip_throughput:
            throughput(tmp, env, args.rows, args.repeats)
        if not args.skip_loader:
            loader_throughput(
                tmp, env, args.loader_samples, args.batch_size, args.loader_batches, args.repeats
            )
        if not args.skip_overhead:
            driver_overhead(tmp, env, args.shards, args.legacy_max, args.unfolded)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
