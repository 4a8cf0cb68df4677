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
import hashlib
import hmac
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.core.outputs import exclusive_lock_on, explain_conflict
from curation.core.storage import StorageError, Store, is_url, open_store
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


class RunDirError(Exception):
    """A run directory that cannot be used as it is (one line for the user, naming the object)."""


class RunConflict(RunDirError):
    """The output directory belongs to a run with a different, result-changing config."""


class RunRecordError(RunDirError):
    """run.json cannot be read or does not describe a plan (truncated, edited, from another tool)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def output_inside_run(out: str | os.PathLike, run: str | os.PathLike) -> str | None:
    """The one rule for every file or folder a reader writes (`query`, `select`, `report` --out): never
    inside a run directory, which only `curate run` writes (a report over a manifest would silently
    replace a committed shard). Local paths are compared with symlinks resolved; URLs by store and key.
    Returns the problem (one line) or None."""
    if is_url(out) != is_url(run):
        return None  # one on local disk, the other on an object store
    if is_url(out):
        a, b = open_store(out), open_store(run)
        same_store = a.fs.protocol == b.fs.protocol
        inside = same_store and (a.root == b.root or a.root.startswith(b.root.rstrip("/") + "/"))
    else:
        inside = Path(os.path.realpath(out)).is_relative_to(os.path.realpath(run))
    if inside:
        return f"--out {out} is inside the run directory {run}: choose a path outside it"
    return None


def run_key_path() -> Path:
    """This user's run key: $CURATE_CONFIG_DIR/run-key, else ~/.config/curate/run-key (0600)."""
    root = os.environ.get("CURATE_CONFIG_DIR") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "curate"
    )
    return Path(root) / "run-key"


def sign_inputs(inputs: list[str]) -> str | None:
    """HMAC of a plan's input locations under this user's run key (made on first use); None where no
    key can be kept (then readers need --images-from for every run's inputs)."""
    path = run_key_path()
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32).hex().encode())
        except FileExistsError:
            pass  # another process made it first
        except OSError:
            return None
        key = path.read_bytes()
    except OSError:
        return None
    if len(key) < 32:
        return None
    return hmac.new(key, json.dumps(inputs).encode(), hashlib.sha256).hexdigest()


def _input_locations(record: dict[str, Any]) -> list[str]:
    shards = record.get("shards")
    return (
        sorted({str(s["path"]) for s in shards if isinstance(s, dict) and "path" in s})
        if isinstance(shards, list)
        else []
    )


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
    parts: list[str]  # names of the folded parts under ledger/folded/ that were read
    # Shards of the plan whose ledger entry is not trusted, and why (one line each): a damaged entry,
    # rows that disagree with the plan, another config's entry, a missing manifest. They
    # count as not done: a resumed run redoes them, readers leave them out and name them.
    broken: dict[int, str] = field(default_factory=dict)
    bad_parts: list[str] = field(default_factory=list)  # damaged folded parts: skipped (they are a cache)
    notes: list[str] = field(default_factory=list)  # one line each: what was skipped or ignored, and why


