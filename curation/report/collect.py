"""What `curate report` shows, computed with DuckDB over the `samples` view; no HTML here.

Which columns get a chart is decided from the columns the stages declare and
the columns the run's manifests have, so a stage added later is plotted
without touching this module: numbers get a histogram, statuses, languages and
booleans a bar chart of counts. Thresholds come from the run's own stages,
rebuilt from the fingerprint in run.json and asked through `Stage.thresholds()`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from curation.query import QueryRefused, condition, explain_error, funnel, select_statement
from curation.rundir import RunDir, shard_name
from curation.schema import TRANSIENT_COLUMNS
from curation.stages import STAGES, StageContext, manifest_columns

# Raw columns that are identifiers, free text or hashes: nothing to histogram.
NOT_PLOTTED = frozenset({"key", "image_path", "sha256", "phash", "error_message", "ocr_text"})
# List columns whose first element is a score worth a histogram (what it means, for the title).
FIRST_ELEMENT = {"concept_probs": "top-1 concept confidence"}
NUMERIC_BINS = 40
# Integer columns spanning at most this many values get one bar per value.
MAX_INTEGER_BARS = 50
CATEGORIES_SHOWN = 20


@dataclass(frozen=True)
class Threshold:
    """A row passes `stage` when `column op value`."""

    column: str
    op: str
    value: float
    stage: str


@dataclass
class Histogram:
    column: str
    title: str
    integer: bool
    edges: list[float]  # len(counts) + 1
    counts: list[int]
    selected: list[int] | None  # rows matching --where, per bin (None without --where)
    missing: int  # null (not scored: the cascade skipped the row) or not finite
    above: int  # rows beyond the last edge: a long tail, cut at the 99.5th percentile
    maximum: float
    thresholds: list[Threshold] = field(default_factory=list)


@dataclass
class Categories:
    column: str
    counts: list[tuple[str, int]]  # most frequent first; the rest summed as "(other)"
    selected: list[int] | None
    missing: int


@dataclass
class SampleGroup:
    """Sampled rows of one outcome: kept (reason None) or one drop reason."""

    reason: str | None
    total: int  # rows with this outcome that match --where
    rows: list[dict[str, Any]]


@dataclass
class ShardTiming:
    shard: int
    rows: int
    kept: int
    seconds: float
    finished: float  # ledger entry's mtime (epoch seconds): when the shard was committed


@dataclass
class RunFacts:
    record: dict[str, Any] | None  # run.json (None: not a `curate run` output, only manifests)
    shards: list[ShardTiming]
    failures: list[dict[str, Any]]  # ledger/*.failed.json entries
    skipped_stages: list[str]  # configured stages this version cannot rebuild (no thresholds drawn)


@dataclass
class ReportData:
    output: Path
    where: str | None
    matching: int | None  # rows matching --where
    funnel: dict[str, Any]
    histograms: list[Histogram]
    categories: list[Categories]
    groups: list[SampleGroup]
    columns: dict[str, str]  # every column of `samples` -> DuckDB type
    facts: RunFacts


class ReportError(Exception):
    """Bad input for a report (an invalid --where); one line, shown to the user."""


def _read(con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None) -> duckdb.DuckDBPyRelation:
    """Run one read-only SELECT. Every query here may embed the user's --where, so each one is
    checked as a whole (one statement, a SELECT) before it runs, as `curate query` does."""
    return con.sql(select_statement(sql), params=params)


def collect(output: str | Path, where: str | None = None, sample: int = 48, seed: int = 0) -> ReportData:
    """Everything the report shows, from the run's manifests and records (raises NoManifests)."""
    from curation.query import connect

    con = connect(output)
    run = RunDir(output)
    cond = condition(where) if where else "true"
    matching = None
    if where:
        try:
            [(matching,)] = _read(con, f"SELECT count(*) FROM samples WHERE {cond}").fetchall()
        except QueryRefused as e:
            raise ReportError(f"--where {where!r} refused: {e}") from None
        except duckdb.Error as e:
            raise ReportError(f"--where {where!r}: {explain_error(e)}") from None
    columns = dict(_read(con, "SELECT column_name, column_type FROM (DESCRIBE samples)").fetchall())
    record = run.record() if run.exists() else None
    thresholds, skipped = run_thresholds(record, run.root)
    selected = cond if where else None
    stats = funnel(con, run)
    return ReportData(
        output=run.root,
        where=where,
        matching=matching,
        funnel=stats,
        histograms=histograms(con, columns, thresholds, selected),
        categories=categories(con, columns, selected),
        groups=_pipeline_order(sample_groups(con, cond, sample, seed), stats),
        columns=columns,
        facts=RunFacts(record, shard_timings(run), failures(run), skipped),
    )


# ---------------------------------------------------------------------------- thresholds


