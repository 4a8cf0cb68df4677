"""DuckDB over a run's manifests: the `samples` view, `curate stats` and `curate status`.

Only finished shards are visible (temporary files live elsewhere), so every
query here is safe while a run is in progress.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import duckdb

from curation.manifest import RunDir
from curation.schema import HASH_COLUMNS, STAGE_COLUMNS


class NoManifests(Exception):
    pass


def connect(output: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with a view `samples` over all finished manifests of `output`."""
    run = RunDir(output)
    if not run.root.is_dir():
        raise NoManifests(f"{output} does not exist")
    if not any(run.manifests.glob("shard-*.parquet")):
        hint = "the run has not finished a shard yet" if run.exists() else "is this a `curate run` output?"
        raise NoManifests(f"no manifests under {run.manifests} ({hint})")
    con = duckdb.connect()
    glob = str(run.manifests / "shard-*.parquet").replace("'", "''")
    con.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet('{glob}', union_by_name = true)")
    # `curate dedup`'s table, when it has run: uid, dup_group, dup_rank, dup_keep, dup_kind
    dedup = run.root / "dedup" / "dedup.parquet"
    if dedup.is_file():
        con.execute(f"CREATE VIEW dedup AS SELECT * FROM read_parquet('{_quote(dedup)}')")
    return con


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


def compute_stats(output: str | Path, bins: int = 10) -> dict[str, Any]:
    run = RunDir(output)
    con = connect(output)
    rows, kept = con.execute("SELECT count(*), count(*) FILTER (WHERE keep) FROM samples").fetchone()
    reasons = dict(
        con.execute(
            "SELECT drop_reason, count(*) FROM samples WHERE NOT keep GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall()
    )
    planned = sum(s.rows for s in run.plan()) if run.exists() else None

    by_stage: dict[str, dict[str, int]] = {}
    for stage, reason, n in con.execute(
        "SELECT drop_stage, drop_reason, count(*) FROM samples WHERE NOT keep GROUP BY 1, 2"
    ).fetchall():
        by_stage.setdefault(stage, {})[reason] = n
    filters = []
    reached = rows
    stage_names = run.record().get("stages", []) if run.exists() else list(by_stage)
    for name in stage_names:
        dropped = sum(by_stage.get(name, {}).values())
        filters.append(
            {
                "stage": name,
                "reached": reached,
                "dropped": dropped,
                "pass_rate": (reached - dropped) / reached if reached else None,
                "drop_reasons": by_stage.get(name, {}),
            }
        )
        reached -= dropped

    columns = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    histograms = {}
    for col, typ in STAGE_COLUMNS.items():
        numeric = str(typ).startswith("int") or str(typ).startswith("float")
        if col in columns and numeric and col not in HASH_COLUMNS:
            histograms[col] = _histogram(con, col, integer=str(typ).startswith("int"), bins=bins)
    return {
        "rows_planned": planned,
        "rows": rows,
        "kept": kept,
        "keep_rate": kept / rows if rows else None,
        "filters": filters,
        "drop_reasons": reasons,
        "histograms": histograms,
    }


def _histogram(con, col: str, integer: bool, bins: int) -> dict[str, Any]:
    lo, hi, n_null = con.execute(
        f'SELECT min("{col}"), max("{col}"), count(*) FILTER (WHERE "{col}" IS NULL) FROM samples'
    ).fetchone()
    if lo is None:
        return {"buckets": [], "null": n_null}
    if integer and hi - lo < 16:
        pairs = con.execute(
            f'SELECT "{col}", count(*) FROM samples WHERE "{col}" IS NOT NULL GROUP BY 1 ORDER BY 1'
        ).fetchall()
        return {"buckets": [[str(v), n] for v, n in pairs], "null": n_null}
    width = (hi - lo) / bins or 1
    if integer:
        width = max(1, math.ceil(width))
    pairs = con.execute(
        f'SELECT least(floor(("{col}" - {lo}) / {width}), {bins - 1})::INT AS b, count(*) '
        f'FROM samples WHERE "{col}" IS NOT NULL GROUP BY 1 ORDER BY 1'
    ).fetchall()
    buckets = []
    for b, n in pairs:
        a = lo + b * width
        label = f"{int(a)}-{int(a + width - 1)}" if integer else f"{a:.3g}-{a + width:.3g}"
        buckets.append([label, n])
    return {"buckets": buckets, "null": n_null}


def compute_status(output: str | Path) -> dict[str, Any]:
    run = RunDir(output)
    if not run.exists():
        raise NoManifests(f"{output} has no run.json: not a `curate run` output (yet)")
    plan = run.plan()
    done = run.done()
    failures = run.failures()
    return {
        "output": str(run.root),
        "running": run.is_locked(),
        "shards_total": len(plan),
        "shards_done": len(done),
        "shards_failed": len(failures),
        "rows_total": sum(s.rows for s in plan),
        "rows_done": sum(e["rows"] for e in done.values()),
        "kept": sum(e["kept"] for e in done.values()),
        "failures": {str(k): v["error"].splitlines()[0] for k, v in sorted(failures.items())},
    }


# ---------------------------------------------------------------------------- rendering


def format_table(header: list[str], rows: list[tuple], max_rows: int | None = None) -> str:
    shown = rows if max_rows is None else rows[:max_rows]
    cells = [[_cell(v) for v in r] for r in shown]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    if max_rows is not None and len(rows) > max_rows:
        out.append("... more rows not shown (raise --max-rows, or use --out FILE or --format csv)")
    return "\n".join(out)


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def render_stats(stats: dict[str, Any]) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = []
    planned = stats["rows_planned"]
    lines.append(
        f"rows       {stats['rows']:,}" + (f" of {planned:,} planned" if planned is not None else "")
    )
    lines.append(f"kept       {stats['kept']:,} ({pct(stats['keep_rate'])})")
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
    return "\n".join(lines)


def render_status(st: dict[str, Any]) -> str:
    lines = [
        f"output   {st['output']}" + ("  (a run is in progress)" if st["running"] else ""),
        f"shards   {st['shards_done']}/{st['shards_total']} done, {st['shards_failed']} failed",
        f"rows     {st['rows_done']:,}/{st['rows_total']:,} done, {st['kept']:,} kept",
    ]
    for shard, err in st["failures"].items():
        lines.append(f"  shard {shard} failed: {err}")
    return "\n".join(lines)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