@dataclass
class ShardResult:
    shard: int
    rows: int
    kept: int
    drop_reasons: dict[str, int]
    seconds: float
    finished: float | None = None  # unix time of the commit
    config: str | None = None  # config hash of the run that committed it (run.json's config_hash)

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
        """run.json, checked (RunRecordError: one line naming it); FileNotFoundError if there is none."""
        if self._record is None:
            data = self.store.get_bytes("run.json")
            try:
                record = json.loads(data)
            except (ValueError, UnicodeDecodeError) as e:
                raise RunRecordError(f"{self.record_path} is damaged (not JSON: {e})") from None
            problem = record_problem(record)
            if problem:
                raise RunRecordError(f"{self.record_path} is damaged: {problem}")
            self._record = record
        return self._record

    def config_hash(self) -> str | None:
        return self.record().get("config_hash") if self.exists() else None

    def _write_record(self, record: dict[str, Any]) -> None:
        signature = sign_inputs(_input_locations(record))
        record = {k: v for k, v in record.items() if k != "inputs_signature"}
        if signature is not None:
            record["inputs_signature"] = signature
        self.store.put_json("run.json", record)
        self._record = record

    def trusted_inputs(self) -> list[str]:
        """The input locations of the plan, if this user's `curate run` wrote them (run.json signed with
        this user's run key, see `sign_inputs`); [] for a run directory from anyone else, or edited: its
        plan may name `/` or another bucket, and readers never widen what they read on its word."""
        with contextlib.suppress(FileNotFoundError, RunRecordError):
            record = self.record()
            inputs = _input_locations(record)
            signature = sign_inputs(inputs)
            if signature is not None and hmac.compare_digest(str(record.get("inputs_signature")), signature):
                return inputs
        return []

    def plan_inputs(self) -> list[str]:
        """The input locations the plan names, trusted or not (for messages only)."""
        with contextlib.suppress(FileNotFoundError, RunRecordError):
            return _input_locations(self.record())
        return []

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
        if not self.exists():
            self._adopt_ledger(config_hash)
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

    def _adopt_ledger(self, config_hash: str) -> None:
        """A ledger without run.json (deleted, or lost): its entries are another run's results only if
        each says it was made with this config; otherwise which config made them is unknown: refuse."""
        entries = self.ledger_state(plan=None).done
        if not entries:
            return
        others = sorted({str(e.get("config")) for e in entries.values() if e.get("config") != config_hash})
        if others:
            raise RunConflict(
                f"{self.root} holds a ledger of {len(entries):,} finished shard(s) but no run.json, made with "
                f"{'an unknown config' if others == ['None'] else 'a different config'}: its results cannot "
                "be checked against this one. Choose a new output (--output DIR)."
            )

    def conflict(self, fingerprint: dict, config_hash: str) -> str | None:
        """Why this output cannot take a run with this fingerprint (None: it can, or it holds no run)."""
        if not self.exists():
            try:
                self._adopt_ledger(config_hash)  # a ledger left without its run.json
            except RunConflict as e:
                return str(e)
            return None
        try:
            rec = self.record()
            old_hash, old_fingerprint = rec["config_hash"], rec["fingerprint"]
        except RunRecordError as e:
            return f"{e}: choose a new output"
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

    def _folded(self) -> tuple[dict[int, dict], list[str], list[str], list[str]]:
        """The entries of the folded parts, the parts read, the damaged parts skipped, and a note per
        damaged part. A part is a cache of single entries: one with any bad line is skipped whole (its
        shards are read from their single entries; the next driver rewrites it). A part merged away between
        the listing and the read (by a live run's driver, which writes the merged part first) makes the
        read start over."""
        for _ in range(10):
            names = sorted(n for n in self.folded_store.list("") if n.endswith(".jsonl"))
            got = self.folded_store.get_many(names)
            if len(got) == len(names):
                entries: dict[int, dict] = {}
                good, bad, notes = [], [], []
                for name in names:
                    try:
                        entries.update(parse_part(got[name]))
                        good.append(name)
                    except ValueError as e:
                        bad.append(name)
                        notes.append(
                            f"folded ledger part {self.folded_store.url_of(name)} is damaged ({e}): skipped, "
                            "its shards are read from their single entries"
                        )
                return entries, good, bad, notes
        raise StorageError(f"{self.folded_store.url}: folded ledger parts kept disappearing while read")

    def ledger_state(
        self, plan: list[Shard] | None = None, *, with_failures: bool = False, verify: bool = False
    ) -> LedgerState:
        """Done (and, `with_failures`, failed) shards of the plan, in as few requests as the ledger allows:
        the folded parts (one listing of ledger/folded/, one GET each); if they cover the plan, nothing
        else. Otherwise the single entries of the shards they miss: one GET each when those are few,
        else one listing of ledger/ (also needed for the failures) and a GET per unfolded entry.
        Without a plan (no run.json: a ledger made by other tools) every entry listed counts.

        The ledger is untrusted input: entries outside the plan are ignored, and an entry that is
        damaged, disagrees with the plan's row count or was made by another config is `broken` (not
        done). `verify` also lists manifests/ (one listing) and counts as broken an entry whose
        manifest is missing.
        """
        if plan is None:
            with contextlib.suppress(FileNotFoundError):
                plan = self.plan()
        folded, parts, bad_parts, notes = self._folded()
        # None: which shards to expect is unknown, so ledger/ is listed
        missing = None if plan is None else {s.index for s in plan} - folded.keys()
        unfolded: dict[int, dict] = {}
        failed: dict[int, dict] = {}
        broken: dict[int, str] = {}
        if missing and not with_failures and len(missing) <= max(PROBE_MIN, len(folded) // PROBE_RATIO):
            names = [f"{shard_name(i)}.json" for i in sorted(missing)]
            unfolded = self._singles(self.ledger_store.get_many(names), broken)  # absent: not done
        elif missing is None or missing:
            names = self._ledger_names()
            known = set(folded)
            if LEGACY_FOLDED in names:  # earlier versions' folded object: its entries still need a part
                with contextlib.suppress(FileNotFoundError):
                    try:
                        legacy = parse_part(self.ledger_store.get_bytes(LEGACY_FOLDED))
                    except ValueError as e:
                        legacy = {}
                        notes.append(f"{self.ledger_store.url_of(LEGACY_FOLDED)} is damaged ({e}): skipped")
                    unfolded.update({k: v for k, v in legacy.items() if k not in known})
                    known |= legacy.keys()
            singles = [n for n in names if (m := LEDGER_ENTRY.fullmatch(n)) and int(m.group(1)) not in known]
            unfolded.update(self._singles(self.ledger_store.get_many(singles), broken))
            if with_failures:
                for name, data in self.ledger_store.get_many(
                    [n for n in names if FAILED_ENTRY.fullmatch(n)]
                ).items():
                    with contextlib.suppress(ValueError, UnicodeDecodeError, TypeError, AttributeError):
                        entry = json.loads(data)
                        index = int(FAILED_ENTRY.fullmatch(name).group(1))  # type: ignore[union-attr]
                        error = str(entry.get("error", "unknown error"))  # AttributeError: not an object
                        failed[index] = {**entry, "shard": index, "error": error}
        done = {**folded, **unfolded}
        if plan is not None:
            done, unfolded = self._check_against_plan(plan, done, unfolded, broken, notes)
        if verify and done:
            self._check_manifests(done, broken)
            unfolded = {k: v for k, v in unfolded.items() if k in done}
        # A failure entry of a shard that is done is stale (its commit removes it, unless killed in between).
        planned = None if plan is None else {s.index for s in plan}  # failures outside the plan: ignored
        failed = {k: v for k, v in failed.items() if k not in done and (planned is None or k in planned)}
        return LedgerState(done, unfolded, failed, parts, broken, bad_parts, notes)

    def _singles(self, got: dict[str, bytes], broken: dict[int, str]) -> dict[int, dict]:
        """Parsed single entries by shard; a damaged one goes to `broken` (redone), never raises."""
        out = {}
        for name, data in got.items():
            index = int(LEDGER_ENTRY.fullmatch(name).group(1))  # type: ignore[union-attr]
            try:
                entry = json.loads(data)
            except (ValueError, UnicodeDecodeError):
                broken[index] = f"ledger entry {self.ledger_store.url_of(name)} is not JSON (truncated?)"
                continue
            problem = entry_problem(entry, index)
            if problem:
                broken[index] = f"ledger entry {self.ledger_store.url_of(name)} {problem}"
            else:
                out[index] = entry
        return out

    def _check_against_plan(
        self,
        plan: list[Shard],
        done: dict[int, dict],
        unfolded: dict[int, dict],
        broken: dict[int, str],
        notes: list[str],
    ) -> tuple[dict[int, dict], dict[int, dict]]:
        planned = {s.index: s for s in plan}
        outside = sorted(k for k in done if k not in planned)
        if outside:
            notes.append(
                f"{len(outside):,} ledger entr{'y' if len(outside) == 1 else 'ies'} name shards outside the plan "
                f"of {self.record_path} (e.g. shard {outside[0]}): ignored"
            )
        for k in list(broken):
            if k not in planned:
                del broken[k]
        config = self.config_hash()
        good = {}
        for k, entry in done.items():
            shard = planned.get(k)
            if shard is None:
                continue
            if shard.row_end >= 0 and entry["rows"] != shard.rows:
                broken[k] = (
                    f"ledger entry of {shard_name(k)} says {entry['rows']:,} rows; the plan has {shard.rows:,}"
                )
            elif entry.get("config") not in (None, config):
                broken[k] = (
                    f"ledger entry of {shard_name(k)} was made with another config ({entry['config']})"
                )
            else:
                good[k] = entry
        return good, {k: v for k, v in unfolded.items() if k in good}

    def _check_manifests(self, done: dict[int, dict], broken: dict[int, str]) -> None:
        present = set(self.manifest_store.list(""))
        # A shard `curate compact` folded into a part may have no manifest of its own any more.
        covered = {int(i) for p in compaction_index(self)["parts"] for i, _ in p["shards"]}
        for k in sorted(done):
            name = f"{shard_name(k)}.parquet"
            if name not in present and k not in covered:
                broken[k] = (
                    f"{self.manifest_store.url_of(name)} is missing, though the ledger says the shard is done"
                )
                del done[k]

    def done_indices(self) -> set[int]:
        """Shards with a ledger entry (single or folded)."""
        return set(self.ledger_state().done)

    def done(self) -> dict[int, dict]:
        return self.ledger_state().done

    def committed(self, index: int) -> dict | None:
        """The ledger entry of shard `index`, if it is done (a damaged entry is not)."""
        try:
            entry = self.ledger_store.get_json(f"{shard_name(index)}.json")
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None
        return None if entry_problem(entry, index) else entry

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
        """Names (shard-NNNNN.parquet) of the manifests readers may see: those with a trusted ledger entry
        whose manifest exists (`readable_manifests` also says which were left out, and why)."""
        return self.readable_manifests()[0]

    def readable_manifests(self) -> tuple[list[str], list[str]]:
        """(names under manifests/ that readers may see, one line per shard left out and why).

        Every reader (query, stats, report, select, dedup) takes its files from here (`data_files`):
        compacted parts, and the manifests of shards whose ledger entry is trusted and whose manifest
        exists; a shard of the plan whose entry is damaged or whose manifest is missing is skipped
        and named, never read, and `curate run` redoes it."""
        files = data_files(self)
        return files.names, files.skipped

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
        if state.bad_parts or state.broken:
            # Entries found broken are removed (their shards are redone, and a retried task must not
            # find them committed); the parts, which may hold them or be damaged, are rewritten from the
            # entries known good. The manifests stay until their shard's redo replaces them.
            run.ledger_store.remove_many([f"{shard_name(k)}.json" for k in sorted(state.broken)])
            self.parts += state.bad_parts
            self.buffer = []
            self.compact()
        elif self.buffer:
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
        self.parts = [self.run.write_folded_part(list(self.entries.values()))] if self.entries else []
        self.run.remove_folded_parts(old)
        self.run.ledger_store.remove(LEGACY_FOLDED)

    def close(self) -> None:
        self.flush()
        if self.folded_any and len(self.parts) > 1:
            self.compact()


def parse_part(data: bytes) -> dict[int, dict]:
    """The entries of a folded part by shard; ValueError (saying which line and why) if any is bad."""
    out = {}
    try:
        lines = data.decode().splitlines()
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                entry = json.loads(line)
            except ValueError:
                raise ValueError(f"line {n} is not JSON") from None
            problem = entry_problem(entry)
            if problem:
                raise ValueError(f"line {n} {problem}")
            out[entry["shard"]] = entry
    return out


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def entry_problem(entry: Any, index: int | None = None) -> str | None:
    """Why a ledger entry cannot be trusted as written (None: it can). `index`: the shard its name says."""
    if not isinstance(entry, dict):
        return f"is not a JSON object ({type(entry).__name__})"
    if not _count(entry.get("shard")):
        return f"has no shard number (shard: {entry.get('shard')!r})"
    if index is not None and entry["shard"] != index:
        return f"names shard {entry['shard']}, not {index}"
    rows, kept = entry.get("rows"), entry.get("kept")
    if not _count(rows) or not _count(kept) or kept > rows:
        return f"has no valid row counts (rows: {rows!r}, kept: {kept!r})"
    return None


def record_problem(record: Any) -> str | None:
    """Why a run.json cannot be a run record (None: it can)."""
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})"
    if not isinstance(record.get("config_hash"), str) or not isinstance(record.get("fingerprint"), dict):
        return "no config_hash or fingerprint"
    shards = record.get("shards")
    if not isinstance(shards, list):
        return "no list of shards"
    seen: set[int] = set()
    for s in shards:
        if not (
            isinstance(s, dict)
            and set(s) <= {"index", "path", "row_start", "row_end"}
            and _count(s.get("index"))
            and isinstance(s.get("path"), str)
            and all(
                isinstance(s.get(k, 0), int) and not isinstance(s.get(k, 0), bool)
                for k in ("row_start", "row_end")
            )
        ):
            return f"shard {json.dumps(s, default=str)[:80]} is not a shard of a plan"
        if s["index"] in seen:
            return f"it lists shard {s['index']} twice"
        seen.add(s["index"])
    return None


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
            self.index,
            self.rows,
            self.kept,
            self.reasons,
            time.perf_counter() - self.started,
            config=self.run.config_hash(),
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


