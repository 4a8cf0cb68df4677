"""`curate compact RUN`: a run's many shard manifests rewritten as a few large Parquet files.

A LAION-size run has ~232,000 manifests of ~1 MB; DuckDB and Arrow answer fastest over files of
hundreds of MB with row groups of 100k-1M rows. Compaction writes those, beside an index:

    manifests/compacted/part-<generation>-<k>-<random>.parquet   rows of many shards, in shard order
    manifests/compacted/index.json    the parts, the shards (and their row counts) each holds, and the
                                      files retired by earlier compactions, with when
    manifests/compacted/.lock         held while a compaction runs (one at a time per run)

Commit protocol (the same on local disk and object stores): every part is written completely
(rename; one PUT or a completed multipart upload), then the index, in one atomic write. The index is
the truth: readers (`curation.rundir.data_files`) read a shard from the part the index names, and
only shards no part holds from their own manifests, so every committed row is read exactly once,
before, during and after a compaction. A compaction killed at any moment leaves either the old index
(its parts not yet named are orphans, removed by the next compaction) or the new one.

Retirement: the manifests (and undersized earlier parts) the new index folds in are not removed at
once: a command that listed them before the commit may still be reading them. They are listed as
retired in the index and removed by a later compaction once `retain` seconds have passed (at once
with `retain=0`, when nothing else reads the run). Ledger entries are never touched: `curate status`
and resume read the ledger as before, and a run resumed after a compaction writes new shard
manifests that the next compaction folds in. Per-shard files other than the manifests (summaries)
are left as they are.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.core.storage import StorageError, Store
from curation.rundir import (
    COMPACTED_DIR,
    COMPACTED_INDEX,
    RunDir,
    compaction_index,
    data_files,
    exclusive_lock_on,
    shard_name,
)

PART_BYTES = 512 << 20  # a part is closed once it holds about this many bytes
ROW_GROUP_ROWS = 262_144  # rows per row group (DuckDB's guidance: 100k-1M)
RETAIN_SECONDS = 600.0  # retired files stay this long for commands that were already reading them
READ_BATCH = 16  # manifests fetched at once from an object store


class CompactError(Exception):
    """A run that cannot be compacted as asked (one line for the user)."""


@dataclass
class CompactResult:
    shards: int = 0  # shards folded into new parts by this compaction
    rows: int = 0
    parts: list[str] = field(default_factory=list)  # parts written
    retired: int = 0  # files retired by this compaction
    removed: int = 0  # retired files removed (their retention over)
    orphans: int = 0  # parts of killed compactions removed
    skipped: list[str] = field(default_factory=list)  # shards left as they are, and why


def compact(
    output: str | Path,
    *,
    part_bytes: int = PART_BYTES,
    row_group_rows: int = ROW_GROUP_ROWS,
    retain: float = RETAIN_SECONDS,
    storage_options: dict | None = None,
    say: Callable[[str], None] = lambda m: None,
) -> CompactResult:
    run = RunDir(output, storage_options)
    if not run.local:
        run.store.check()
    if not run.exists():
        raise CompactError(f"{output} has no run.json: not a `curate run` output")
    folder = run.manifest_store.child(COMPACTED_DIR)
    folder.makedirs()
    if folder.local:
        Path(folder.root).mkdir(parents=True, exist_ok=True)
    result = CompactResult()
    with exclusive_lock_on(folder, ".lock", f"another `curate compact` is compacting {run.root}"):
        index = compaction_index(run)
        _remove_orphans(folder, index, result)
        files = data_files(run, index)
        # Parts far below the target size (a compaction of a run in progress) are folded in again.
        small = [p for p in index["parts"] if p["bytes"] < part_bytes // 4]
        todo = sorted(files.singles)
        if len(small) < 2 and not todo:
            small = []
        if todo or small:
            generation = int(index["generation"]) + 1
            written = _write_parts(
                run, folder, small, todo, files.done, generation, part_bytes, row_group_rows, result, say
            )
            now = time.time()
            retired = [f"{COMPACTED_DIR}/{p['name']}" for p in small]
            retired += [
                f"{shard_name(i)}.parquet" for p in written for i, _ in p["shards"] if i not in files.covered
            ]
            keep = [p for p in index["parts"] if p not in small]
            index = {
                "version": 1,
                "generation": generation,
                "parts": keep + written,
                "retired": index.get("retired", []) + [{"name": n, "since": now} for n in retired],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            folder.put_json(COMPACTED_INDEX, index)  # the commit
            result.retired = len(retired)
        _purge(run, folder, index, retain, result)
    return result


def _remove_orphans(folder: Store, index: dict[str, Any], result: CompactResult) -> None:
    """Parts a killed compaction wrote but never committed, and its staged files."""
    named = {p["name"] for p in index["parts"]}
    named |= {r["name"].removeprefix(f"{COMPACTED_DIR}/") for r in index.get("retired", [])}
    orphans = [n for n in folder.list("") if n.startswith("part-") and n not in named]
    folder.remove_many(orphans)
    result.orphans = len(orphans)
    if folder.local:
        staging = folder.staging()
        for p in staging.iterdir():
            p.unlink(missing_ok=True)


def _purge(run: RunDir, folder: Store, index: dict[str, Any], retain: float, result: CompactResult) -> None:
    """Remove retired files whose retention is over; then the index stops listing them."""
    now = time.time()
    due = [r for r in index.get("retired", []) if now - float(r["since"]) >= retain]
    if not due:
        return
    run.manifest_store.remove_many([r["name"] for r in due])
    gone = {r["name"] for r in due}
    index["retired"] = [r for r in index["retired"] if r["name"] not in gone]
    folder.put_json(COMPACTED_INDEX, index)
    result.removed = len(due)


def _sources(
    run: RunDir, small: list[dict], todo: list[str], done: dict[int, dict], result: CompactResult
) -> Iterator[tuple[list[tuple[int, int]], pa.Table]]:
    """(shards and their rows, table) of each earlier small part, then of each single manifest, in order;
    a manifest whose row count disagrees with its ledger entry, or that is missing, is left out."""
    for p in small:
        table = _read(run.manifest_store, f"{COMPACTED_DIR}/{p['name']}")
        yield [(int(i), int(n)) for i, n in p["shards"]], table
    for first in range(0, len(todo), READ_BATCH):
        batch = todo[first : first + READ_BATCH]
        got = (
            {n: None for n in batch}
            if run.manifest_store.local
            else run.manifest_store.get_many(batch)  # concurrent GETs
        )
        for name in batch:
            index = int(name.removeprefix("shard-").removesuffix(".parquet"))
            if name not in got:
                result.skipped.append(f"{name}: missing (its ledger entry says done)")
                continue
            try:
                data = got[name]
                table = (
                    pq.read_table(Path(run.manifest_store.path(name)))
                    if data is None
                    else pq.read_table(io.BytesIO(data))
                )
            except FileNotFoundError:
                result.skipped.append(f"{name}: missing (its ledger entry says done)")
                continue
            except (OSError, pa.ArrowInvalid) as e:
                result.skipped.append(f"{name}: unreadable ({' '.join(str(e).split())[:120]})")
                continue
            rows = done.get(index, {}).get("rows")
            if rows is not None and rows != table.num_rows:
                result.skipped.append(f"{name}: {table.num_rows} rows, its ledger entry says {rows}")
                continue
            yield [(index, table.num_rows)], table


def _read(store: Store, rel: str) -> pa.Table:
    if store.local:
        return pq.read_table(Path(store.path(rel)))
    return pq.read_table(io.BytesIO(store.get_bytes(rel)))


def _write_parts(
    run: RunDir,
    folder: Store,
    small: list[dict],
    todo: list[str],
    done: dict[int, dict],
    generation: int,
    part_bytes: int,
    row_group_rows: int,
    result: CompactResult,
    say: Callable[[str], None],
) -> list[dict]:
    """Write the sources into parts of about `part_bytes`, each committed whole; their index entries."""
    written: list[dict] = []
    part: _Part | None = None
    for shards, table in _sources(run, small, todo, done, result):
        if part is not None and (part.schema != table.schema or part.bytes() >= part_bytes):
            written.append(part.commit())
            say(f"part {written[-1]['name']}: {written[-1]['rows']:,} rows")
            part = None
        if part is None:
            part = _Part(folder, generation, len(written), table.schema, row_group_rows)
        part.add(shards, table)
        result.shards += len(shards)
        result.rows += table.num_rows
    if part is not None:
        written.append(part.commit())
        say(f"part {written[-1]['name']}: {written[-1]['rows']:,} rows")
    result.parts = [p["name"] for p in written]
    return written


class _Part:
    """One part being written to a local staging file, in row groups of `row_group_rows`."""

    def __init__(
        self, folder: Store, generation: int, k: int, schema: pa.Schema, row_group_rows: int
    ) -> None:
        self.folder = folder
        self.name = f"part-{generation:06d}-{k:05d}-{uuid.uuid4().hex[:8]}.parquet"
        self.tmp = folder.staging() / f".{self.name}.{os.getpid()}.tmp"
        self.schema = schema
        self.row_group_rows = row_group_rows
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0
        self.shards: list[list[int]] = []

    def add(self, shards: list[tuple[int, int]], table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.shards += [[i, n] for i, n in shards]
        if self.pending_rows >= self.row_group_rows:
            self._flush(whole_groups=True)

    def _flush(self, whole_groups: bool) -> None:
        table = pa.concat_tables(self.pending)
        n = (table.num_rows // self.row_group_rows) * self.row_group_rows if whole_groups else table.num_rows
        if n:
            self.writer.write_table(table.slice(0, n), row_group_size=self.row_group_rows)
            self.rows += n
        rest = table.slice(n)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows = rest.num_rows

    def bytes(self) -> int:
        return self.tmp.stat().st_size

    def commit(self) -> dict:
        if self.pending_rows:
            self._flush(whole_groups=False)
        self.writer.close()
        size = self.tmp.stat().st_size
        try:
            self.folder.put_file(self.tmp, self.name)
        except StorageError:
            self.tmp.unlink(missing_ok=True)
            raise
        return {"name": self.name, "rows": self.rows, "bytes": size, "shards": self.shards}
