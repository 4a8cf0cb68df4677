"""`curate stats`: per-shard summaries, written beside each manifest and folded with the ledger.

A run of LAION's size holds ~232k manifests (~270 GB); reading them all for a funnel that
never changes once the run is done costs minutes to hours. So the shard task summarises each
shard as it writes it (`ShardStats`: rows, kept, drops per (stage, reason), nulls per column,
fixed-bin counts of every numeric column, a distinct-uid sketch) into
`summaries/shard-NNNNN.json`, before the shard's ledger entry (so a committed shard always has
one, and a summary without a ledger entry is never trusted, exactly as manifests are). The
driver folds them as it folds the ledger (`StatsFolder`): one object `summaries/folded.json`
holding the merge of the shards it names, rewritten whole (one PUT) at every ledger fold. A
finished run's stats are then one small read; a run in progress adds the single summaries of
the shards folded since.

Every count merges exactly (sums); the sub-bins of each numeric column are the fixed bins its
stage declares (`Stage.bins`: lo, hi, step), so histograms are exact too. Two numbers are
sketches, and say so: the distinct-uid count (exact while the run holds at most EXACT_UIDS
uids, else a HyperLogLog with 2^14 registers: ~0.8% standard error) and the quantiles (the
sub-bin holding the exact quantile is found exactly; the value is interpolated inside it, so it
is within one `step` of the exact one for values inside [lo, hi)). `--exact`, and runs written
before summaries existed, compute the same numbers with DuckDB over the manifests, exactly.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.rundir import LedgerFolder, LedgerState, RunDir, shard_name
from curation.schema import DECISION_COLUMNS, HASH_COLUMNS, ID_COLUMNS

SUMMARY_DIR = "summaries"  # summaries/shard-NNNNN.json, summaries/folded.json
FOLDED = "folded.json"
SUMMARY_VERSION = 1
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
EXACT_UIDS = 1024  # a sketch holding at most this many uids keeps their hashes: exact distinct count
HLL_BITS = 14  # HyperLogLog registers 2^14: standard error 1.04 / sqrt(2^14) = 0.8%
_HLL_M = 1 << HLL_BITS
HLL_ERROR = 1.04 / math.sqrt(_HLL_M)  # relative standard error of its count
_HLL_REST = 64 - HLL_BITS
_SUMMARY = re.compile(r"shard-(\d+)\.json$")


def _bins() -> dict[str, tuple[float, float, float]]:
    from curation.stages import manifest_bins

    return manifest_bins()


def n_bins(lo: float, hi: float, step: float) -> int:
    return round((hi - lo) / step)


# ---------------------------------------------------------------------------- sketches


class UidSketch:
    """Distinct uids: the 64-bit hashes themselves while few, then HyperLogLog registers. Mergeable."""

    def __init__(self) -> None:
        self.hashes: set[int] | None = set()
        self.registers: np.ndarray | None = None

    @staticmethod
    def hash64(uids: pa.Array) -> np.ndarray:
        """64 bits per uid: a curate uid is 32 hex digits of sha256 already (its first 16); anything
        else is hashed (blake2b), so the same string always gives the same bits."""
        n = len(uids)
        if pa.types.is_string(uids.type) and not uids.null_count and n:
            # the fast way: the string data of n 32-character uids is 32 n bytes of hex, in one buffer
            offsets = np.frombuffer(uids.buffers()[1], dtype=np.int32)[uids.offset : uids.offset + n + 1]
            if offsets[-1] - offsets[0] == 32 * n and bool(np.all(np.diff(offsets) == 32)):
                with contextlib.suppress(ValueError, UnicodeDecodeError):  # not hex: the slow way
                    text = uids.buffers()[2].to_pybytes()[offsets[0] : offsets[-1]].decode("ascii")
                    return np.frombuffer(bytes.fromhex(text), dtype=">u8")[0::2].astype(np.uint64)
        values = uids.to_pylist()
        out = np.empty(len(values), dtype=np.uint64)
        for i, u in enumerate(values):
            if isinstance(u, str) and len(u) == 32:
                try:
                    out[i] = int(u[:16], 16)
                    continue
                except ValueError:
                    pass
            data = str(u).encode("utf-8", "surrogatepass")
            out[i] = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
        return out

    def add(self, hashes: np.ndarray) -> None:
        if self.hashes is not None:
            unique = np.unique(hashes)
            if len(unique) > EXACT_UIDS:  # the union is beyond exact whatever it held: no set of them
                self._to_registers()
                self._add_registers(unique)
                return
            self.hashes.update(unique.tolist())
            if len(self.hashes) > EXACT_UIDS:
                self._to_registers()
        else:
            self._add_registers(hashes)

    def _to_registers(self) -> None:
        hashes = np.fromiter(self.hashes or (), dtype=np.uint64)
        self.hashes, self.registers = None, np.zeros(_HLL_M, dtype=np.uint8)
        self._add_registers(hashes)

    def _add_registers(self, hashes: np.ndarray) -> None:
        assert self.registers is not None
        index = (hashes >> np.uint64(_HLL_REST)).astype(np.int64)
        rest = hashes & np.uint64((1 << _HLL_REST) - 1)
        _, bit_length = np.frexp(rest.astype(np.float64))  # exact: rest < 2^53
        rank = (_HLL_REST - bit_length + 1).astype(np.uint8)  # position of the first 1 bit
        np.maximum.at(self.registers, index, rank)

    def merge(self, other: UidSketch) -> None:
        if self.hashes is not None and other.hashes is not None:
            self.hashes |= other.hashes
            if len(self.hashes) > EXACT_UIDS:
                self._to_registers()
            return
        if self.hashes is not None:
            self._to_registers()
        if other.hashes is not None:
            self.add(np.fromiter(other.hashes, dtype=np.uint64))
        else:
            assert self.registers is not None and other.registers is not None
            np.maximum(self.registers, other.registers, out=self.registers)

    @property
    def exact(self) -> bool:
        return self.hashes is not None

    def count(self) -> int:
        if self.hashes is not None:
            return len(self.hashes)
        assert self.registers is not None
        m = float(_HLL_M)
        estimate = (
            0.7213 / (1 + 1.079 / m) * m * m / float(np.sum(np.ldexp(1.0, -self.registers.astype(int))))
        )
        empty = int(np.count_nonzero(self.registers == 0))
        if estimate <= 2.5 * m and empty:
            estimate = m * math.log(m / empty)  # linear counting: better for small counts
        return round(estimate)

    def to_json(self) -> dict[str, Any]:
        if self.hashes is not None:
            raw = np.array(sorted(self.hashes), dtype=">u8").tobytes()
            return {"hashes": base64.b64encode(zlib.compress(raw)).decode()}
        assert self.registers is not None
        return {"hll": base64.b64encode(zlib.compress(self.registers.tobytes())).decode()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UidSketch:
        s = cls()
        if "hashes" in data:
            raw = zlib.decompress(base64.b64decode(data["hashes"]))
            s.hashes = {int(h) for h in np.frombuffer(raw, dtype=">u8")}
        else:
            s.hashes = None
            raw = zlib.decompress(base64.b64decode(data["hll"]))
            s.registers = np.frombuffer(raw, dtype=np.uint8).copy()
            if s.registers.size != _HLL_M:
                raise ValueError(f"a uid sketch of {s.registers.size} registers (expected {_HLL_M})")
        return s


class ColumnSketch:
    """One numeric column of a shard: nulls, NaNs, exact min/max, counts per fixed sub-bin
    (-1: below lo, n_bins: at or above hi)."""

    def __init__(self) -> None:
        self.null = 0
        self.nan = 0
        self.n = 0  # values counted in bins (not null, not NaN)
        self.min: float | None = None
        self.max: float | None = None
        self.bins: dict[int, int] = {}

    def add(self, column: pa.ChunkedArray, lo: float, hi: float, step: float) -> None:
        self.null += column.null_count
        values = column.drop_null().to_numpy().astype(np.float64)
        if pa.types.is_floating(column.type):
            nan = np.isnan(values)
            self.nan += int(nan.sum())
            values = values[~nan]
        if not values.size:
            return
        self.n += int(values.size)
        lo_v, hi_v = float(values.min()), float(values.max())
        self.min = lo_v if self.min is None else min(self.min, lo_v)
        self.max = hi_v if self.max is None else max(self.max, hi_v)
        index = bin_index(values, lo, hi, step)
        for i, c in zip(*np.unique(index, return_counts=True)):
            self.bins[int(i)] = self.bins.get(int(i), 0) + int(c)

    def merge(self, other: ColumnSketch) -> None:
        self.null += other.null
        self.nan += other.nan
        self.n += other.n
        if other.min is not None:
            self.min = other.min if self.min is None else min(self.min, other.min)
        if other.max is not None:
            self.max = other.max if self.max is None else max(self.max, other.max)
        for i, c in other.bins.items():
            self.bins[i] = self.bins.get(i, 0) + c

    def to_json(self) -> dict[str, Any]:
        return {
            "null": self.null,
            "nan": self.nan,
            "n": self.n,
            "min": self.min,
            "max": self.max,
            "bins": [[i, c] for i, c in sorted(self.bins.items())],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ColumnSketch:
        s = cls()
        s.null, s.nan, s.n, s.min, s.max = data["null"], data["nan"], data["n"], data["min"], data["max"]
        s.bins = {int(i): int(c) for i, c in data["bins"]}
        return s


def bin_index(values: np.ndarray, lo: float, hi: float, step: float) -> np.ndarray:
    """The sub-bin of each value: floor((v - lo) / step) in float64, -1 below lo, n_bins at or above hi.
    `_bin_sql` is the same formula in DuckDB (IEEE float64 both: the same bin for the same value)."""
    n = n_bins(lo, hi, step)
    raw = np.floor((values - float(lo)) / float(step))
    return np.where(raw < 0, -1, np.where(raw >= n, n, raw)).astype(np.int64)


def _bin_sql(col: str, lo: float, hi: float, step: float) -> str:
    n = n_bins(lo, hi, step)
    raw = f"floor(({col}::DOUBLE - {float(lo)!r}::DOUBLE) / {float(step)!r}::DOUBLE)"
    return f"CASE WHEN {raw} < 0 THEN -1 WHEN {raw} >= {n} THEN {n} ELSE {raw}::BIGINT END"


class ShardStats:
    """What `curate stats` needs of some rows, in a form that merges exactly (see the module docstring)."""

    def __init__(self) -> None:
        self.rows = 0
        self.kept = 0
        self.drops: dict[tuple[str | None, str | None], int] = {}  # (drop_stage, drop_reason) -> rows
        self.nulls: dict[str, int] = {}  # stage column -> null rows (columns the rows have)
        self.columns: dict[str, ColumnSketch] = {}
        self.uids = UidSketch()

    def add(self, table: pa.Table) -> None:
        """Count one batch (manifest columns)."""
        self.rows += table.num_rows
        keep = table.column("keep")
        self.kept += int(pc.sum(keep).as_py() or 0)
        dropped = table.filter(pc.invert(pc.fill_null(keep, True)))
        if dropped.num_rows:  # (a Counter: Arrow's group_by costs ~5 ms a call whatever the rows)
            pairs = zip(dropped.column("drop_stage").to_pylist(), dropped.column("drop_reason").to_pylist())
            for key, n in Counter(pairs).items():
                self.drops[key] = self.drops.get(key, 0) + n
        self.uids.add(UidSketch.hash64(table.column("uid").combine_chunks()))
        bins = _bins()
        skip = set(ID_COLUMNS) | set(DECISION_COLUMNS)
        for name in table.column_names:
            if name in skip:
                continue
            column = table.column(name)
            self.nulls[name] = self.nulls.get(name, 0) + column.null_count
            if name in bins and name not in HASH_COLUMNS and _numeric(column.type):
                self.columns.setdefault(name, ColumnSketch()).add(column, *bins[name])

    def merge(self, other: ShardStats) -> None:
        self.rows += other.rows
        self.kept += other.kept
        for k, n in other.drops.items():
            self.drops[k] = self.drops.get(k, 0) + n
        for k, n in other.nulls.items():
            self.nulls[k] = self.nulls.get(k, 0) + n
        for k, c in other.columns.items():
            self.columns.setdefault(k, ColumnSketch()).merge(c)
        self.uids.merge(other.uids)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": SUMMARY_VERSION,
            "rows": self.rows,
            "kept": self.kept,
            "drops": [[s, r, n] for (s, r), n in sorted(self.drops.items(), key=lambda kv: str(kv[0]))],
            "nulls": self.nulls,
            "columns": {k: c.to_json() for k, c in self.columns.items()},
            "uids": self.uids.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardStats:
        if data.get("version") != SUMMARY_VERSION:
            raise ValueError(f"summary version {data.get('version')!r} (this curate reads {SUMMARY_VERSION})")
        s = cls()
        s.rows, s.kept = int(data["rows"]), int(data["kept"])
        s.drops = {(st, r): int(n) for st, r, n in data["drops"]}
        s.nulls = {k: int(n) for k, n in data["nulls"].items()}
        s.columns = {k: ColumnSketch.from_json(c) for k, c in data["columns"].items()}
        s.uids = UidSketch.from_json(data["uids"])
        return s


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


# ---------------------------------------------------------------------------- on the store


def summary_name(index: int) -> str:
    return f"{shard_name(index)}.json"


def write_summary(run: RunDir, index: int, stats: ShardStats) -> None:
    """The shard's summary, before its ledger entry (a summary is trusted only once that exists)."""
    run.store.child(SUMMARY_DIR).put_bytes(summary_name(index), _compact(stats.to_json()))


