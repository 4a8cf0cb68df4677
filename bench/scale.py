"""Read-only commands at scale (issue 24): what `stats`, a GROUP BY, `select --uids-only` and `report`
cost as a run grows to LAION's ~232k manifests, on local disk and on a real S3 server (moto).

    python bench/scale.py                                   # 1k, 10k, 100k manifests of 100 rows
    python bench/scale.py --sizes 1000x10000,10000x1000     # SHARDSxROWS: 10M rows two ways
    python bench/scale.py --sizes 1000x100 --s3 --commands stats,group_by   # quick
    python bench/scale.py --sizes 100x10000,1000x10000 --images --commands dedup,report  # bytes a row

Each size is a run built with curate's own writer and schema (`RunDir.writer`, the pipeline's
manifest schema, a summary per shard and the driver's folding of ledger and summaries, exactly as
`curate run` commits a shard): synthetic rows whose captions are the 1,000 real LAION captions
bundled in data/ (realistic lengths), with scores drawn from skewed distributions. Then each
command runs as a fresh `curate` process; per command the script prints wall seconds (and "main s":
the time inside `curation.cli.main`, without the interpreter's start and curate's first imports,
which dominate on a loaded machine), bytes read
(local: the process's read() bytes, /proc/self/io rchar, which includes ~20-40 MB of Python
modules; S3: bytes received over its sockets), peak RSS, and the growth of the time against the
smallest size. Where `curate compact` exists, the run is compacted and every command runs again.
The one-column reference: the compressed size of `drop_reason` over all manifests (the GROUP BY's
column), for the "S3 bytes <= 1.5x the column" target.
With `--images` the rows also carry an image run's columns (sha256, phash, clip_score, original
size) with exact and near duplicates, for `dedup` and `select --dedup`; the peak RSS at two sizes
gives each command's bytes per row. A run kept from an earlier invocation and already compacted
is measured as "compacted".

Builds are CPU-bound (2 cores here): ~15-25 s per million rows plus ~4 ms per shard on local
disk. Run the big sizes niced, in the background, bounded (`timeout`). Results: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
LAION_1K = REPO / "data" / "laion_captions_1k.parquet"
STAGES = (
    "  - caption_complexity: {min: 2}\n  - caption_action: {min: 1}\n"
    "  - caption_length: {min_words: 3}\n  - caption_language: {languages: [en], min_score: 0.5}\n"
)
COMMANDS = {
    "stats": lambda run, tmp: ["stats", run],
    "group_by": lambda run, tmp: ["query", run, "SELECT caption_lang, count(*) FROM samples GROUP BY 1"],
    "select_uids": lambda run, tmp: [
        "select",
        run,
        "--where",
        "keep AND caption_complexity >= 4",
        "--uids-only",
        "--out",
        str(tmp / "uids.parquet"),
        "--force",
    ],
    "report": lambda run, tmp: ["report", run, "--out", str(tmp / "report.html"), "--force"],
    # Whole-run commands whose memory may grow with the rows (issue 24, item 4); `--images` runs have
    # the columns they need. `select_dedup` reads the table `dedup` wrote: list it after `dedup`.
    "dedup": lambda run, tmp: ["dedup", run, "--force"],
    "select_dedup": lambda run, tmp: [
        "select",
        run,
        "--where",
        "keep",
        "--dedup",
        "--uids-only",
        "--out",
        str(tmp / "dedup-uids.parquet"),
        "--force",
    ],
    "balance": lambda run, tmp: [
        "select",
        run,
        "--where",
        "keep",
        "--balance",
        str(balance_entries(tmp)),
        "--balance-t",
        "1000",
        "--uids-only",
        "--out",
        str(tmp / "balanced-uids.parquet"),
        "--force",
    ],
}
# Columns an image run adds, for `dedup` (`--images`): exact duplicates share sha256 and caption,
# near duplicates a phash a few bits from another row's.
IMAGE_COLUMNS = {
    "sha256": pa.string(),
    "phash": pa.int64(),
    "clip_score": pa.float32(),
    "original_width": pa.int32(),
    "original_height": pa.int32(),
}
EXACT_SHARE, NEAR_SHARE = 0.02, 0.01  # rows copying an earlier image, or a near copy of its phash


def balance_entries(tmp: Path) -> Path:
    """A MetaCLIP metadata list for `balance`: 100 frequent words of the bundled captions."""
    path = tmp / "balance-entries.txt"
    if not path.exists():
        from collections import Counter

        words = Counter(
            w for c in pq.read_table(LAION_1K).column("TEXT").to_pylist() for w in c.lower().split()
        )
        path.write_text("\n".join([w for w, _ in words.most_common(300) if len(w) > 3 and w.isalpha()][:100]))
    return path


# Run inside each measured process: counts socket bytes and reports rchar and peak RSS at exit.
MEASURE = r"""
import atexit, json, os, resource, socket, sys, time
got = [0]
_recv, _recv_into = socket.socket.recv, socket.socket.recv_into
def recv(self, *a, **k):
    data = _recv(self, *a, **k); got[0] += len(data); return data