def run_thresholds(record: dict[str, Any] | None, root: Path) -> tuple[dict[str, list[Threshold]], list[str]]:
    """Thresholds of the run's configured stages, by column; and the stages that could not be rebuilt."""
    by_column: dict[str, list[Threshold]] = {}
    skipped = []
    if record is None:
        return by_column, skipped
    context = StageContext(output_dir=root)
    for entry in record.get("fingerprint", {}).get("stages", []):
        ((name, params),) = entry.items()
        cls = STAGES.get(name)
        if cls is None:
            skipped.append(name)
            continue
        known = {f.name for f in dataclasses.fields(cls.Params)}
        try:
            stage = cls(cls.Params(**{k: v for k, v in params.items() if k in known}), context)
            rules = stage.thresholds()
        except Exception:  # a fingerprint from another version: no line is better than a wrong one
            skipped.append(name)
            continue
        for column, (op, value) in rules.items():
            by_column.setdefault(column, []).append(Threshold(column, op, float(value), name))
    return by_column, skipped


# ---------------------------------------------------------------------------- charts


def plotted(columns: dict[str, str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(column, SQL expression, title) of the numeric charts, and the categorical columns, in schema order."""
    numeric, categorical = [], []
    for name, typ in manifest_columns().items():
        if name not in columns or name in NOT_PLOTTED or name in TRANSIENT_COLUMNS or "embedding" in name:
            continue
        quoted = _quote(name)
        if pa.types.is_integer(typ) or pa.types.is_floating(typ):
            numeric.append((name, quoted, name))
        elif (pa.types.is_list(typ) or pa.types.is_fixed_size_list(typ)) and name in FIRST_ELEMENT:
            numeric.append((name, f"{quoted}[1]", f"{name}[0]: {FIRST_ELEMENT[name]}"))
        elif pa.types.is_boolean(typ) or (
            pa.types.is_string(typ) and (name == "status" or name.endswith(("_status", "_lang")))
        ):
            categorical.append(name)
    return numeric, categorical


def histograms(
    con: duckdb.DuckDBPyConnection,
    columns: dict[str, str],
    thresholds: dict[str, list[Threshold]],
    selected: str | None,
) -> list[Histogram]:
    numeric, _ = plotted(columns)
    if not numeric:
        return []
    # One scan for the ranges of every column.
    parts = []
    for _, expr, _ in numeric:
        x = f"(CASE WHEN isfinite({expr}::DOUBLE) THEN {expr}::DOUBLE END)"
        parts += [f"min({x})", f"max({x})", f"approx_quantile({x}, 0.995)", f"count({x})"]
    [ranges] = _read(con, f"SELECT count(*), {', '.join(parts)} FROM samples").fetchall()
    total = ranges[0]
    types = manifest_columns()
    out = []
    for k, (name, expr, title) in enumerate(numeric):
        lo, hi, q995, n = ranges[1 + 4 * k : 5 + 4 * k]
        integer = pa.types.is_integer(types[name])
        h = Histogram(name, title, integer, [], [], None, total - n, 0, hi, thresholds.get(name, []))
        if n:
            _fill(con, h, expr, lo, hi, q995, selected)
        out.append(h)
    return out


def _fill(
    con: duckdb.DuckDBPyConnection,
    h: Histogram,
    expr: str,
    lo: float,
    hi: float,
    q995: float,
    selected: str | None,
) -> None:
    # A long tail (caption lengths, say) would squeeze everything into a few bars: cut it at
    # the 99.5th percentile and report what lies beyond instead.
    top = q995 if hi > q995 + 0.5 * (q995 - lo) else hi
    if h.integer:
        lo, top = math.floor(lo), math.floor(top)
        width = 1 if top - lo + 1 <= MAX_INTEGER_BARS else math.ceil((top - lo + 1) / NUMERIC_BINS)
        bins = math.ceil((top - lo + 1) / width)
        start = lo - 0.5
    elif top > lo:
        bins, width, start = NUMERIC_BINS, (top - lo) / NUMERIC_BINS, lo
    else:  # one value: one bar around it
        width = 0.1 * max(abs(lo), 1.0)
        bins, start = 1, lo - width / 2
    h.edges = [start + b * width for b in range(bins + 1)]
    sel = f"count(*) FILTER (WHERE {selected})" if selected else "0"
    x = f"{expr}::DOUBLE"
    rows = _read(
        con,
        f"SELECT CASE WHEN {x} > {float(h.edges[-1])!r} THEN {bins} "
        f"ELSE least(greatest(floor(({x} - {float(start)!r}) / {float(width)!r}), 0), {bins - 1}) END::INT, "
        f"count(*), {sel} FROM samples WHERE isfinite({x}) GROUP BY 1",
    ).fetchall()
    h.counts = [0] * bins
    picked = [0] * bins
    for b, n, s in rows:
        if b == bins:
            h.above += n
        else:
            h.counts[b], picked[b] = n, s
    h.selected = picked if selected else None


def categories(
    con: duckdb.DuckDBPyConnection, columns: dict[str, str], selected: str | None
) -> list[Categories]:
    _, names = plotted(columns)
    out = []
    sel = f"count(*) FILTER (WHERE {selected})" if selected else "0"
    for name in names:
        rows = _read(
            con, f"SELECT {_quote(name)}::VARCHAR, count(*), {sel} FROM samples GROUP BY 1 ORDER BY 2 DESC, 1"
        ).fetchall()
        missing = sum(n for v, n, _ in rows if v is None)
        values = [(v, n, s) for v, n, s in rows if v is not None]
        if len(values) > CATEGORIES_SHOWN:
            rest = values[CATEGORIES_SHOWN - 1 :]
            values = [
                *values[: CATEGORIES_SHOWN - 1],
                ("(other)", sum(r[1] for r in rest), sum(r[2] for r in rest)),
            ]
        out.append(
            Categories(
                name,
                [(v, n) for v, n, _ in values],
                [s for _, _, s in values] if selected else None,
                missing,
            )
        )
    return out


# ---------------------------------------------------------------------------- samples


def sample_groups(con: duckdb.DuckDBPyConnection, cond: str, sample: int, seed: int) -> list[SampleGroup]:
    """Up to `sample` rows per outcome (kept, then drop reasons) among the rows matching `cond`.

    Rows are ranked by a hash of uid and seed: the same report every time, another seed
    for other rows. The ranking reads only uid and the decision (DuckDB's top-n `min_by`);
    whole rows are then read for the few uids picked.
    """
    n = max(1, int(sample))
    outcomes = _read(
        con,
        f"SELECT keep, drop_reason, count(*), min_by(uid, hash(uid, {int(seed)}), {n}) "
        f"FROM samples WHERE {cond} GROUP BY ALL",
    ).fetchall()
    groups: dict[tuple[bool, str | None], SampleGroup] = {}
    rank: dict[tuple[bool, str | None], dict[str, int]] = {}
    for keep, reason, total, uids in outcomes:
        groups[(keep, reason)] = SampleGroup(None if keep else (reason or "(none)"), total, [])
        rank[(keep, reason)] = {u: k for k, u in enumerate(uids)} if sample > 0 else {}
    wanted = sorted({u for r in rank.values() for u in r})
    if wanted:
        # Their shards first (two columns), then whole rows only from the row groups of those shards:
        # DuckDB hands `shard IN (...)` to the scan, which skips other row groups by their statistics
        # (compacted parts hold shards in order), so the sample grid does not read the whole run.
        picked = f"{cond} AND uid IN (SELECT unnest($uids::VARCHAR[]))"
        shards = _read(con, f"SELECT DISTINCT shard FROM samples WHERE {picked}", params={"uids": wanted})
        listed = ", ".join(str(int(s)) for (s,) in shards.fetchall() if s is not None) or "NULL"
        rows = _read(
            con,
            f"SELECT * FROM samples WHERE shard IN ({listed}) AND {picked}",
            params={"uids": wanted},
        ).to_arrow_table()
        for row in rows.to_pylist():
            outcome = (row["keep"], row["drop_reason"])
            if row["uid"] in rank.get(outcome, {}):
                groups[outcome].rows.append(row)
        for outcome, g in groups.items():
            g.rows.sort(key=lambda r, order=rank[outcome]: (order[r["uid"]], r["shard"]))
            del g.rows[sample:]
    return list(groups.values())


def _pipeline_order(groups: list[SampleGroup], stats: dict[str, Any]) -> list[SampleGroup]:
    """Kept first, then drop reasons in the order the pipeline's stages drop rows, larger first."""
    order: dict[str | None, int] = {None: -1}
    for f in stats["filters"]:
        for reason, _ in sorted(f["drop_reasons"].items(), key=lambda kv: -kv[1]):
            order.setdefault(reason, len(order))
    return sorted(groups, key=lambda g: (order.get(g.reason, len(order)), -g.total, g.reason or ""))


# ---------------------------------------------------------------------------- run facts


def shard_timings(run: RunDir) -> list[ShardTiming]:
    out = []
    for index, entry in sorted(run.done().items()):
        finished = entry.get("finished")
        if finished is None:  # a ledger written before entries carried their commit time
            path = run.ledger / f"{shard_name(index)}.json"
            finished = path.stat().st_mtime if run.local and path.exists() else math.nan
        out.append(ShardTiming(index, entry["rows"], entry["kept"], float(entry["seconds"]), finished))
    return out


def failures(run: RunDir) -> list[dict[str, Any]]:
    found = run.failures()
    return [found[k] for k in sorted(found)]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
