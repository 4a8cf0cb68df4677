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

import atexit
import contextlib
import csv
import json
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import duckdb

from curation.core.terminal import printable
from curation.rundir import RunDir

# File formats of `curate query --out` by extension, and what `--format` prints.
OUT_FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
FETCH_ROWS = 10_000


class NoManifests(Exception):
    pass


class QueryRefused(Exception):
    """A statement `curate query` does not run: it would write, attach, load or reconfigure."""


@dataclass(frozen=True)
class Limits:
    """What one connection may use, set before its configuration is locked (`curate query --memory-limit
    --threads --timeout`). DuckDB spills what does not fit in `memory` (sorts, joins, large GROUP BYs)
    to a private temporary folder of this process, never to a folder a statement could read."""

    # DuckDB's memory_limit: "4GB", "512MB", "50%". By default 3.5 GB, so that a whole `select` or
    # `report` process stays within 4 GB at any row count: at 100M rows `report` peaked at 4.3 GB with
    # 4 GB here (DuckDB's own allocations beside its buffers, Python's ~0.3 GB). `curate query` has
    # its own --memory-limit (4GB by default).
    memory: str = "3.5GB"
    threads: int | None = None  # None: one per core
    timeout: float | None = 3600.0  # seconds one statement may run (curate query); None: no limit