# ---------------------------------------------------------------------------- the data files of a run
# `curate compact` (curation/compact.py) rewrites many shard manifests into a few large parts under
# manifests/compacted/, committed by one object, the index. Every reader asks `data_files` where the
# rows are, so each committed shard is read exactly once, from its part or from its own manifest.

COMPACTED_DIR = "compacted"  # manifests/compacted/part-*.parquet and index.json
COMPACTED_INDEX = "index.json"


@dataclass
class DataFiles:
    """Where the committed rows of a run live, as names relative to manifests/."""

    parts: list[dict]  # the index's parts: {"name", "rows", "bytes", "shards": [[index, rows], ...]}
    singles: list[str]  # shard-NNNNN.parquet of done shards that no part holds
    covered: dict[int, str]  # shard index -> the part (name under compacted/) holding its rows
    done: dict[int, dict]  # the ledger's done entries ({} when the index holds every shard of the plan)
    skipped: list[str] = field(default_factory=list)  # shards left out (a lying ledger), one line each

    @property
    def names(self) -> list[str]:
        return [f"{COMPACTED_DIR}/{p['name']}" for p in self.parts] + self.singles


def compaction_index(run: RunDir) -> dict[str, Any]:
    """manifests/compacted/index.json, or an empty index when the run was never compacted."""
    try:
        index = run.manifest_store.child(COMPACTED_DIR).get_json(COMPACTED_INDEX)
    except FileNotFoundError:
        return {"version": 1, "generation": 0, "parts": [], "retired": []}
    except ValueError as e:
        raise StorageError(
            f"{run.manifest_store.url_of(COMPACTED_DIR)}/{COMPACTED_INDEX} is unreadable: {e}"
        ) from None
    problem = _index_problem(index)
    if problem:
        # A run directory may come from someone else: its index names files only inside manifests/.
        raise StorageError(f"{run.manifest_store.url_of(COMPACTED_DIR)}/{COMPACTED_INDEX}: {problem}")
    return index