def recv_into(self, *a, **k):
    n = _recv_into(self, *a, **k); got[0] += n; return n
socket.socket.recv, socket.socket.recv_into = recv, recv_into
def report():
    io = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(os.environ["BENCH_MEASURE"], "w") as f:
        json.dump({"rchar": int(io["rchar"]), "socket": got[0], "rss": rss, "main": time.perf_counter() - t0}, f)
atexit.register(report)
from curation.cli import main
sys.argv = ["curate"] + sys.argv[1:]
t0 = time.perf_counter()
code = main(sys.argv[1:])
sys.stdout.flush()
sys.exit(code)
"""


# ---------------------------------------------------------------------------- building runs


def build_run(out: Path, shards: int, rows: int, seed: int = 0, images: bool = False) -> float:
    """A finished caption run of `shards` x `rows` written by curate's own writer; returns seconds."""
    from curation.config import load_config
    from curation.pipeline import Pipeline
    from curation.rundir import RunDir
    from curation.sources import Shard
    from curation.stages import STAGES as REGISTRY

    t0 = time.perf_counter()
    cfg_path = out.parent / f"{out.name}.yaml"
    cfg_path.write_text(
        f"input: {{path: {LAION_1K}, url_column: URL, caption_column: TEXT, rows_per_shard: {rows}}}\n"
        f"output: {out}\nrunner: {{type: local, workers: 1, progress: false}}\nstages:\n{STAGES}"
    )
    config = load_config(cfg_path, stages=REGISTRY)
    pipeline = Pipeline(config)
    schema = pipeline.schema
    for name, type_ in IMAGE_COLUMNS.items() if images else ():
        schema = schema.append(pa.field(name, type_))
    fingerprint, config_hash = config.run_fingerprint(pipeline.stages)
    plan = [Shard(i, str(LAION_1K), i * rows, (i + 1) * rows) for i in range(shards)]
    run = RunDir(out)
    captions = pq.read_table(LAION_1K).column("TEXT").to_pylist()
    words = np.array([len(c.split()) for c in captions], np.int32)
    chars = np.array([len(c) for c in captions], np.int32)
    rng = np.random.default_rng(seed)
    # The files are curate's; only the wait for the disk is skipped while building (3 fsyncs a
    # shard, ~20 ms on this machine: 100k shards would take over half an hour more).
    fsync, os.fsync = os.fsync, lambda fd: None
    try:
        with run.lock():
            run.prepare(fingerprint, config_hash, plan, [s.name for s in config.stages])
            _write(run, schema, plan, shards, rows, captions, words, chars, rng, images)
    finally:
        os.fsync = fsync
    return time.perf_counter() - t0


def _write(run, schema, plan, shards, rows, captions, words, chars, rng, images) -> None:
    """The shards, each committed as the shard task does; the driver's folding of ledger and summaries."""
    from curation.rundir import ShardResult
    from curation.stats import ShardStats, StatsFolder, write_summary

    folder = StatsFolder(run, run.ledger_state(plan))
    for s in range(shards):
        table = synthetic_shard(schema, s, rows, captions, words, chars, rng, images)
        writer = run.writer(s, schema)
        stats = ShardStats()
        stats.add(table)
        writer.write(table)
        write_summary(run, s, stats)
        result: ShardResult = writer.commit()
        folder.add(result.to_json(), stats)
    folder.close()


