"""Run directories on the storage layer (curation.core.storage): shard commits, the ledger, the run record.

Layout of an output (a local directory or a URL such as s3://bucket/run):

    run.json                        config fingerprint + hash, schema version, shard plan
    manifests/shard-00000.parquet   one object per finished shard
    manifests/.tmp/                 local outputs only: shards being written, renamed into place
    ledger/shard-00000.json         written after the shard's object: the shard is done
    ledger/shard-00000.failed.json  last failure of a shard; removed when it succeeds
    ledger/done.jsonl               the done entries folded into one object (fewer reads at scale)
    .lock                           held by the driver of a run

Commit protocol, the same on every store: the shard's manifest object is written
completely (rename on local disk, one PUT or a completed multipart upload on an
object store), then its ledger entry. The ledger entry is the truth about "done":
a manifest without one is never trusted (it may be a killed attempt's) and is
rewritten when the run resumes; readers (`query`, `stats`, `report`) read only
manifests that have a ledger entry.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.core.storage import LockHeld, Store, is_url, open_store
from curation.schema import SCHEMA_VERSION, TRANSIENT_COLUMNS
from curation.sources.base import Shard

LEDGER_ENTRY = re.compile(r"shard-(\d+)\.json$")
FAILED_ENTRY = re.compile(r"shard-(\d+)\.failed\.json$")
FOLDED = "done.jsonl"


class RunConflict(Exception):
    """The output directory belongs to a run with a different, result-changing config."""


class RunLocked(LockHeld):
    """Another driver is writing to this output directory."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def write_json_atomic(path: Path, data: Any) -> None:
    open_store(path.parent).put_json(path.name, data)


def exclusive_lock(path: Path, held_message: str) -> contextlib.AbstractContextManager[None]:
    """Hold `path` as a lock on its store; RunLocked(held_message) if a live process holds it."""
    return exclusive_lock_on(open_store(path.parent), path.name, held_message)


@dataclass
class ShardResult:
    shard: int
    rows: int
    kept: int
    drop_reasons: dict[str, int]
    seconds: float
    finished: float | None = None  # unix time of the commit

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


