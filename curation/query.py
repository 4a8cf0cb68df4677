"""DuckDB over a run's manifests: the `samples` view, `curate query`, `curate stats` and `curate status`.

Only finished shards are visible (temporary files live elsewhere), so every
query here is safe while a run is in progress.

SQL from the command line is untrusted (a copied snippet, a script's input), and
DuckDB can read any file, write any file, attach databases and install
extensions from the network. So the connection is locked down before it sees
any user SQL: it may read the run's finished manifest files and nothing else
(`allowed_paths`, then `enable_external_access = false`), no extension is
installed or loaded, and the configuration is locked so no statement can undo
that. User SQL goes through `select_statement`, which accepts one read-only SELECT
(WITH, FROM, VALUES, DESCRIBE, SUMMARIZE, SHOW...) and refuses everything else
(COPY, EXPORT, ATTACH, INSTALL, LOAD, SET, PRAGMA, CREATE...) with a message
saying why. Results are written by this module, never by DuckDB: `--out` is the
only way to write, and never into a run directory.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import duckdb

from curation.core.terminal import printable
from curation.manifest import RunDir

# File formats of `curate query --out` by extension, and what `--format` prints.
OUT_FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
FETCH_ROWS = 10_000


class NoManifests(Exception):
    pass


class QueryRefused(Exception):
    """A statement `curate query` does not run: it would write, attach, load or reconfigure."""


def connect(output: str | Path, storage_options: dict | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB, locked down, with a view `samples` over the committed manifests of `output`
    (a `curate run` output: a local directory or a URL) and `hard_pairs` over the table a `curate mine`
    output holds.

    On an object store the committed manifests are first copied (concurrently) into a private
    temporary folder, and DuckDB reads those local copies under the same lock-down: DuckDB itself
    never gets network access or the store's credentials (its httpfs extension would need both).
    """
    run = RunDir(output, storage_options)
    local = run.local
    if local and not Path(run.root).is_dir():
        raise NoManifests(f"{output} does not exist")
    if not local:
        run.store.check()
    names = run.committed_manifests()
    pairs_found = (
        (Path(run.root) / "hard_pairs.parquet").is_file() if local else run.store.exists("hard_pairs.parquet")
    )
    # `curate dedup`'s table, when it has run: uid, dup_group, dup_rank, dup_keep, dup_kind
    dedup_found = bool(names) and (
        (Path(run.root) / "dedup" / "dedup.parquet").is_file()
        if local
        else run.store.exists("dedup/dedup.parquet")
    )
    if not names and not pairs_found:
        hint = "the run has not finished a shard yet" if run.exists() else "is this a `curate run` output?"
        raise NoManifests(f"no manifests under {run.store.url_of('manifests')} ({hint})")
    if local:
        files = [str(Path(run.manifests, n).resolve()) for n in names]
        pairs = [str((Path(run.root) / "hard_pairs.parquet").resolve())] if pairs_found else []
        dedups = [str((Path(run.root) / "dedup" / "dedup.parquet").resolve())] if dedup_found else []
    else:
        folder = Path(_scratch.mkdtemp(prefix="curate-query-"))
        files = [str(p) for p in run.manifest_store.get_to_local(names, folder / "manifests")]
        dedups = (
            [str(p) for p in run.store.get_to_local(["dedup/dedup.parquet"], folder)] if dedup_found else []
        )
        pairs = (
            [str(p) for p in run.store.get_to_local(["hard_pairs.parquet"], folder)] if pairs_found else []
        )
    con = duckdb.connect(
        ":memory:",
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
            "allow_unsigned_extensions": False,
        },
    )
    # The files, not a glob: a glob would need the directory listable, and a shard committed
    # after this point is not part of this connection's snapshot anyway.
    con.execute(f"SET allowed_paths = [{', '.join(_sql_string(f) for f in files + pairs + dedups)}]")
    if files:
        listed = ", ".join(_sql_string(f) for f in files)
        con.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet([{listed}], union_by_name = true)")
    if dedups:
        con.execute(f"CREATE VIEW dedup AS SELECT * FROM read_parquet({_sql_string(dedups[0])})")
    if pairs:
        con.execute(f"CREATE VIEW hard_pairs AS SELECT * FROM read_parquet({_sql_string(pairs[0])})")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


class _Scratch:
    """Temporary folders that live as long as this process (the copies a connection reads)."""

    def __init__(self) -> None:
        self._dirs: list[tempfile.TemporaryDirectory] = []

    def mkdtemp(self, prefix: str) -> str:
        d = tempfile.TemporaryDirectory(prefix=prefix)
        self._dirs.append(d)
        return d.name


_scratch = _Scratch()