def synthetic_shard(schema, s, n, captions, words, chars, rng, images=False) -> pa.Table:
    image = np.arange(n, dtype=np.int64) + s * n  # each row's image, by its first row's number
    if images:  # exact duplicates: an earlier row's image (its bytes and its caption)
        copy = (rng.random(n) < EXACT_SHARE) & (image > 0)
        image[copy] = rng.integers(0, image[copy])
    idx = image % len(captions)
    complexity = rng.poisson(2.5, n).astype(np.int32)
    actions = rng.binomial(3, 0.35, n).astype(np.int32)
    lang_score = rng.beta(8, 1.5, n).astype(np.float32)
    lang = np.where(rng.random(n) < 0.93, "en", np.where(rng.random(n) < 0.5, "de", "fr"))
    w, c = words[idx], chars[idx]
    reasons = [
        ("caption_complexity", "complexity", complexity < 2),
        ("caption_action", "action", actions < 1),
        ("caption_length", "caption_length", w < 3),
        ("caption_language", "language", (lang != "en") | (lang_score < 0.5)),
    ]
    stage = np.full(n, None, object)
    reason = np.full(n, None, object)
    for name, why, fails in reversed(reasons):  # the first stage that drops a row names it
        stage[fails], reason[fails] = name, why
    uids = np.frombuffer(rng.bytes(16 * n), dtype="S16")
    cols = {
        "uid": pa.array([u.hex() for u in uids]),
        "shard": pa.array(np.full(n, s, np.int32)),
        "url": pa.array([f"https://img{s % 97}.example.com/{s}/{i}.jpg" for i in range(n)]),
        "caption": pa.array([captions[i] for i in idx]),
        "caption_complexity": complexity,
        "caption_actions": actions,
        "caption_verbs": actions + rng.binomial(2, 0.3, n).astype(np.int32),
        "caption_tokens": w + rng.integers(0, 4, n).astype(np.int32),
        "caption_status": pa.array(np.full(n, "ok", object)),
        "caption_words": w,
        "caption_chars": c,
        "caption_lang": pa.array(lang.astype(object)),
        "caption_lang_score": lang_score,
        "keep": pa.array(np.equal(reason, None)),
        "drop_reason": pa.array(reason, pa.string()),
        "drop_stage": pa.array(stage, pa.string()),
    }
    if images:
        cols.update(image_columns(image, rng))
    return pa.table({f.name: pa.array(cols[f.name]).cast(f.type) for f in schema})


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed pseudo-random 64-bit value per integer."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def image_columns(image: np.ndarray, rng: np.random.Generator) -> dict[str, object]:
    """sha256 and phash of each row's image; NEAR_SHARE of the rows get the phash of an earlier image
    with 1-2 bits flipped (a near duplicate within `curate dedup`'s default radius)."""
    n = len(image)
    parts = [_mix(image * 4 + k).tolist() for k in range(4)]
    sha = [f"{a:016x}{b:016x}{c:016x}{d:016x}" for a, b, c, d in zip(*parts)]
    source = image.copy()
    near = (rng.random(n) < NEAR_SHARE) & (image > 0)
    source[near] = rng.integers(0, image[near])
    flips = (np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)) | (
        np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)
    )
    phash = _mix(source ^ np.int64(0x5BD1E995)) ^ np.where(near, flips, np.uint64(0))
    return {
        "sha256": pa.array(sha),
        "phash": pa.array(phash.view(np.int64)),
        "clip_score": rng.normal(0.3, 0.05, n).astype(np.float32),
        "original_width": rng.integers(200, 2000, n).astype(np.int32),
        "original_height": rng.integers(200, 2000, n).astype(np.int32),
    }


# ---------------------------------------------------------------------------- S3


def start_moto() -> tuple[subprocess.Popen, dict[str, str]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
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


def upload(local: Path, env: dict[str, str], bucket: str, prefix: str) -> float:
    """The run directory's objects under s3://bucket/prefix (the layout `curate run` writes there)."""
    import boto3
    from botocore.config import Config

    t0 = time.perf_counter()
    s3 = boto3.client(
        "s3",
        config=Config(max_pool_connections=32),
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )
    s3.create_bucket(Bucket=bucket)
    files = [p for p in local.rglob("*") if p.is_file() and ".tmp" not in p.parts and p.name != ".lock"]

    def put(p: Path) -> None:
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(local)}", Body=p.read_bytes())

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, files))
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- measuring


def measure(args: list[str], env: dict[str, str], timeout: float) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        report = f.name
    full = {**os.environ, **env, "PYTHONPATH": str(REPO), "BENCH_MEASURE": report}
    full.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", MEASURE, *args],
        env=full,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"seconds": float("nan"), "error": f"over {timeout:.0f} s"}
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"seconds": seconds, "error": (err.strip().splitlines() or ["?"])[-1][:200]}
    got = json.loads(Path(report).read_text())
    os.unlink(report)
    return {
        "seconds": seconds,
        "main": got["main"],
        "read": got["socket"] if env else got["rchar"],
        "rss": got["rss"],
        "load": load,  # the 1-minute load average as it started
    }


def column_bytes(run: Path, column: str) -> int:
    """Compressed bytes of one column over the run's manifests (from their footers)."""
    total = 0
    for p in (run / "manifests").glob("*.parquet"):
        md = pq.ParquetFile(p).metadata
        i = md.schema.names.index(column)
        total += sum(md.row_group(g).column(i).total_compressed_size for g in range(md.num_row_groups))
    return total


