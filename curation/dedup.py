"""`curate dedup OUTPUT`: duplicate groups over a whole run, written beside its manifests.

Three kinds of duplicate link, each between two rows of the run (one row per uid):

- `exact`: the same image bytes (`sha256`) and the same caption after
  `clean_caption` (HTML entities, control characters and runs of space removed);
- `phash`: perceptual hashes (`phash` column) at most `radius` bits apart;
- `semantic`: SemDeDup on stored image embeddings (`clip_image_embedding`):
  spherical k-means, then within each cluster the pairs with cosine > 1 - eps.

A group is a connected component of all links (so A~B and B~C put A, B, C in
one group even if A and C are further apart). Within a group rows are ranked by
the representative rule: rows the pipeline kept first, then the highest
`clip_score`, then the largest original image (img2dataset's original width x
height, or `min_side`^2 x `aspect_ratio` from the image_size stage), then the
smallest uid; rank 0 is the representative (`dup_keep`). A rule's column that
the run lacks is skipped.

The algorithms (hash search, k-means, components, the representative rule) are in
`curation.near_duplicates`; this module reads the run, caches each step and writes the table.

Output, beside the run's manifests on the run's own storage (a local directory or
a URL such as s3://bucket/run), every object written atomically through
`curation.core.storage`, so readers never see half a table:

    OUTPUT/dedup/dedup.parquet   uid, dup_group, dup_rank, dup_keep, dup_kind: rows in a group of >= 2
    OUTPUT/dedup/dedup.json      parameters, the manifests it covers, counts per kind
    OUTPUT/dedup/.lock           held while `curate dedup` writes (one writer per run)

Rows absent from the table have no duplicate. `curate query` sees the table as
the view `dedup`; `curate select --dedup` keeps one row per group.

Resume: each step (exact, phash, k-means, each block of clusters) saves its
links as one object under `dedup/.work/<fingerprint>/` (on the run's storage, so
a dedup killed on one machine resumes on another); a killed run re-run with the
same manifests and parameters redoes only missing steps, and every step is
deterministic (seeded k-means), so the groups are the same.

Memory: the rows are read through `curate query`'s connection (only the columns
the links and the rule need; by byte range on an object store). DuckDB picks
each uid's row, orders them by uid and finds the sha256 values that repeat,
within its memory limit (`DUCKDB_MEMORY`, spilling to a private temp folder);
this process holds, for every row, its phash and the rule's columns (~34 bytes;
a row is its position in uid order: the uids of the rows in groups are read once
more at the end), the sha256 and caption of only the rows whose sha256 repeats,
and the arrays of the phash search (~130 bytes a row in all at its peak: 1.6 GB
at 10M rows, 4.2 GB at 30M, ~13 GB at 100M; docs/scale.md), plus the embeddings for semantic
(4 bytes a dimension a row).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from curation.core.outputs import exclusive_lock_on
from curation.core.params import param
from curation.core.storage import Store
from curation.near_duplicates import (
    RULE_COLUMNS,
    close_pairs,
    exact_pairs,
    near_pairs,
    rank_groups,
    spherical_kmeans,
)
from curation.rundir import RunDir

KINDS = ("exact", "phash", "semantic")  # strictest first: a row's dup_kind is its strictest link
TABLE = "dedup.parquet"
SUMMARY = "dedup.json"
WORK = ".work"  # the resumable steps, one folder per fingerprint
# DuckDB's share: it picks each uid's row, sorts by uid and counts sha256 values, spilling beyond this.
DUCKDB_MEMORY = "1GB"
BATCH_ROWS = 1 << 20  # rows fetched from DuckDB at a time


@dataclass(frozen=True)
class DedupParams:
    radius: int = param(6, ge=0, le=16, hint="bits; a larger radius links unrelated images at scale")
    eps: float = param(0.03, gt=0, lt=1)
    clusters: int | None = param(None, ge=1)  # null: about one cluster per 1,000 embeddings
    iterations: int = param(20, ge=1)
    seed: int = 0
    kinds: tuple[str, ...] = KINDS


class DedupError(Exception):
    pass


# ---------------------------------------------------------------------------- the pass


def run_dedup(
    output: str | Path,
    params: DedupParams,
    *,
    force: bool = False,
    say: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Compute (or resume) the duplicate table of a run; returns the summary written to dedup.json."""
    import duckdb

    from curation.query import Limits, NoManifests, connect

    run = RunDir(output)
    folder = run.store.child("dedup")
    try:
        con = connect(output, limits=Limits(memory=DUCKDB_MEMORY, timeout=None))
    except NoManifests as e:
        raise DedupError(str(e)) from None
    folder.makedirs()
    with exclusive_lock_on(folder, ".lock", f"another `curate dedup` is writing to {folder.url}"):
        done = run.ledger_state(verify=True).done  # what `connect` reads: trusted entries, manifests present
        manifests = [f"shard-{i:05d}.parquet" for i in sorted(done)]  # never uncommitted ones
        fingerprint = _fingerprint(params, done)
        if not force and folder.exists(TABLE) and folder.exists(SUMMARY):
            old = folder.get_json(SUMMARY)
            if old.get("fingerprint") == fingerprint:
                say("up to date (same manifests and parameters); --force recomputes")
                return old
        for stale in folder.list(WORK):
            if stale != fingerprint:
                _remove_folder(folder, f"{WORK}/{stale}")
        work = folder.child(f"{WORK}/{fingerprint}")
        work.makedirs()

        try:
            rows = _load(con, params.kinds)
        except duckdb.Error as e:
            raise DedupError(f"cannot read the manifests: {e}") from None
        n = rows.num_rows
        say(f"{n:,} rows from {len(manifests)} manifest(s)")
        links: list[tuple[np.ndarray, np.ndarray, int]] = []
        skipped: dict[str, str] = {}
        for code, kind in enumerate(KINDS):
            if kind not in params.kinds:
                continue
            need = {"exact": "sha256", "phash": "phash", "semantic": "clip_image_embedding"}[kind]
            if need not in rows.column_names:
                skipped[kind] = f"no {need} column"
                say(f"{kind}: skipped, the run has no {need} column")
                continue
            start = time.perf_counter()
            a, b = {"exact": _exact_links, "phash": _phash_links, "semantic": _semantic_links}[kind](
                rows, params, work, say
            )
            links.append((a, b, code))
            say(f"{kind}: {len(a):,} links ({time.perf_counter() - start:.1f} s)")

        table, counts = rank_groups(rows, links, KINDS)
        del rows, links
        try:
            table = _with_uids(con, table, n)
        except duckdb.Error as e:
            raise DedupError(f"cannot read the manifests: {e}") from None
        _put_parquet(table, folder, TABLE)
        summary = {
            "fingerprint": fingerprint,
            "params": asdict(params),
            "manifests": manifests,
            "run_in_progress": run.is_locked(),
            "rows": n,
            "rows_in_groups": table.num_rows,
            "groups": int(table.column("dup_keep").to_numpy(zero_copy_only=False).sum())
            if table.num_rows
            else 0,
            "rows_by_kind": counts,
            "skipped": skipped,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        folder.put_json(SUMMARY, summary)
        _remove_folder(folder, f"{WORK}/{fingerprint}")
        if folder.local:
            shutil.rmtree(folder.path(WORK), ignore_errors=True)  # now empty (object stores have no folders)
        return summary


def _fingerprint(params: DedupParams, done: dict[int, dict]) -> str:
    """Parameters and the exact manifests: each committed shard's ledger entry (written after its
    manifest, with the commit's time; a committed manifest is never rewritten), so no manifest is read."""
    entries = [[i, done[i]] for i in sorted(done)]
    blob = json.dumps({"params": asdict(params), "ledger": entries}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _remove_folder(store: Store, rel: str) -> None:
    """Remove the flat folder `rel` of the work cache (one fingerprint's steps)."""
    if store.local:
        shutil.rmtree(store.path(rel), ignore_errors=True)
        return
    for name in store.list(rel):
        store.remove(f"{rel}/{name}")


def _load(con: Any, kinds: tuple[str, ...]) -> pa.Table:
    """One row per uid (its first manifest row), in uid order, without the uid (`_with_uids` reads
    those of the rows in groups): the columns the links and the rule need. sha256 and caption are
    null where the sha256 does not repeat: the exact links look at no other row, and most rows'
    strings (~140 bytes a row) never leave DuckDB."""
    have = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    wanted = [c for c in RULE_COLUMNS if c in have or c == "keep"]
    exact = "exact" in kinds and "sha256" in have
    if exact:
        wanted += [c for c in ("sha256", "caption") if c in have]
    if "phash" in kinds and "phash" in have:
        wanted.append("phash")
    if "semantic" in kinds and "clip_image_embedding" in have:
        wanted.append("clip_image_embedding")
    wanted = list(dict.fromkeys(wanted))
    inner = ", ".join(f'"{c}"' for c in ["uid", *wanted])
    # A uid repeated in the input (the same url and caption twice) is one sample: its first row.
    firsts = f"SELECT {inner} FROM samples QUALIFY row_number() OVER (PARTITION BY uid ORDER BY shard) = 1"
    repeated = "sha256 IS NOT NULL AND count(*) OVER (PARTITION BY sha256) > 1"
    outer = [
        f'CASE WHEN {repeated} THEN "{c}" END AS "{c}"' if exact and c in ("sha256", "caption") else f'"{c}"'
        for c in wanted
    ]
    sql = f"SELECT {', '.join(outer)} FROM ({firsts}) ORDER BY uid"
    # Streamed: DuckDB's result is never held whole beside the Arrow table.
    return con.sql(sql).to_arrow_reader(BATCH_ROWS).read_all()


def _with_uids(con: Any, table: pa.Table, n: int) -> pa.Table:
    """`table` with the uid of each row in place of its position in uid order: the uids are read in
    that order once more, batch by batch, keeping those of the rows in groups only."""
    rows = table.column("row").to_numpy()
    wanted = np.unique(rows)
    parts, seen = [], 0
    reader = con.sql("SELECT uid FROM samples GROUP BY uid ORDER BY uid").to_arrow_reader(BATCH_ROWS)
    for batch in reader:
        lo, hi = np.searchsorted(wanted, [seen, seen + batch.num_rows])
        parts.append(batch.column(0).take(pa.array(wanted[lo:hi] - seen)))
        seen += batch.num_rows
    if seen != n:  # the connection's files are fixed when it opens: this is a bug, never a race
        raise DedupError(f"read {seen:,} uids, expected {n:,}")
    uids = pa.concat_arrays(parts) if parts else pa.array([], pa.string())
    return table.set_column(0, "uid", uids.take(pa.array(np.searchsorted(wanted, rows))))


# ---------------------------------------------------------------------------- links


def _cached(
    work: Store, name: str, compute: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """A step's links, from its object when a previous (killed) run finished it."""
    if work.exists(name):
        with np.load(io.BytesIO(work.get_bytes(name))) as f:
            return f["a"], f["b"]
    a, b = compute()
    buf = io.BytesIO()
    np.savez(buf, a=a, b=b)
    work.put_bytes(name, buf.getvalue())
    return a, b


def _exact_links(rows: pa.Table, params: DedupParams, work: Store, say) -> tuple[np.ndarray, np.ndarray]:
    def compute() -> tuple[np.ndarray, np.ndarray]:
        # `_load` left the sha256 only where it repeats: the rows exact_pairs would look at
        column = rows.column("sha256")
        repeated = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
        index = pa.array(repeated)
        a, b = exact_pairs(column.take(index), rows.column("caption").take(index))
        return repeated[a], repeated[b]

    return _cached(work, "exact.npz", compute)


def _phash_links(rows: pa.Table, params: DedupParams, work: Store, say) -> tuple[np.ndarray, np.ndarray]:
    def compute() -> tuple[np.ndarray, np.ndarray]:
        column = rows.column("phash")
        valid = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
        # drop the nulls first: an int64 column with nulls converts to float64, losing the low bits
        hashes = column.drop_null().to_numpy().astype(np.int64, copy=False)
        a, b = near_pairs(hashes, params.radius)
        return valid[a], valid[b]

    return _cached(work, "phash.npz", compute)


def _semantic_links(rows: pa.Table, params: DedupParams, work: Store, say) -> tuple[np.ndarray, np.ndarray]:
    column = rows.column("clip_image_embedding")
    valid = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
    if len(valid) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    flat = column.combine_chunks().take(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
    emb = flat.astype(np.float32).reshape(len(valid), -1)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    k = params.clusters or max(1, round(len(valid) / 1000))
    k = min(k, len(valid))

    if work.exists("kmeans.npy"):
        labels = np.load(io.BytesIO(work.get_bytes("kmeans.npy")))
    else:
        labels = spherical_kmeans(emb, k, params.iterations, params.seed)
        buf = io.BytesIO()
        np.save(buf, labels)
        work.put_bytes("kmeans.npy", buf.getvalue())
    say(f"semantic: k-means with {k:,} clusters over {len(valid):,} embeddings")

    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    a_parts, b_parts = [], []
    per_file = 256  # clusters per resumable step
    for first in range(0, k, per_file):

        def compute(first: int = first) -> tuple[np.ndarray, np.ndarray]:
            a, b = [], []
            for c in range(first, min(first + per_file, k)):
                members = order[bounds[c] : bounds[c + 1]]
                x, y = close_pairs(emb[members], 1.0 - params.eps)
                a.append(members[x])
                b.append(members[y])
            return np.concatenate(a), np.concatenate(b)

        a, b = _cached(work, f"semantic-{first:07d}.npz", compute)
        a_parts.append(valid[a])
        b_parts.append(valid[b])
    return np.concatenate(a_parts), np.concatenate(b_parts)


# ---------------------------------------------------------------------------- groups


def _put_parquet(table: pa.Table, store: Store, name: str) -> None:
    """Write `table` as `name` on `store`, atomically (a local file committed by the storage layer)."""
    import pyarrow.parquet as pq

    # Local: beside its final name (the commit is a rename); object stores: this machine's temp folder.
    folder = Path(store.path()) if store.local else store.staging()
    tmp = folder / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        pq.write_table(table, tmp, compression="zstd")
        store.put_file(tmp, name)
    finally:
        tmp.unlink(missing_ok=True)