def _compact(data: Any) -> bytes:
    """JSON without indentation: summaries are read by curate only, and half the size this way."""
    import json

    return json.dumps(data, separators=(",", ":")).encode()


def _parse(data: bytes) -> ShardStats | None:
    import json

    try:
        return ShardStats.from_json(json.loads(data))
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: that shard is summarised from its manifest instead


def _ranges(indices: Iterable[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def _from_ranges(ranges: list[list[int]]) -> set[int]:
    return {i for a, b in ranges for i in range(int(a), int(b) + 1)}


def read_folded(run: RunDir) -> tuple[set[int], ShardStats | None]:
    """The folded summary: the shards it covers and their merge (nothing if absent or unreadable)."""
    import json

    try:
        data = json.loads(run.store.child(SUMMARY_DIR).get_bytes(FOLDED))
        return _from_ranges(data["shards"]), ShardStats.from_json(data["stats"])
    except FileNotFoundError:
        return set(), None
    except (ValueError, KeyError, TypeError):
        return set(), None


class StatsFolder(LedgerFolder):
    """The ledger folder that also folds the shards' summaries (under the run's lock, in the driver).

    At every ledger fold (and at the end) it rewrites `summaries/folded.json` whole: the merge of every
    summary it has, and the ranges of shards that merge covers. A summary handed over in memory (the
    local runner) is merged at once; the others (Ray, shards a killed run committed) are read from the
    store at the next fold. A shard without a readable summary (committed by an older version) is left
    uncovered: readers summarise its manifest.
    """

    def __init__(self, run: RunDir, state: LedgerState) -> None:
        self.covered, merged = read_folded(run)
        if not self.covered <= set(state.done):  # not this ledger's (a run directory rebuilt by hand)
            self.covered, merged = set(), None
        self.merged = merged or ShardStats()
        self.to_read = set(state.done) - self.covered
        self.changed = bool(self.to_read)
        super().__init__(run, state)

    def add(self, entry: dict, stats: ShardStats | None = None) -> None:
        index = entry["shard"]
        if index not in self.covered:
            if stats is not None:
                self.merged.merge(stats)
                self.covered.add(index)
                self.to_read.discard(index)
            else:
                self.to_read.add(index)
            self.changed = True
        super().add(entry)

    def flush(self) -> None:
        super().flush()
        if self.changed:
            # An optimisation for readers (the single summaries stay the truth): a store error waits
            # for the next fold.
            with contextlib.suppress(Exception):
                self.fold_summaries()

    def fold_summaries(self) -> None:
        store = self.run.store.child(SUMMARY_DIR)
        if self.to_read:
            got = store.get_many([summary_name(i) for i in sorted(self.to_read)])
            for name, data in got.items():
                stats = _parse(data)
                if stats is not None and (m := _SUMMARY.fullmatch(name)):
                    self.merged.merge(stats)
                    self.covered.add(int(m.group(1)))
            self.to_read = set()  # those without one stay uncovered
        store.put_bytes(FOLDED, _compact({"shards": _ranges(self.covered), "stats": self.merged.to_json()}))
        self.changed = False


# ---------------------------------------------------------------------------- curate stats


class NoSummaries(Exception):
    pass


def load_summaries(run: RunDir, done: set[int]) -> tuple[ShardStats, set[int]]:
    """The merged summaries of the `done` shards, and the shards among them that have none."""
    covered, merged = read_folded(run)
    if not covered <= done:
        covered, merged = set(), None
    total = merged or ShardStats()
    rest = sorted(done - covered)
    got = run.store.child(SUMMARY_DIR).get_many([summary_name(i) for i in rest])
    missing = set()
    for i in rest:
        stats = _parse(got[summary_name(i)]) if summary_name(i) in got else None
        if stats is None:
            missing.add(i)
        else:
            total.merge(stats)
    return total, missing


def summarise_manifest(run: RunDir, index: int) -> ShardStats:
    """A committed shard's summary computed from its manifest (shards committed before summaries)."""
    import io

    import pyarrow.parquet as pq

    stats = ShardStats()
    with pq.ParquetFile(io.BytesIO(run.manifest_store.get_bytes(f"{shard_name(index)}.parquet"))) as f:
        for batch in f.iter_batches(batch_size=65536):
            stats.add(pa.Table.from_batches([batch]))
    return stats


def compute_stats(
    output: str | Path, bins: int = 10, *, exact: bool = False, storage_options: dict | None = None
) -> dict[str, Any]:
    """`curate stats`: from the summaries (one small read for a finished run), or over the manifests
    (`exact`, and runs whose shards have no summaries)."""
    from curation.query import NoManifests

    run = RunDir(output, storage_options)
    if run.local and not Path(run.root).is_dir():
        raise NoManifests(f"{output} does not exist")
    if not run.local:
        run.store.check()
    note = None
    if not exact and run.exists():
        # A finished run: the folded summary covers the whole plan (it only ever names committed
        # shards), so neither the ledger nor any manifest is read.
        covered, merged = read_folded(run)
        if merged is not None and covered == {sh["index"] for sh in run.record()["shards"]}:
            return _result(merged, run, bins, source="summaries", note=None)
    done = set(run.ledger_state().done) if run.exists() else set()
    if done and not exact:
        total, missing = load_summaries(run, done)
        if len(missing) < len(done):
            if missing:
                # committed by an older curate: the same summary, computed from their manifests
                for i in sorted(missing):
                    total.merge(summarise_manifest(run, i))
                note = f"{len(missing):,} of {len(done):,} shards had no summary: summarised from their manifests"
            return _result(total, run, bins, source="summaries", note=note)
        note = "the run's shards have no summaries (written by an older curate): computed from the manifests"
    stats, quantiles, distinct = exact_stats(output, storage_options)
    return _result(stats, run, bins, source="manifests", note=note, quantiles=quantiles, distinct=distinct)


def exact_stats(
    output: str | Path, storage_options: dict | None = None
) -> tuple[ShardStats, dict[str, dict[str, float]], int]:
    """The summary's numbers computed by DuckDB over every committed manifest, with exact quantiles and
    the exact distinct-uid count: what the summaries are tested against, and old runs' stats."""
    from curation.query import connect

    con = connect(output) if storage_options is None else connect(output, storage_options)
    types = {r[0]: r[1] for r in con.execute("DESCRIBE samples").fetchall()}
    s = ShardStats()
    s.rows, s.kept, distinct = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE keep), count(DISTINCT uid) FROM samples"
    ).fetchone()
    s.kept = s.kept or 0
    for stage, reason, n in con.execute(
        "SELECT drop_stage, drop_reason, count(*) FROM samples WHERE NOT coalesce(keep, true) GROUP BY 1, 2"
    ).fetchall():
        s.drops[(stage, reason)] = n
    skip = set(ID_COLUMNS) | set(DECISION_COLUMNS)
    names = [c for c in types if c not in skip]
    if names:
        counts = con.execute(
            "SELECT " + ", ".join(f'count(*) - count("{c}")' for c in names) + " FROM samples"
        ).fetchone()
        s.nulls = dict(zip(names, (int(n) for n in counts)))
    declared = _bins()
    quantiles: dict[str, dict[str, float]] = {}
    for col in names:
        if col not in declared or col in HASH_COLUMNS or not _numeric_sql(types[col]):
            continue
        lo, hi, step = declared[col]
        c = f'"{col}"'
        is_float = types[col] in ("FLOAT", "DOUBLE")
        nan = f"isnan({c}::DOUBLE)" if is_float else "false"
        sk = ColumnSketch()
        sk.null = s.nulls[col]
        sk.nan, sk.n, sk.min, sk.max = con.execute(
            f"SELECT count(*) FILTER (WHERE {nan}), count({c}) FILTER (WHERE NOT {nan}), "
            f"min({c}::DOUBLE) FILTER (WHERE NOT {nan}), max({c}::DOUBLE) FILTER (WHERE NOT {nan}) FROM samples"
        ).fetchone()
        if sk.n:
            sk.bins = dict(
                con.execute(
                    f"SELECT {_bin_sql(c, lo, hi, step)} AS b, count(*) FROM samples "
                    f"WHERE {c} IS NOT NULL AND NOT {nan} GROUP BY 1"
                ).fetchall()
            )
            qs = con.execute(
                f"SELECT quantile_disc({c}::DOUBLE, [{', '.join(map(str, QUANTILES))}]) FROM samples "
                f"WHERE {c} IS NOT NULL AND NOT {nan}"
            ).fetchone()[0]
            quantiles[col] = {_qname(q): float(v) for q, v in zip(QUANTILES, qs)}
        s.columns[col] = sk
    return s, quantiles, int(distinct)