def connect(
    output: str | Path, storage_options: dict | None = None, limits: Limits | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB, locked down, with a view `samples` over the committed rows of `output`
    (a `curate run` output: a local directory or a URL), `dedup` over `curate dedup`'s table and
    `hard_pairs` over the table a `curate mine` output holds.

    The rows are read from the run's data files (`curation.rundir.data_files`: compacted parts and
    the manifests of shards no part holds). On local disk DuckDB reads those files, and nothing else.
    On an object store DuckDB scans Arrow datasets over the objects (`curation.remote`): the statement's
    columns and filters are pushed into the scan, which fetches only the byte ranges they need through
    the store's own filesystem, with a local cache keyed by ETag. DuckDB itself never gets network
    access or the store's credentials (its httpfs extension would need both).
    """
    limits = limits or Limits()
    run = RunDir(output, storage_options)
    local = run.local
    if local and not Path(run.root).is_dir():
        raise NoManifests(f"{output} does not exist")
    if not local:
        run.store.check()
    names, skipped = run.readable_manifests()  # a lying ledger entry or a lost manifest: named, not read
    for line in skipped:
        print(f"curate: skipped: {printable(line)}", file=sys.stderr, flush=True)
    pairs_found = (
        (Path(run.root) / "hard_pairs.parquet").is_file() if local else run.store.exists("hard_pairs.parquet")
    )
    # `curate dedup`'s table, when it has run: uid, dup_group, dup_rank, dup_keep, dup_kind
    dedup_found = bool(names) and (
        (Path(run.root) / "dedup" / "dedup.parquet").is_file()
        if local
        else run.store.exists("dedup/dedup.parquet")
    )
    # `curate decontaminate`'s matches, when it has run (curation/decontaminate.py)
    decon_rel = "decontamination/matches.parquet"
    decon_found = bool(names) and (
        (Path(run.root) / decon_rel).is_file() if local else run.store.exists(decon_rel)
    )
    if not names and not pairs_found:
        hint = "the run has not finished a shard yet" if run.exists() else "is this a `curate run` output?"
        raise NoManifests(f"no manifests under {run.store.url_of('manifests')} ({hint})")
    con = duckdb.connect(
        ":memory:",
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
            "allow_unsigned_extensions": False,
        },
    )
    # DuckDB's default temp_directory is `.tmp` of the current directory, and it stays readable after
    # external access is switched off: spill into a fresh private folder instead (issue 28).
    con.execute(f"SET temp_directory = {_sql_string(_scratch.mkdtemp(prefix='curate-duckdb-'))}")
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB|%)\s*", limits.memory, re.I):
        raise LimitError(f"{limits.memory!r} is not a size such as 4GB, 512MB or 50%")
    try:
        con.execute(f"SET memory_limit = {_sql_string(limits.memory)}")
    except duckdb.Error as e:
        raise LimitError(f"{limits.memory!r}: {explain_error(e)}") from None
    if limits.threads is not None:
        con.execute(f"SET threads = {int(limits.threads)}")
    con.execute("SET python_enable_replacements = false")  # no Python variable is a table
    views: dict[str, str] = {}
    if local:
        files = [str(Path(run.manifests, n).resolve()) for n in names]
        pairs = [str((Path(run.root) / "hard_pairs.parquet").resolve())] if pairs_found else []
        dedups = [str((Path(run.root) / "dedup" / "dedup.parquet").resolve())] if dedup_found else []
        decons = [str((Path(run.root) / decon_rel).resolve())] if decon_found else []
        # The files, not a glob: a glob would need the directory listable, and a shard committed
        # after this point is not part of this connection's snapshot anyway.
        allowed = files + pairs + dedups + decons
        con.execute(f"SET allowed_paths = [{', '.join(_sql_string(f) for f in allowed)}]")
        if files:
            listed = ", ".join(_sql_string(f) for f in files)
            views["samples"] = f"read_parquet([{listed}], union_by_name = true)"
            # The same rows with their position in their file (`file_row_number`: input order within a
            # shard, also in a compacted part, written in shard order), so `curate select` writes samples
            # in input order, whatever order their downloads finished in.
            views["samples_in_order"] = (
                f"read_parquet([{listed}], union_by_name = true, file_row_number = true)"
            )
        if dedups:
            views["dedup"] = f"read_parquet({_sql_string(dedups[0])})"
        if decons:
            views["decontamination"] = f"read_parquet({_sql_string(decons[0])})"
        if pairs:
            views["hard_pairs"] = f"read_parquet({_sql_string(pairs[0])})"
    else:
        from curation.remote import RangeCache, object_infos, parquet_dataset

        cache = RangeCache()
        _caches.append(cache)
        wanted = [f"manifests/{n}" for n in names]
        wanted += ["dedup/dedup.parquet"] if dedup_found else []
        wanted += ["hard_pairs.parquet"] if pairs_found else []
        wanted += [decon_rel] if decon_found else []
        infos = object_infos(run.store, wanted)
        absent = [n for n in wanted if n not in infos]
        if absent:
            raise NoManifests(
                f"{len(absent)} data file(s) of {run.root} that the ledger or compaction index name are "
                f"missing: {', '.join(absent[:5])}"
            )
        tables = {
            "samples": [infos[f"manifests/{n}"] for n in names],
            "dedup": [infos["dedup/dedup.parquet"]] if dedup_found else [],
            "hard_pairs": [infos["hard_pairs.parquet"]] if pairs_found else [],
            "decontamination": [infos[decon_rel]] if decon_found else [],
        }
        con.execute("SET allowed_paths = []")
        for view, objects in tables.items():
            if objects:
                con.register(f"_{view}_objects", parquet_dataset(run.store, objects, cache))
                views[view] = f"_{view}_objects"
        if names:
            # Arrow scans of object-store files carry no row position: number the rows in scan order,
            # which DuckDB keeps as the files' order (preserve_insertion_order, on by default).
            views["samples_in_order"] = (
                "(SELECT *, row_number() OVER () AS file_row_number FROM _samples_objects)"
            )
    for view, source in views.items():
        con.execute(f"CREATE VIEW {view} AS SELECT * FROM {source}")
    if names and (concepts := _concept_names(output)) is not None:  # concept_ids index this: id, name
        import pyarrow as pa

        con.register(
            "vocabulary", pa.table({"id": pa.array(range(len(concepts)), pa.int32()), "name": concepts})
        )
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


class LimitError(ValueError):
    """A --memory-limit, --threads or --timeout DuckDB cannot take."""


@contextlib.contextmanager
def deadline(con: duckdb.DuckDBPyConnection, seconds: float | None) -> Iterator[None]:
    """Interrupt what `con` runs once `seconds` have passed (DuckDB has no statement timeout of its own);
    raises StatementTimeout instead of DuckDB's InterruptException."""
    if seconds is None:
        yield
        return
    fired = threading.Event()

    def stop() -> None:
        fired.set()
        con.interrupt()

    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    timer.start()
    try:
        yield
    except duckdb.InterruptException:
        if fired.is_set():
            raise StatementTimeout(
                f"stopped after {seconds:g} s (raise --timeout, or 0 for no limit)"
            ) from None
        raise
    finally:
        timer.cancel()
        timer.join()  # a timer thread still alive when the interpreter exits can abort it


class StatementTimeout(Exception):
    pass


class VocabularyUnavailable(Exception):
    """A run's concept vocabulary cannot be read back as it was scored (one line for the user)."""


def _concept_names(output: str | Path) -> list[str] | None:
    """The run's concept vocabulary (a concepts stage, its file unchanged since); None otherwise."""
    try:
        return concept_vocabulary(output)
    except (VocabularyUnavailable, OSError, ValueError):
        return None