class RunDir:
    def __init__(self, output: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
        self.store: Store = open_store(output, storage_options)
        self.storage_options = dict(storage_options or {})
        # Local outputs keep their Path (callers build paths under it); URLs stay as written.
        self.root: Path | str = self.store.url if is_url(output) else Path(output)
        self.manifest_store = self.store.child("manifests")
        self.ledger_store = self.store.child("ledger")

    @property
    def local(self) -> bool:
        return self.store.local

    @property
    def manifests(self) -> Path:
        return Path(self.manifest_store.root)

    @property
    def ledger(self) -> Path:
        return Path(self.ledger_store.root)

    @property
    def tmp(self) -> Path:
        return self.manifest_store.staging()

    # ------------------------------------------------------------------ run record
    @property
    def record_path(self) -> str:
        return self.store.url_of("run.json")

    def exists(self) -> bool:
        return self.store.exists("run.json")

    def record(self) -> dict[str, Any]:
        return self.store.get_json("run.json")

    def plan(self) -> list[Shard]:
        return [Shard.from_json(s) for s in self.record()["shards"]]

    def prepare(
        self,
        fingerprint: dict,
        config_hash: str,
        plan: list[Shard],
        stage_names: list[str],
        *,
        limit: int | None = None,
    ) -> list[Shard]:
        """Create the run record, or check that it matches; returns the plan to execute.

        On resume the stored plan wins, so adding files to an input glob does not
        silently reshuffle which rows belong to which shard. A run made with `--limit`
        resumed with a larger limit (or none) is extended: its shards stay as they are
        (done ones are not redone) and new shards cover the rows they leave out.
        """
        self.store.makedirs()
        if self.local:
            for d in (self.manifests, self.ledger, self.tmp):
                d.mkdir(parents=True, exist_ok=True)
        if self.exists():
            problem = self.conflict(fingerprint, config_hash)
            if problem:
                raise RunConflict(problem)
            rec = self.record()
            stored = self.plan()
            old_limit = rec.get("limit", rec["fingerprint"].get("limit"))  # older records kept it there
            if old_limit is None or (limit is not None and limit <= old_limit):
                return stored
            extended = extend_plan(stored, plan)
            self.store.put_json(
                "run.json", {**rec, "limit": limit, "shards": [s.to_json() for s in extended]}
            )
            return extended
        self.store.put_json(
            "run.json",
            {
                "schema_version": SCHEMA_VERSION,
                "config_hash": config_hash,
                "fingerprint": fingerprint,
                "limit": limit,
                "stages": stage_names,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "shards": [s.to_json() for s in plan],
            },
        )
        return plan

    def conflict(self, fingerprint: dict, config_hash: str) -> str | None:
        """Why this output cannot take a run with this fingerprint (None: it can, or it holds no run)."""
        if not self.exists():
            return None
        try:
            rec = self.record()
            old_hash, old_fingerprint = rec["config_hash"], rec["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{self.record_path} is unreadable ({type(e).__name__}): choose a new output"
        # Records written before --limit left the fingerprint hold it there: compare without it.
        if old_hash != config_hash and _without_limit(old_fingerprint) != _without_limit(fingerprint):
            return explain_conflict(self.root, _without_limit(old_fingerprint), _without_limit(fingerprint))
        if rec.get("schema_version") != SCHEMA_VERSION:
            return (
                f"{self.root} was written with manifest schema v{rec.get('schema_version')}, "
                f"this version writes v{SCHEMA_VERSION}; choose a new --output"
            )
        return None

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return exclusive_lock_on(self.store, ".lock", f"another `curate run` is writing to {self.root}")

    def is_locked(self) -> bool:
        return self.store.is_locked(".lock")

    # ------------------------------------------------------------------ ledger
    def manifest_path(self, index: int) -> str:
        """The committed manifest of shard `index`, as a local path or URL."""
        return self.manifest_store.url_of(f"{shard_name(index)}.parquet")

    def _ledger_names(self) -> list[str]:
        return self.ledger_store.list("")

    def _folded(self, names: list[str]) -> dict[int, dict]:
        if FOLDED not in names:
            return {}
        out = {}
        for line in self.ledger_store.get_bytes(FOLDED).decode().splitlines():
            if line.strip():
                entry = json.loads(line)
                out[entry["shard"]] = entry
        return out

    def done_indices(self) -> set[int]:
        """Shards with a ledger entry: one listing of ledger/, no reads of the entries."""
        names = self._ledger_names()
        return {int(m.group(1)) for n in names if (m := LEDGER_ENTRY.fullmatch(n))} | set(self._folded(names))

    def done(self) -> dict[int, dict]:
        names = self._ledger_names()
        out = self._folded(names)
        missing = [n for n in names if (m := LEDGER_ENTRY.fullmatch(n)) and int(m.group(1)) not in out]
        for data in self.ledger_store.get_many(missing).values():
            entry = json.loads(data)
            out[entry["shard"]] = entry
        return out

    def committed(self, index: int) -> dict | None:
        """The ledger entry of shard `index`, if it is done."""
        try:
            return self.ledger_store.get_json(f"{shard_name(index)}.json")
        except (FileNotFoundError, ValueError):
            return None

    def failures(self) -> dict[int, dict]:
        names = [n for n in self._ledger_names() if FAILED_ENTRY.fullmatch(n)]
        out = {}
        for data in self.ledger_store.get_many(names).values():
            entry = json.loads(data)
            out[entry["shard"]] = entry
        return out

    def pending(self, plan: list[Shard]) -> list[Shard]:
        done = self.done_indices()
        return [shard for shard in plan if shard.index not in done]

    def fold_ledger(self, known: list[dict] | None = None) -> None:
        """Write every done entry into ledger/done.jsonl (one object), so readers make one request, not one
        per shard. `known`: entries the caller already holds (what this run committed), not read again.
        The single entries stay the truth: the folded object only ever lists committed shards (driver,
        under the lock).
        """
        names = self._ledger_names()
        entries = self._folded(names)
        before = len(entries)
        entries.update({e["shard"]: e for e in known or []})
        missing = [n for n in names if (m := LEDGER_ENTRY.fullmatch(n)) and int(m.group(1)) not in entries]
        for data in self.ledger_store.get_many(missing).values():
            entry = json.loads(data)
            entries[entry["shard"]] = entry
        if len(entries) - before < 64:
            return  # a few single entries cost readers little; not worth rewriting the folded object
        lines = "".join(json.dumps(entries[k], default=str) + "\n" for k in sorted(entries))
        self.ledger_store.put_bytes(FOLDED, lines.encode())

    def clean_tmp(self) -> None:
        """Remove partial files of killed runs (only while holding the lock)."""
        if self.local:
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True, exist_ok=True)

    def commit_ledger(self, result: ShardResult) -> None:
        if result.finished is None:
            result.finished = time.time()
        self.ledger_store.put_json(f"{shard_name(result.shard)}.json", result.to_json())
        self.ledger_store.remove(f"{shard_name(result.shard)}.failed.json")

    def record_failure(self, index: int, error: str) -> None:
        self.ledger_store.put_json(
            f"{shard_name(index)}.failed.json",
            {"shard": index, "error": error, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        )

    def committed_manifests(self) -> list[str]:
        """Names (shard-NNNNN.parquet) of the manifests readers may see: those with a ledger entry."""
        return [f"{shard_name(i)}.parquet" for i in sorted(self.done_indices())]

    def writer(self, index: int, schema: pa.Schema) -> ShardWriter:
        return ShardWriter(self, index, schema)


@contextlib.contextmanager
def exclusive_lock_on(store: Store, rel: str, held_message: str) -> Iterator[None]:
    try:
        with store.lock(rel, held_message):
            yield
    except LockHeld as e:
        if isinstance(e, RunLocked):
            raise
        raise RunLocked(str(e)) from None


class ShardWriter:
    """Streams batches of one shard into a local staging file; `commit` puts it in place, then the ledger entry."""

    def __init__(self, run: RunDir, index: int, schema: pa.Schema) -> None:
        self.run = run
        self.index = index
        self.schema = schema
        # Unique per writer: a retried task (Ray) never shares a temp file with a zombie attempt.
        self.tmp = run.tmp / f"{shard_name(index)}.{os.getpid()}.{time.monotonic_ns()}.parquet"
        try:
            self._writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        except BaseException:  # a full disk: the file may exist, the writer does not
            self.tmp.unlink(missing_ok=True)
            raise
        self.rows = 0
        self.kept = 0
        self.reasons: dict[str, int] = {}
        self.started = time.perf_counter()

    def write(self, table: pa.Table) -> None:
        table = to_manifest(table, self.schema)
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.rows += table.num_rows
        self.kept += int(pc.sum(table.column("keep")).as_py() or 0)
        for reason, n in _count_reasons(table).items():
            self.reasons[reason] = self.reasons.get(reason, 0) + n

    def commit(self) -> ShardResult:
        self._writer.close()
        self.run.manifest_store.put_file(self.tmp, f"{shard_name(self.index)}.parquet")
        result = ShardResult(
            self.index, self.rows, self.kept, self.reasons, time.perf_counter() - self.started
        )
        self.run.commit_ledger(result)
        return result

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


def to_manifest(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Drop transient columns and cast to the manifest schema (same names, same order)."""
    table = table.drop_columns([c for c in table.column_names if c in TRANSIENT_COLUMNS])
    return table.select(schema.names).cast(schema)


def _count_reasons(table: pa.Table) -> dict[str, int]:
    counts = pc.value_counts(table.column("drop_reason").drop_null()).to_pylist()
    return {c["values"]: c["counts"] for c in counts}


def extend_plan(stored: list[Shard], wanted: list[Shard]) -> list[Shard]:
    """`stored`, then new shards (numbered after it) for the rows of `wanted` that no stored shard covers."""
    covered: dict[str, list[tuple[int, float]]] = {}
    for s in stored:
        covered.setdefault(s.path, []).append((s.row_start, s.row_end if s.row_end >= 0 else float("inf")))
    out = list(stored)
    next_index = max((s.index for s in stored), default=-1) + 1

    def add(path: str, start: int, end: int) -> None:
        nonlocal next_index
        out.append(Shard(next_index, path, start, end))
        next_index += 1

    for s in wanted:
        start, end = s.row_start, (s.row_end if s.row_end >= 0 else float("inf"))
        for lo, hi in sorted(covered.get(s.path, [])):
            if hi <= start or lo >= end:
                continue
            if lo > start:
                add(s.path, start, int(lo))
            start = max(start, hi)
        if start < end:
            add(s.path, int(start), s.row_end if end == float("inf") else int(end))
    return out


def _without_limit(fingerprint: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in fingerprint.items() if k != "limit"}, default=str))


def explain_conflict(root: Path | str, old: dict, new: dict) -> str:
    diffs = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{key}[{i}]")
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")

    walk(old, new, "")
    return (
        f"{root} holds a run made with a different config, which would change results:\n    "
        + "\n    ".join(diffs[:10])
        + "\nChoose a new output (--output DIR), or restore the original config to resume."
    )