def _numeric_sql(t: str) -> bool:
    return t in (
        "TINYINT",
        "SMALLINT",
        "INTEGER",
        "BIGINT",
        "UTINYINT",
        "USMALLINT",
        "UINTEGER",
        "FLOAT",
        "DOUBLE",
    )


def _qname(q: float) -> str:
    return f"p{round(q * 100)}"


def estimate_quantiles(sk: ColumnSketch, lo: float, hi: float, step: float) -> dict[str, float]:
    """Quantiles from the sub-bin counts: the sub-bin holding the value of rank ceil(q n) (DuckDB's
    quantile_disc) is exact; inside it the value is interpolated, clamped to the exact min and max."""
    if not sk.n or sk.min is None or sk.max is None:
        return {}
    n_b = n_bins(lo, hi, step)
    order = sorted(sk.bins.items())
    out = {}
    for q in QUANTILES:
        rank = max(1, math.ceil(q * sk.n))
        before = 0
        for i, c in order:
            if before + c >= rank:
                if i < 0:
                    a, b = sk.min, float(lo)
                elif i >= n_b:
                    a, b = float(hi), sk.max
                else:
                    a, b = lo + i * step, lo + (i + 1) * step
                value = a + (b - a) * (rank - before - 0.5) / c
                if step == 1 and float(lo).is_integer() and 0 <= i < n_b:
                    value = a  # integer bins of one value: exact
                out[_qname(q)] = min(max(value, sk.min), sk.max)
                break
            before += c
    return out