PART_NAME = re.compile(r"part-\d{6}-\d{5}-[0-9a-f]{8}\.parquet")
RETIRED_NAME = re.compile(r"shard-\d{5,}\.parquet|compacted/part-\d{6}-\d{5}-[0-9a-f]{8}\.parquet")


def _index_problem(index: Any) -> str | None:
    """Why `index` is not a compaction index this version wrote (None: it is one)."""

    def count(x: Any) -> bool:
        return type(x) is int and x >= 0

    if not isinstance(index, dict) or not isinstance(index.get("parts"), list):
        return "not a compaction index (no list of parts)"
    if not count(index.get("generation")) or not isinstance(index.get("retired", []), list):
        return "malformed generation or retired list"
    for p in index["parts"]:
        if (
            not isinstance(p, dict)
            or not isinstance(p.get("name"), str)
            or not PART_NAME.fullmatch(p["name"])
        ):
            return f"a part named {str(p.get('name') if isinstance(p, dict) else p)[:80]!r}"
        if not count(p.get("rows")) or not count(p.get("bytes")) or not isinstance(p.get("shards"), list):
            return f"part {p['name']}: malformed rows, bytes or shards"
        if not all(isinstance(e, list) and len(e) == 2 and count(e[0]) and count(e[1]) for e in p["shards"]):
            return f"part {p['name']}: malformed shard entries"
    for r in index.get("retired", []):
        if (
            not isinstance(r, dict)
            or not isinstance(r.get("name"), str)
            or not RETIRED_NAME.fullmatch(r["name"])
        ):
            return "a retired file outside manifests/"
        if type(r.get("since")) not in (int, float) or r["since"] != r["since"]:
            return f"retired {r['name']}: malformed time"
    return None