def select_statement(sql: str) -> duckdb.Statement:
    """`sql` parsed, if it is one read-only SELECT; raises QueryRefused otherwise (duckdb.Error if unparsable).

    Run the returned statement itself (`con.execute(st)` for rows, `con.sql(st)` for Arrow), so what
    runs is exactly what was checked.
    """
    statements = duckdb.extract_statements(sql)
    if len(statements) != 1:
        raise QueryRefused(f"one statement at a time (got {len(statements)})")
    (statement,) = statements
    if statement.type != duckdb.StatementType.SELECT:
        name = statement.type.name
        if name == "COPY":
            raise QueryRefused(
                "COPY is refused: curate query only reads; write a result with --out FILE.parquet|csv|json"
            )
        raise QueryRefused(
            f"{name} statements are refused: curate query runs one read-only SELECT over the view `samples`"
        )
    return statement


def condition(where: str) -> str:
    """`where` as a parenthesised condition that a comment in it cannot escape (`keep) --`):
    the newline ends a `--` comment, and an unbalanced `(`, `)` or `/*` fails to parse."""
    return f"(\n{where}\n)"


def explain_error(e: duckdb.Error) -> str:
    """A DuckDB error as one line, with what the lockdown means when it was the cause."""
    msg = " ".join(str(e).split())
    if isinstance(e, duckdb.PermissionException):
        msg += " (curate query reads only this run's finished manifests, through the view `samples`)"
    return msg


def _sql_string(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


# ---------------------------------------------------------------------------- results


def _rows(result: duckdb.DuckDBPyConnection) -> Iterator[tuple]:
    while batch := result.fetchmany(FETCH_ROWS):
        yield from batch


def write_text(con: duckdb.DuckDBPyConnection, statement: duckdb.Statement, fmt: str, stream: TextIO) -> int:
    """Write a SELECT's rows as CSV (header row first) or JSON lines, exactly; returns the number of rows."""
    result = con.execute(statement)
    columns = [d[0] for d in result.description]
    n = 0
    if fmt == "csv":
        writer = csv.writer(stream)
        writer.writerow(columns)
        for row in _rows(result):
            writer.writerow(row)
            n += 1
    elif fmt == "json":
        for row in _rows(result):
            stream.write(json.dumps(dict(zip(columns, row)), default=str) + "\n")
            n += 1
    else:
        raise ValueError(f"unknown text format {fmt!r}")
    return n


def write_file(con: duckdb.DuckDBPyConnection, statement: duckdb.Statement, path: Path, fmt: str) -> int:
    """Write a SELECT's rows to `path` atomically (a temporary file renamed into place); returns the rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            reader = con.sql(statement).to_arrow_reader(FETCH_ROWS)
            n = 0
            with pq.ParquetWriter(tmp, reader.schema, compression="zstd") as writer:
                for batch in reader:
                    writer.write_batch(batch)
                    n += batch.num_rows
        else:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                n = write_text(con, statement, fmt, f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def inside_run(out: Path, run_root: Path) -> str | None:
    """A problem when `out` (symlinks resolved) lies in the run directory, which only `curate run` writes."""
    if Path(os.path.realpath(out)).is_relative_to(os.path.realpath(run_root)):
        return f"--out {out} is inside the run directory {run_root}: choose a path outside it"
    return None


def funnel(con: duckdb.DuckDBPyConnection, run: RunDir) -> dict[str, Any]:
    """Rows, kept, drop reasons, and per configured stage (in order) the rows it reached and dropped."""
    rows, kept, uids = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE keep), count(DISTINCT uid) FROM samples"
    ).fetchone()
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
    return {
        "rows_planned": planned,
        "rows": rows,
        # Rows whose (url, caption) pair, hence uid, an earlier row already had.
        "repeated_rows": rows - uids,
        "kept": kept,
        "keep_rate": kept / rows if rows else None,
        "filters": filters,
        "drop_reasons": reasons,
    }


def compute_status(output: str | Path, storage_options: dict | None = None) -> dict[str, Any]:
    run = RunDir(output, storage_options)
    if not run.local:
        run.store.check()
    if not run.exists():
        raise NoManifests(f"{output} has no run.json: not a `curate run` output (yet)")
    plan = run.plan()
    ledger = run.ledger_state(plan, with_failures=True)
    done, failures = ledger.done, ledger.failed
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
    s = printable(str(v))
    return s if len(s) <= 80 else s[:77] + "..."


def _numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def render_status(st: dict[str, Any]) -> str:
    lines = [
        f"output   {st['output']}" + ("  (a run is in progress)" if st["running"] else ""),
        f"shards   {st['shards_done']}/{st['shards_total']} done, {st['shards_failed']} failed",
        f"rows     {st['rows_done']:,}/{st['rows_total']:,} done, {st['kept']:,} kept",
    ]
    for shard, err in st["failures"].items():
        lines.append(f"  shard {shard} failed: {printable(err)}")
    return "\n".join(lines)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