def buckets(sk: ColumnSketch, lo: float, hi: float, step: float, integer: bool, bins: int) -> list[list]:
    """The histogram shown: integer columns of few distinct values one bucket per value; otherwise
    `bins` buckets of whole sub-bins over the occupied ones, and the under-/overflow beside them."""
    n_b = n_bins(lo, hi, step)
    inside = sorted((i, c) for i, c in sk.bins.items() if 0 <= i < n_b and c)
    out: list[list] = []
    if sk.bins.get(-1):
        out.append([f"<{lo:g}", sk.bins[-1]])
    if inside:
        first, last = inside[0][0], inside[-1][0]
        unit = integer and step == 1 and float(lo).is_integer()
        if unit and last - first < 16:
            out += [[str(int(lo + i)), c] for i, c in inside]
        else:
            span = last - first + 1
            k = min(bins, span)
            counts = [0] * k
            for i, c in inside:
                counts[(i - first) * k // span] += c
            for b, c in enumerate(counts):
                if not c:
                    continue
                s0 = first + -(-b * span // k)  # first sub-bin of bucket b
                s1 = first + -(-(b + 1) * span // k)  # first sub-bin of the next
                a, z = lo + s0 * step, lo + s1 * step
                label = f"{int(a)}-{int(z) - 1}" if integer else f"{a:.3g}-{z:.3g}"
                out.append([label, c])
    if sk.bins.get(n_b):
        out.append([f">={hi:g}", sk.bins[n_b]])
    return out


def _result(
    s: ShardStats,
    run: RunDir,
    bins: int,
    *,
    source: str,
    note: str | None,
    quantiles: dict[str, dict[str, float]] | None = None,
    distinct: int | None = None,
) -> dict[str, Any]:
    """The stats (`curate stats --format json`) of merged summaries; `quantiles`/`distinct`: exact ones."""
    from curation.stages import manifest_columns

    reasons: dict[str, int] = {}
    by_stage: dict[str | None, dict[str | None, int]] = {}
    for (stage, reason), n in s.drops.items():
        reasons[reason] = reasons.get(reason, 0) + n
        by_stage.setdefault(stage, {})[reason] = by_stage.get(stage, {}).get(reason, 0) + n
    reasons = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], str(kv[0]))))
    exists = run.exists()
    # Shard.rows from the plan's dicts: building 232k Shard objects would double the cost of a stats
    planned = sum(sh["row_end"] - sh["row_start"] for sh in run.record()["shards"]) if exists else None
    filters, reached = [], s.rows
    for name in run.record().get("stages", []) if exists else list(by_stage):
        drops = by_stage.get(name, {})
        dropped = sum(drops.values())
        filters.append(
            {
                "stage": name,
                "reached": reached,
                "dropped": dropped,
                "pass_rate": (reached - dropped) / reached if reached else None,
                "drop_reasons": dict(sorted(drops.items(), key=lambda kv: (-kv[1], str(kv[0])))),
            }
        )
        reached -= dropped
    declared = _bins()
    types = manifest_columns()
    histograms = {}
    for col in [c for c in types if c in s.columns]:  # the registry's order
        sk, (lo, hi, step) = s.columns[col], declared[col]
        integer = pa.types.is_integer(types[col])
        h: dict[str, Any] = {"buckets": buckets(sk, lo, hi, step, integer, bins), "null": sk.null}
        if sk.nan:
            h["nan"] = sk.nan
        h["min"], h["max"] = sk.min, sk.max
        h["quantiles"] = (
            quantiles.get(col, {}) if quantiles is not None else estimate_quantiles(sk, lo, hi, step)
        )
        # within one sub-bin of the exact value (exact for integer columns of one value a bin)
        h["quantile_error"] = 0.0 if quantiles is not None or (integer and step == 1) else step
        histograms[col] = h
    uids = distinct if distinct is not None else s.uids.count()
    estimated = distinct is None and not s.uids.exact
    return {
        "rows_planned": planned,
        "rows": s.rows,
        # Rows whose (url, caption) pair, hence uid, an earlier row already had.
        "repeated_rows": max(0, s.rows - uids),
        "repeated_rows_estimated": estimated,
        # three standard errors of the HyperLogLog count (0 when exact)
        "repeated_rows_error": round(3 * HLL_ERROR * uids) if estimated else 0,
        "kept": s.kept,
        "keep_rate": s.kept / s.rows if s.rows else None,
        "filters": filters,
        "drop_reasons": reasons,
        "nulls": {k: n for k, n in s.nulls.items() if n},
        "histograms": histograms,
        "source": source,
        "note": note,
    }


