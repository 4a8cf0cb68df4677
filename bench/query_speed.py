"""`curate query`'s locked-down connection vs the plain one it replaced (issue 11): as fast?

    python bench/query_speed.py                  # 1M manifest rows in 20 shards, ~1 minute
    python bench/query_speed.py --rows 200000    # quicker

Input: manifests with the caption pipeline's columns, written once into a temp dir; the
captions are the 1,000 real LAION captions bundled in data/, cycled; the scores random.

  plain   what `curate query` ran before: an in-memory DuckDB, a view over the manifests' glob
  locked  `curation.query.connect` + `select_statement` (allowed_paths = the manifest files,
          external access off, no extensions, configuration locked; the statement checked)

Each query runs from a fresh connection (connect + execute + fetch all rows), both ways in
alternating order, for --rounds rounds. Prints the median seconds and the median of the
per-round ratios locked / plain. Target: about 1.0 (no slower than before).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation.query import connect, select_statement  # noqa: E402

QUERIES = {
    "count+filter": "SELECT count(*) FROM samples WHERE caption_complexity >= 3 AND caption_actions >= 1",
    "group by": "SELECT drop_reason, count(*) FROM samples GROUP BY 1 ORDER BY 2 DESC",
    "captions limit": "SELECT caption, caption_complexity FROM samples WHERE caption_actions >= 2 LIMIT 1000",
    "kept uids sorted": "SELECT uid FROM samples WHERE keep ORDER BY uid",
}


def write_manifests(root: Path, rows: int, shards: int) -> None:
    captions = pq.read_table(REPO / "data" / "laion_captions_1k.parquet").column("TEXT").to_pylist()
    rng = np.random.default_rng(0)
    (root / "manifests").mkdir(parents=True)
    per = rows // shards
    for s in range(shards):
        complexity = rng.integers(0, 8, per).astype(np.int32)
        actions = rng.integers(0, 3, per).astype(np.int32)
        keep = (complexity >= 2) & (actions >= 1)
        reason = np.where(complexity < 2, "complexity", np.where(actions < 1, "action", None))
        t = pa.table(
            {
                "uid": [f"{s:04x}{i:028x}" for i in range(per)],
                "shard": pa.array(np.full(per, s, np.int32)),
                "url": [f"https://example.com/{s}/{i}.jpg" for i in range(per)],
                "caption": [captions[i % len(captions)] for i in range(per)],
                "caption_complexity": complexity,
                "caption_actions": actions,
                "caption_verbs": rng.integers(0, 4, per).astype(np.int32),
                "caption_tokens": rng.integers(1, 40, per).astype(np.int32),
                "caption_status": ["ok"] * per,
                "keep": keep,
                "drop_reason": pa.array(reason.tolist(), pa.string()),
                "drop_stage": pa.array(
                    [None if r is None else f"caption_{r}" for r in reason.tolist()], pa.string()
                ),
            }
        )
        pq.write_table(t, root / "manifests" / f"shard-{s:05d}.parquet", compression="zstd")
        # Its ledger entry commits the shard (curate reads only committed manifests).
        (root / "ledger").mkdir(exist_ok=True)
        entry = {"shard": s, "rows": per, "kept": int(keep.sum())}
        (root / "ledger" / f"shard-{s:05d}.json").write_text(json.dumps(entry))


def plain(root: Path, sql: str) -> int:
    """The connection `curate query` used before the lockdown (main at 6756e3d)."""
    con = duckdb.connect()
    glob = str(root / "manifests" / "shard-*.parquet").replace("'", "''")
    con.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet('{glob}', union_by_name = true)")
    return len(con.execute(sql).fetchall())


def locked(root: Path, sql: str) -> int:
    con = connect(root)
    return len(con.execute(select_statement(sql)).fetchall())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "run"
        write_manifests(root, args.rows, args.shards)
        print(f"{args.rows:,} manifest rows in {args.shards} shards; {args.rounds} rounds", flush=True)
        all_ratios = []
        for name, sql in QUERIES.items():
            assert plain(root, sql) == locked(root, sql)  # same answer (also warms the page cache)
            times: dict[str, list[float]] = {"plain": [], "locked": []}
            for r in range(args.rounds):
                order = (("plain", plain), ("locked", locked))
                for label, fn in order if r % 2 == 0 else order[::-1]:
                    t = time.perf_counter()
                    fn(root, sql)
                    times[label].append(time.perf_counter() - t)
            ratios = [b / a for a, b in zip(times["plain"], times["locked"])]
            all_ratios += ratios
            print(
                f"{name:18s} plain {statistics.median(times['plain']):.3f} s  "
                f"locked {statistics.median(times['locked']):.3f} s  "
                f"locked/plain {statistics.median(ratios):.3f}x",
                flush=True,
            )
        print(f"all queries: median locked/plain {statistics.median(all_ratios):.3f}x (target ~1.0)")


if __name__ == "__main__":
    main()