def data_files(run: RunDir, index: dict[str, Any] | None = None) -> DataFiles:
    """The files holding a run's committed rows: the compacted parts, then the manifests of done shards
    no part holds. The index is read before the ledger: a shard compacted after the ledger read is still
    in the index read before it, and one compacted later keeps its own manifest for the retention time
    (compaction retires, then removes later), so each committed row is in exactly one listed file."""
    index = compaction_index(run) if index is None else index
    covered = {int(i): p["name"] for p in index["parts"] for i, _ in p["shards"]}
    plan = None
    if covered:
        with contextlib.suppress(FileNotFoundError):
            plan = run.plan()
    # A compacted finished run: the index names every shard of the plan, and the ledger is not read.
    if plan and all(s.index in covered for s in plan):
        return DataFiles(list(index["parts"]), [], covered, {})
    # The ledger is untrusted: entries outside the plan, damaged ones and those whose manifest is gone
    # are left out and named (`curate run` redoes them).
    state = run.ledger_state(plan, verify=True)
    skipped = state.notes + [state.broken[k] for k in sorted(state.broken)]
    if state.broken:
        skipped.append(
            f"{len(state.broken):,} shard(s) left out: run the same `curate run` again to redo them"
        )
    singles = [f"{shard_name(i)}.parquet" for i in sorted(state.done) if i not in covered]
    return DataFiles(list(index["parts"]), singles, covered, state.done, skipped)