def render_stats(stats: dict[str, Any]) -> str:
    from curation.query import format_table

    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = []
    if stats.get("note"):
        lines.append(f"note: {stats['note']}\n")
    planned = stats["rows_planned"]
    lines.append(
        f"rows       {stats['rows']:,}" + (f" of {planned:,} planned" if planned is not None else "")
    )
    lines.append(f"kept       {stats['kept']:,} ({pct(stats['keep_rate'])})")
    err = stats.get("repeated_rows_error", 0)
    if err:  # a sketch's count: say how far it may be off, and where the exact one is
        lines.append(
            f"repeats    about {stats['repeated_rows']:,} (+/- {err:,}) rows repeat an earlier row's (url, caption) "
            "pair (estimated; `curate stats --exact` counts them; `curate select` writes each uid once)"
        )
    elif stats["repeated_rows"]:
        lines.append(
            f"repeats    {stats['repeated_rows']:,} rows repeat an earlier row's (url, caption) pair "
            "(same uid; `curate select` writes each uid once)"
        )
    if stats["filters"]:
        lines.append("\nfilters (in pipeline order; a row is counted at the first stage that drops it)")
        lines.append(
            format_table(
                ["stage", "reached", "dropped", "pass rate"],
                [(f["stage"], f["reached"], f["dropped"], pct(f["pass_rate"])) for f in stats["filters"]],
            )
        )
    if stats["drop_reasons"]:
        lines.append("\ndrop reasons")
        lines.append(format_table(["drop_reason", "rows"], list(stats["drop_reasons"].items())))
    for col, h in stats["histograms"].items():
        total = sum(n for _, n in h["buckets"]) or 1
        lines.append(f"\n{col}" + (f"  ({h['null']:,} null: not scored)" if h["null"] else ""))
        for label, n in h["buckets"]:
            bar = "#" * max(1 if n else 0, round(40 * n / total))
            lines.append(f"  {label:>12} {n:>10,}  {bar}")
        if h.get("quantiles"):
            qs = "  ".join(f"{k} {v:.4g}" for k, v in h["quantiles"].items())
            err = h.get("quantile_error") or 0
            lines.append(f"  {qs}" + (f"  (each within {err:g})" if err else ""))
    others = {k: n for k, n in stats.get("nulls", {}).items() if k not in stats["histograms"]}
    if others:
        lines.append("\nnull values (rows a stage did not compute)")
        lines.append(format_table(["column", "rows"], list(others.items())))
    return "\n".join(lines)