def has_compact() -> bool:
    proc = subprocess.run(
        [sys.executable, "-m", "curation.cli", "compact", "--help"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
    )
    return proc.returncode == 0


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000x100,10000x100,100000x100", help="SHARDSxROWS,...")
    ap.add_argument("--commands", default=",".join(COMMANDS))
    ap.add_argument(
        "--s3", action="store_true", help="also upload each run to a moto S3 server and measure there"
    )
    ap.add_argument(
        "--s3-max-shards", type=int, default=10**9, help="upload only runs of at most this many shards"
    )
    ap.add_argument("--rounds", type=int, default=1, help="runs of each command (the median is printed)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one command may take")
    ap.add_argument("--keep", type=Path, help="build runs here and keep them (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="append one JSON line per measurement here")
    ap.add_argument(
        "--images",
        action="store_true",
        help=f"add an image run's columns ({', '.join(IMAGE_COLUMNS)}) with {EXACT_SHARE * 100:g}%% exact and "
        f"{NEAR_SHARE * 100:g}%% near duplicates, for dedup (runs named SHARDSxROWS-images)",
    )
    ap.add_argument("--no-compact", action="store_true", help="measure before compaction only")
    a = ap.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in a.sizes.split(",")]
    commands = a.commands.split(",")
    root = a.keep or Path(tempfile.mkdtemp(prefix="curate-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    compact = not a.no_compact and has_compact()
    moto = None
    targets: list[tuple[str, dict[str, str]]] = [("local", {})]
    if a.s3:
        moto, env = start_moto()
        targets.append(("s3", env))
    print(
        f"load average at start: {os.getloadavg()}; curate compact: "
        + ("skipped" if a.no_compact else "yes" if compact else "not here")
    )
    print(
        f"{'size':>14} {'where':>6} {'phase':>8} {'command':>12} {'seconds':>9} {'main s':>8} {'read MB':>9} {'peak MB':>8} {'load':>5} growth"
    )
    first: dict[tuple, float] = {}
    try:
        for shards, rows in sizes:
            name = f"{shards}x{rows}" + ("-images" if a.images else "")
            run = root / name
            if not (run / "run.json").exists():
                secs = build_run(run, shards, rows, images=a.images)
                size = sum(p.stat().st_size for p in (run / "manifests").glob("*.parquet"))
                print(
                    f"# built {name}: {shards * rows:,} rows, {mb(size)} MB of manifests, {secs:.0f} s",
                    flush=True,
                )
            print(f"# {name}: drop_reason compressed {mb(column_bytes(run, 'drop_reason'))} MB, "
                  f"caption_lang {mb(column_bytes(run, 'caption_lang'))} MB", flush=True)  # fmt: skip
            # A run compacted by an earlier invocation (--keep) is measured as it is: "compacted".
            already = (run / "manifests" / "compacted" / "index.json").exists()
            phases = ["compacted"] if already else ["before"] + (["compacted"] if compact else [])
            for phase in phases:
                if phase == "compacted" and not already:
                    t = measure(["compact", str(run)], {}, a.timeout)
                    print(f"# compact {name}: {t}", flush=True)
                for where, env in targets:
                    if where == "s3" and shards > a.s3_max_shards:
                        continue
                    url = str(run)
                    if where == "s3":
                        bucket = f"scale-{name}-{phase}".lower()
                        up = upload(run, env, bucket, "run")
                        url = f"s3://{bucket}/run"
                        print(f"# uploaded {name} to moto in {up:.0f} s", flush=True)
                    for command in commands:
                        got = [measure(COMMANDS[command](url, root), env, a.timeout) for _ in range(a.rounds)]
                        ok = [g for g in got if "error" not in g]
                        key = (where, phase, command)
                        if not ok:
                            print(f"{name:>14} {where:>6} {phase:>8} {command:>12} failed: {got[0]['error']}")
                            continue
                        sec = statistics.median(g["seconds"] for g in ok)
                        inproc = statistics.median(g["main"] for g in ok)
                        read = statistics.median(g["read"] for g in ok)
                        rss = max(g["rss"] for g in ok)
                        load = statistics.median(g["load"] for g in ok)
                        first.setdefault(key, sec)
                        print(
                            f"{name:>14} {where:>6} {phase:>8} {command:>12} {sec:>9.2f} {inproc:>8.2f} "
                            f"{mb(read):>9} {rss / 1e6:>8,.0f} {load:>5.1f} x{sec / first[key]:.2f}",
                            flush=True,
                        )
                        if a.json:
                            with open(a.json, "a") as f:
                                f.write(json.dumps({"size": name, "shards": shards, "rows": rows, "where": where,
                                                    "phase": phase, "command": command, "seconds": sec, "main": inproc,
                                                    "read": read, "rss": rss, "load": load}) + "\n")  # fmt: skip
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait()
        if a.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
