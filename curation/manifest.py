"""Run directories: atomic shard writes, the ledger, the run record, resume.

Layout of an output directory:

    run.json                   config fingerprint + hash, schema version, shard plan
    manifests/shard-00000.parquet   one file per finished shard (never rewritten)
    manifests/.tmp/            shards being written; renamed into place when complete
    ledger/shard-00000.json    written after the rename: the shard is done
    ledger/shard-00000.failed.json  last failure of a shard; removed when it succeeds
    .lock                      held by the driver of a run

The ledger entry is the truth about "done". A manifest file without a ledger
entry (a crash between rename and ledger write) is verified and adopted, not
rewritten, so a finished shard file is never written twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.schema import SCHEMA_VERSION, TRANSIENT_COLUMNS
from curation.sources.base import Shard


class RunConflict(Exception):
    """The output directory belongs to a run with a different, result-changing config."""


class RunLocked(Exception):
    """Another driver is writing to this output directory."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def exclusive_lock(path: Path, held_message: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (released if the process dies); RunLocked(held_message) if taken."""
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(held_message) from None
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class ShardResult:
    shard: int
    rows: int
    kept: int
    drop_reasons: dict[str, int]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


class RunDir:
    def __init__(self, output: str | os.PathLike) -> None:
        self.root = Path(output)
        self.manifests = self.root / "manifests"
        self.ledger = self.root / "ledger"
        self.tmp = self.manifests / ".tmp"

    # ------------------------------------------------------------------ run record
    @property
    def record_path(self) -> Path:
        return self.root / "run.json"

    def exists(self) -> bool:
        return self.record_path.exists()

    def record(self) -> dict[str, Any]:
        return json.loads(self.record_path.read_text())

    def plan(self) -> list[Shard]:
        return [Shard.from_json(s) for s in self.record()["shards"]]

    def prepare(
        self, fingerprint: dict, config_hash: str, plan: list[Shard], stage_names: list[str]
    ) -> list[Shard]:
        """Create the run record, or check that it matches; returns the plan to execute.

        On resume the stored plan wins, so adding files to an input glob does not
        silently reshuffle which rows belong to which shard.
        """
        for d in (self.root, self.manifests, self.ledger, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        if self.exists():
            problem = self.conflict(fingerprint, config_hash)
            if problem:
                raise RunConflict(problem)
            return self.plan()
        write_json_atomic(
            self.record_path,
            {
                "schema_version": SCHEMA_VERSION,
                "config_hash": config_hash,
                "fingerprint": fingerprint,
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
        if old_hash != config_hash:
            return explain_conflict(self.root, old_fingerprint, fingerprint)
        if rec.get("schema_version") != SCHEMA_VERSION:
            return (
                f"{self.root} was written with manifest schema v{rec.get('schema_version')}, "
                f"this version writes v{SCHEMA_VERSION}; choose a new --output"
            )
        return None

    def lock(self) -> contextlib.AbstractContextManager[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        return exclusive_lock(self.root / ".lock", f"another `curate run` is writing to {self.root}")

    def is_locked(self) -> bool:
        path = self.root / ".lock"
        if not path.exists():
            return False
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
        return False

    # ------------------------------------------------------------------ shards
    def manifest_path(self, index: int) -> Path:
        return self.manifests / f"{shard_name(index)}.parquet"

    def done(self) -> dict[int, dict]:
        out = {}
        for p in self.ledger.glob("shard-*.json"):
            if p.name.endswith(".failed.json"):
                continue
            entry = json.loads(p.read_text())
            out[entry["shard"]] = entry
        return out

    def failures(self) -> dict[int, dict]:
        out = {}
        for p in self.ledger.glob("shard-*.failed.json"):
            entry = json.loads(p.read_text())
            out[entry["shard"]] = entry
        return out

    def pending(self, plan: list[Shard]) -> list[Shard]:
        done = self.done()
        todo = []
        for shard in plan:
            if shard.index in done:
                continue
            if self._adopt(shard):
                continue
            todo.append(shard)
        return todo

    def _adopt(self, shard: Shard) -> bool:
        """A complete manifest without a ledger entry: record it instead of redoing it."""
        path = self.manifest_path(shard.index)
        if not path.exists():
            return False
        try:
            table = pq.read_table(path, columns=["keep", "drop_reason"])
        except Exception:
            return False  # unreadable: the shard is redone and the file replaced
        if shard.row_end >= 0 and table.num_rows != shard.rows:
            return False
        self.commit_ledger(summarise(table, shard.index, seconds=0.0))
        return True

    def clean_tmp(self) -> None:
        """Remove partial files of killed runs (only while holding the lock)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def commit_ledger(self, result: ShardResult) -> None:
        write_json_atomic(self.ledger / f"{shard_name(result.shard)}.json", result.to_json())
        with contextlib.suppress(FileNotFoundError):
            (self.ledger / f"{shard_name(result.shard)}.failed.json").unlink()

    def record_failure(self, index: int, error: str) -> None:
        write_json_atomic(
            self.ledger / f"{shard_name(index)}.failed.json",
            {"shard": index, "error": error, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        )

    def writer(self, index: int, schema: pa.Schema) -> ShardWriter:
        return ShardWriter(self, index, schema)


class ShardWriter:
    """Streams batches of one shard into a temporary file; `commit` renames it into place."""

    def __init__(self, run: RunDir, index: int, schema: pa.Schema) -> None:
        self.run = run
        self.index = index
        self.schema = schema
        self.final = run.manifest_path(index)
        # Unique per writer: a retried task (Ray) never shares a temp file with a zombie attempt.
        self.tmp = run.tmp / f"{shard_name(index)}.{os.getpid()}.{time.monotonic_ns()}.parquet"
        self._writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
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
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.final)
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


def summarise(table: pa.Table, index: int, seconds: float) -> ShardResult:
    kept = int(pc.sum(table.column("keep")).as_py() or 0)
    return ShardResult(index, table.num_rows, kept, _count_reasons(table), seconds)


def explain_conflict(root: Path, old: dict, new: dict) -> str:
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
