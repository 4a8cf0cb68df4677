"""Bytes a question fetches from S3, before and after `curate compact` (issue 24): target <= 1.5x the
compressed size of the columns it reads; and the wall time and peak memory of a few commands.

    python bench/query_bytes.py                   # 1M rows in 100 shards, a few minutes
    python bench/query_bytes.py --rows 200000 --shards 20

Manifests with the caption pipeline's columns (bench/query_speed.py's writer: the 1,000 real LAION
captions cycled, random scores), a run.json and ledger, on local disk and uploaded to a moto S3 server
on 127.0.0.1. Bytes fetched are counted by curate's range cache (every ranged GET it makes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.query_speed import write_manifests  # noqa: E402

ONE_COLUMN = "SELECT caption_complexity, count(*) FROM samples GROUP BY 1 ORDER BY 1"
COLUMN = "caption_complexity"


def column_bytes(files: list[Path], column: str) -> int:
    total = 0
    for f in files:
        meta = pq.ParquetFile(f).metadata
        i = meta.schema.names.index(column)
        total += sum(meta.row_group(g).column(i).total_compressed_size for g in range(meta.num_row_groups))
    return total


def question(url: str) -> tuple[float, int, int]:
    """(seconds, bytes fetched, bytes served from the cache) of ONE_COLUMN from a fresh connection."""
    from curation import query

    t = time.perf_counter()
    con = query.connect(url)
    con.execute(ONE_COLUMN).fetchall()
    cache = query._caches[-1]
    return time.perf_counter() - t, cache.fetched, cache.served


def peak_rss(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of `curate ARGV` in a child process."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "curation.cli", *argv], cwd=REPO, stdout=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, argv
    return time.perf_counter() - t, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=100)
    args = ap.parse_args()
    from curation.sources.base import Shard
    from tests.s3server import S3Server

    with tempfile.TemporaryDirectory() as d:
        os.environ["CURATE_CACHE_DIR"] = f"{d}/cache"
        root = Path(d) / "run"
        write_manifests(root, args.rows, args.shards)
        per = args.rows // args.shards
        plan = [Shard(i, "synthetic.parquet", i * per, (i + 1) * per).to_json() for i in range(args.shards)]
        (root / "run.json").write_text(json.dumps({"shards": plan, "stages": []}))
        server = S3Server()
        server.start()
        os.environ.update(server.env)
        client = server.client()
        client.create_bucket(Bucket="bench")
        for p in root.rglob("*"):
            if p.is_file():
                client.upload_file(str(p), "bench", f"run/{p.relative_to(root)}")
        url = "s3://bench/run"
        print(f"{args.rows:,} rows in {args.shards} manifests; question: {ONE_COLUMN}", flush=True)

        manifests = sorted((root / "manifests").glob("shard-*.parquet"))
        col = column_bytes(manifests, COLUMN)
        size = sum(p.stat().st_size for p in manifests)
        s, fetched, _ = question(url)
        print(
            f"S3, {args.shards} manifests: {s:.2f} s, fetched {fetched:,} B = {fetched / col:.2f}x the "
            f"column's {col:,} B compressed (run: {size:,} B)",
            flush=True,
        )
        sec, mb = peak_rss(
            ["select", str(root), "--where", "keep", "--uids-only", "--out", f"{d}/u1.parquet"]
        )
        print(
            f"local select --uids-only, {args.shards} manifests: {sec:.2f} s, peak RSS {mb:.0f} MB",
            flush=True,
        )

        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "curation.cli", "compact", url, "--retain", "0"],
            check=True,
            cwd=REPO,
            capture_output=True,
        )
        print(f"curate compact on S3: {time.perf_counter() - t:.2f} s", flush=True)
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "curation.cli", "compact", str(root), "--retain", "0"],
            check=True,
            cwd=REPO,
            capture_output=True,
        )
        print(f"curate compact on local disk: {time.perf_counter() - t:.2f} s", flush=True)
        parts = sorted((root / "manifests" / "compacted").glob("part-*.parquet"))
        col = column_bytes(parts, COLUMN)
        size = sum(p.stat().st_size for p in parts)
        s, fetched, _ = question(url)
        print(
            f"S3, compacted ({len(parts)} file(s)): {s:.2f} s, fetched {fetched:,} B = {fetched / col:.2f}x the "
            f"column's {col:,} B compressed (run: {size:,} B)",
            flush=True,
        )
        s, fetched2, served = question(url)
        print(
            f"S3, compacted, the question again (new connection): {s:.2f} s, fetched {fetched2:,} B, "
            f"{served:,} B from the local cache",
            flush=True,
        )
        sec, mb = peak_rss(
            ["select", str(root), "--where", "keep", "--uids-only", "--out", f"{d}/u2.parquet"]
        )
        print(f"local select --uids-only, compacted: {sec:.2f} s, peak RSS {mb:.0f} MB", flush=True)
        server.stop()


if __name__ == "__main__":
    main()
