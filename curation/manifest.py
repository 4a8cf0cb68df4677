"""Run directories on the storage layer (curation.core.storage): shard commits, the ledger, the run record.

Layout of an output (a local directory or a URL such as s3://bucket/run):

    run.json                        config fingerprint + hash, schema version, shard plan
    manifests/shard-00000.parquet   one object per finished shard
    manifests/.tmp/                 local outputs only: shards being written, renamed into place
    ledger/shard-00000.json         written after the shard's object: the shard is done
    ledger/shard-00000.failed.json  last failure of a shard; removed when it succeeds
    ledger/folded/<part>.jsonl      done entries folded by the driver (fewer requests at scale)
    .lock                           held by the driver of a run

Commit protocol, the same on every store: the shard's manifest object is written
completely (rename on local disk, one PUT or a completed multipart upload on an
object store), then its ledger entry. The ledger entry is the truth about "done":
a manifest without one is never trusted (it may be a killed attempt's) and is
rewritten when the run resumes; readers (`query`, `stats`, `report`) read only
manifests that have a ledger entry.

The folded ledger is a cache of the single entries, never a replacement: the driver
(under the lock) writes a part holding entries it knows to be committed (received
from a task after its commit, or read back from the single entries), one PUT, every
FOLD_EVERY commits or FOLD_SECONDS, and merges the parts when they grow many. Single
entries are never deleted. So "done" = in a folded part, or a single entry exists; a
reader whose folded parts cover the plan needs no listing of ledger/ at all, and a
run killed mid-way leaves at most FOLD_EVERY entries unfolded.
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

from curation.core.storage import LockHeld, StorageError, Store, is_url, open_store
from curation.schema import SCHEMA_VERSION, TRANSIENT_COLUMNS
from curation.sources.base import Shard

LEDGER_ENTRY = re.compile(r"shard-(\d+)\.json$")
FAILED_ENTRY = re.compile(r"shard-(\d+)\.failed\.json$")
FOLDED_DIR = "folded"  # ledger/folded/<part>.jsonl
LEGACY_FOLDED = "done.jsonl"  # one folded object written by earlier versions; read, then superseded
FOLD_EVERY = 1000  # commits per folded part
FOLD_SECONDS = 60.0  # ... or this long since the last part, whichever comes first
COMPACT_AT = 32  # more parts than this are merged into one
FOLD_MIN = 64  # a ledger of fewer entries is not folded: its readers make as few requests either way
# Unfolded shards are looked up one GET each while there are fewer than 1/PROBE_RATIO of the folded
# ones (and always up to PROBE_MIN); beyond that one listing of ledger/ (1,000 names a request) is cheaper.
PROBE_RATIO = 20
PROBE_MIN = 64


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
class LedgerState:
    """What the ledger says, read once."""

    done: dict[int, dict]  # shard index -> its ledger entry
    unfolded: dict[int, dict]  # the part of `done` that no folded part holds yet
    failed: dict[int, dict]  # last failure of shards that are not done (only when asked for)
    parts: list[str]  # names of the folded parts under ledger/folded/


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
        self.folded_store = self.ledger_store.child(FOLDED_DIR)
        self._record: dict[str, Any] | None = None  # run.json, read once (it is large for big plans)

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
        return self._record is not None or self.store.exists("run.json")

    def record(self) -> dict[str, Any]:
        if self._record is None:
            self._record = self.store.get_json("run.json")
        return self._record

    def _write_record(self, record: dict[str, Any]) -> None:
        self.store.put_json("run.json", record)
        self._record = record

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
            self._write_record({**rec, "limit": limit, "shards": [s.to_json() for s in extended]})
            return extended
        self._write_record(
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

    def _folded(self) -> tuple[dict[int, dict], list[str]]:
        """The entries of the folded parts, and the parts' names. A part merged away between the listing
        and the read (by a live run's driver, which writes the merged part first) makes the read start over.
        """
        for _ in range(10):
            names = sorted(n for n in self.folded_store.list("") if n.endswith(".jsonl"))
            got = self.folded_store.get_many(names)
            if len(got) == len(names):
                entries: dict[int, dict] = {}
                for name in names:
                    entries.update(_parse_entries(got[name]))
                return entries, names
        raise StorageError(f"{self.folded_store.url}: folded ledger parts kept disappearing while read")

    def ledger_state(self, plan: list[Shard] | None = None, *, with_failures: bool = False) -> LedgerState:
        """Done (and, `with_failures`, failed) shards of the plan, in as few requests as the ledger allows:
        the folded parts (one listing of ledger/folded/, one GET each); if they cover the plan, nothing
        else. Otherwise the single entries of the shards they miss: one GET each when those are few,
        else one listing of ledger/ (also needed for the failures) and a GET per unfolded entry.
        Without a plan (no run.json: a ledger made by other tools) every entry listed counts.
        """
        if plan is None:
            with contextlib.suppress(FileNotFoundError):
                plan = self.plan()
        folded, parts = self._folded()
        # None: which shards to expect is unknown, so ledger/ is listed
        missing = None if plan is None else {s.index for s in plan} - folded.keys()
        unfolded: dict[int, dict] = {}
        failed: dict[int, dict] = {}
        if missing and not with_failures and len(missing) <= max(PROBE_MIN, len(folded) // PROBE_RATIO):
            names = [f"{shard_name(i)}.json" for i in sorted(missing)]
            unfolded = _parse_objects(self.ledger_store.get_many(names).values())  # absent: not done
        elif missing is None or missing:
            names = self._ledger_names()
            known = set(folded)
            if LEGACY_FOLDED in names:  # earlier versions' folded object: its entries still need a part
                with contextlib.suppress(FileNotFoundError):
                    legacy = _parse_entries(self.ledger_store.get_bytes(LEGACY_FOLDED))
                    unfolded.update({k: v for k, v in legacy.items() if k not in known})
                    known |= legacy.keys()
            singles = [n for n in names if (m := LEDGER_ENTRY.fullmatch(n)) and int(m.group(1)) not in known]
            unfolded.update(_parse_objects(self.ledger_store.get_many(singles).values()))
            if with_failures:
                failed = _parse_objects(
                    self.ledger_store.get_many([n for n in names if FAILED_ENTRY.fullmatch(n)]).values()
                )
        done = {**folded, **unfolded}
        # A failure entry of a shard that is done is stale (its commit removes it, unless killed in between).
        return LedgerState(done, unfolded, {k: v for k, v in failed.items() if k not in done}, parts)

    def done_indices(self) -> set[int]:
        """Shards with a ledger entry (single or folded)."""
        return set(self.ledger_state().done)

    def done(self) -> dict[int, dict]:
        return self.ledger_state().done

    def committed(self, index: int) -> dict | None:
        """The ledger entry of shard `index`, if it is done."""
        try:
            return self.ledger_store.get_json(f"{shard_name(index)}.json")
        except (FileNotFoundError, ValueError):
            return None

    def failures(self) -> dict[int, dict]:
        return self.ledger_state(with_failures=True).failed

    def pending(self, plan: list[Shard]) -> list[Shard]:
        done = self.ledger_state(plan).done
        return [shard for shard in plan if shard.index not in done]

    def write_folded_part(self, entries: list[dict]) -> str:
        """One folded part holding `entries` (each already committed as a single entry); its name."""
        name = f"{time.time_ns():020d}-{os.urandom(4).hex()}.jsonl"
        lines = "".join(json.dumps(e, default=str) + "\n" for e in sorted(entries, key=lambda e: e["shard"]))
        self.folded_store.put_bytes(name, lines.encode())
        return name

    def remove_folded_parts(self, names: list[str]) -> None:
        self.folded_store.remove_many(names)

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


class LedgerFolder:
    """The driver's folding of the ledger while it runs (under the lock; see the module docstring).

    Starts from the ledger as the driver read it: entries a killed run left unfolded are folded at
    once, so the next reader finds them in one part. `add` takes each entry the driver hears of
    after its commit; a part is written every FOLD_EVERY of them or FOLD_SECONDS (once the ledger
    holds FOLD_MIN entries); more than
    COMPACT_AT parts, or more than one when the run ends having folded something, are merged into
    one (the merged part first, then the old parts are removed: a reader in between sees both, and
    entries are keyed by shard, so nothing is counted twice).
    """

    def __init__(self, run: RunDir, state: LedgerState) -> None:
        self.run = run
        self.entries = dict(state.done)
        self.parts = list(state.parts)
        self.buffer = list(state.unfolded.values())
        self.folded_any = False
        self.last = time.monotonic()
        if self.buffer:
            self.flush()

    def add(self, entry: dict) -> None:
        self.entries[entry["shard"]] = entry
        self.buffer.append(entry)
        if len(self.buffer) >= FOLD_EVERY or time.monotonic() - self.last >= FOLD_SECONDS:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if not self.buffer or len(self.entries) < FOLD_MIN:
            return
        self.parts.append(self.run.write_folded_part(self.buffer))
        self.buffer = []
        self.folded_any = True
        if len(self.parts) > COMPACT_AT:
            self.compact()

    def compact(self) -> None:
        old = self.parts
        self.parts = [self.run.write_folded_part(list(self.entries.values()))]
        self.run.remove_folded_parts(old)
        self.run.ledger_store.remove(LEGACY_FOLDED)

    def close(self) -> None:
        self.flush()
        if self.folded_any and len(self.parts) > 1:
            self.compact()


def _parse_entries(data: bytes) -> dict[int, dict]:
    out = {}
    for line in data.decode().splitlines():
        if line.strip():
            entry = json.loads(line)
            out[entry["shard"]] = entry
    return out


def _parse_objects(objects: Any) -> dict[int, dict]:
    out = {}
    for data in objects:
        entry = json.loads(data)
        out[entry["shard"]] = entry
    return out


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
        + "\nChoose a new output (--output DIR), or restore the original config to resume. A new threshold "
        f'needs no re-run: the scores are recorded, so select on them (curate select {root} --where "...").'
    )