def concept_vocabulary(run: str | Path) -> list[str]:
    """The concept vocabulary of a run's concepts stage, checked against the hash its run.json recorded."""
    from curation.core.storage import open_store
    from curation.models.teachers import TeacherError, resolve_vocabulary
    from curation.models.vocabulary import VocabularyError, vocabulary_sha256

    record = open_store(run).get_json("run.json")
    fingerprint = record.get("fingerprint", {})
    params = next((s["concepts"] for s in fingerprint.get("stages", []) if "concepts" in s), None)
    recorded = fingerprint.get("stage_fingerprints", {}).get("concepts", {}).get("vocabulary_sha256")
    if params is None or recorded is None:
        raise VocabularyUnavailable(
            f"{run}/run.json records no concepts stage, but its manifests have concept columns"
        )
    try:
        names = resolve_vocabulary(params["teacher"], params.get("vocabulary"))
    except (TeacherError, VocabularyError) as e:
        raise VocabularyUnavailable(f"the run's concept vocabulary: {e}") from None
    if vocabulary_sha256(names) != recorded:
        raise VocabularyUnavailable(
            f"the concept vocabulary {params.get('vocabulary') or params['teacher']!r} changed since {run} was "
            "scored: its concept ids no longer index it. Restore the file, or re-run the concepts stage."
        )
    return names


class _Scratch:
    """Temporary folders that live as long as this process (DuckDB's spill folders)."""

    def __init__(self) -> None:
        self._dirs: list[tempfile.TemporaryDirectory] = []

    def mkdtemp(self, prefix: str) -> str:
        d = tempfile.TemporaryDirectory(prefix=prefix)
        self._dirs.append(d)
        return d.name


_scratch = _Scratch()
_caches: list = []  # the range caches of this process's connections, trimmed at exit


@atexit.register
def _trim_caches() -> None:
    for cache in {c.folder: c for c in _caches}.values():  # once per cache folder
        with contextlib.suppress(Exception):
            cache.trim()


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
    running = run.is_locked()
    rows_total, rows_done = sum(s.rows for s in plan), sum(e["rows"] for e in done.values())
    rate = _recent_rate(list(done.values())) if running else None
    return {
        "output": str(run.root),
        "running": running,
        "limit": run.record().get("limit"),  # a `--limit N` trial run
        "rows_per_s": rate,
        "eta_s": (rows_total - rows_done) / rate if rate else None,
        "shards_total": len(plan),
        "shards_done": len(done),
        "shards_failed": len(failures),
        "rows_total": rows_total,
        "rows_done": rows_done,
        "kept": sum(e["kept"] for e in done.values()),
        "failures": {str(k): (v["error"].splitlines() or [""])[0] for k, v in sorted(failures.items())},
        # Ledger entries not trusted (redone by the next `curate run`) and parts or entries ignored.
        "not_trusted": {str(k): why for k, why in sorted(ledger.broken.items())},
        "ignored": ledger.notes,
    }


def _recent_rate(entries: list[dict], last: int = 20) -> float | None:
    """Rows/s over the last `last` shards committed (their ledger times), None with fewer than two."""
    timed = sorted((e["finished"], e["rows"]) for e in entries if e.get("finished"))[-last:]
    if len(timed) < 2 or timed[-1][0] <= timed[0][0]:
        return None
    return sum(rows for _, rows in timed[1:]) / (timed[-1][0] - timed[0][0])


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
        f"output   {printable(str(st['output']))}" + ("  (a run is in progress)" if st["running"] else ""),
        f"shards   {st['shards_done']}/{st['shards_total']} done, {st['shards_failed']} failed",
        f"rows     {st['rows_done']:,}/{st['rows_total']:,} done, {st['kept']:,} kept",
    ]
    if st.get("rows_per_s"):
        eta = st["eta_s"]
        lines.append(f"rate     {st['rows_per_s']:,.0f} rows/s, about {_duration(eta)} left")
    if st.get("limit") is not None:
        lines.append(
            f"limit    a `--limit {st['limit']:,}` trial: `curate run` without --limit (or a larger one) "
            "extends it"
        )
    for shard, err in st["failures"].items():
        lines.append(f"  shard {shard} failed: {printable(err)}")
    for shard, why in st.get("not_trusted", {}).items():
        lines.append(f"  shard {shard} not done: {printable(why)} (`curate run` redoes it)")
    lines += [f"  {printable(line)}" for line in st.get("ignored", [])]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    """`45s`, `12m`, `3h05m`."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
