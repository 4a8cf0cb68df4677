"""`curate run`, `validate`, `status`, `stats` and `query`: a pipeline's run and its manifests."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from curation.cli.argtypes import at_least, key_value, workers
from curation.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    Formatter,
    UsageError,
    check_new_output,
    fail,
    fail_config,
    note,
    output_error,
)
from curation.core.terminal import printable, rate


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "run",
        help="run a pipeline config: score, decide, write manifests (resumes a half-finished output)",
        description="Run the stages of CONFIG over its input, shard by shard, into OUTPUT/manifests/*.parquet. "
        "Every input row gets one manifest row (rejected pairs have keep=false and a drop_reason). "
        "Re-running on the same output finishes only missing or failed shards.\n\n"
        "  curate run pipelines/demo.yaml\n  curate run pipelines/laion.yaml --runner ray --workers auto",
        formatter_class=Formatter,
    )
    r.add_argument("config", help="pipeline YAML (see pipelines/demo.yaml)")
    r.add_argument("--output", "-o", help="output directory (default: `output:` in the config)")
    r.add_argument(
        "--limit",
        type=at_least(1),
        help="process only the first N input rows (default: all); a later run with a larger limit or none extends the same output",
    )
    r.add_argument("--runner", choices=["local", "ray"], help="override runner.type (default: the config's)")
    r.add_argument(
        "--workers",
        type=workers,
        help="override runner.workers: N >= 1 or auto (local: processes; ray: CPU actors per stage group; "
        "default: the config's)",
    )
    r.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress at all (on a terminal a bar; into a log one line per finished shard)",
    )
    _add_set(r)
    r.set_defaults(func=cmd_run)

    v = sub.add_parser(
        "validate",
        help="check a config without running it",
        description="Report every problem in CONFIG at once (unknown keys, wrong types, missing input files "
        "or columns, unwritable output, an output that holds a run made with another config), each with "
        "its key path and line. Nothing runs. A training config (`curate train`) gets a dry run: shards, "
        "sample counts, model and weights.\n\n  curate validate pipelines/demo.yaml",
        formatter_class=Formatter,
    )
    v.add_argument("config", help="pipeline YAML (see pipelines/demo.yaml) or training YAML to check")
    v.add_argument("--output", "-o", help="check this output directory instead of `output:` in the config")
    v.add_argument(
        "--limit",
        type=at_least(1),
        help="check as `curate run --limit N` would",
    )
    _add_set(v)
    v.set_defaults(func=cmd_validate)

    for name, help_, description in (
        (
            "status",
            "shards done / total, rows, failures of an output",
            "How far a `curate run` output is: shards done of the plan, rows written, failed shards "
            "with their first error line. Works while the run is going. Exit 1 when a shard failed.\n\n"
            "  curate status runs/demo\n  curate status runs/demo --format json",
        ),
        (
            "stats",
            "rows kept, pass rate per filter, drop reasons, score histograms (works mid-run)",
            "What the filters of a `curate run` output did: rows kept, each stage's pass rate and "
            "drop reasons, a histogram and quantiles of every score column. Works while the run is going. "
            "Read from the summaries each shard writes beside its manifest (one small read for a finished "
            "run); --exact reads the manifests instead.\n\n"
            "  curate stats runs/demo\n  curate stats runs/demo --format json --bins 20\n"
            "  curate stats runs/demo --exact",
        ),
    ):
        s = sub.add_parser(name, help=help_, description=description, formatter_class=Formatter)
        s.add_argument("output", help="a `curate run` output: a directory or a URL such as s3://bucket/run")
        s.add_argument("--format", choices=["table", "json"], default="table", help="how to print")
        if name == "stats":
            s.add_argument(
                "--bins", type=at_least(1), default=10, help="histogram buckets for wide-ranged scores"
            )
            s.add_argument(
                "--exact",
                action="store_true",
                help="read every manifest (exact distinct uids and quantiles) instead of the per-shard "
                "summaries; slow at scale",
            )
        s.set_defaults(func=cmd_summary)

    q = sub.add_parser(
        "query",
        help="one read-only DuckDB SELECT over the view `samples` (all finished manifests)",
        description="""\
Run one read-only SELECT over the view `samples` (every finished manifest row of OUTPUT).

  curate query runs/demo "SELECT drop_reason, count(*) FROM samples GROUP BY 1"
  curate query runs/demo "SELECT uid, caption FROM samples WHERE keep" --format csv > kept.csv
  curate query runs/demo "SELECT * FROM samples WHERE caption_actions >= 2" --out subsets/two.parquet

The connection reads this run's manifests and nothing else: statements that would write,
attach, load or reconfigure (COPY, EXPORT, ATTACH, INSTALL, LOAD, SET, PRAGMA, CREATE...)
are refused, and so are table functions over other files (read_csv('/etc/passwd')).
--out is the only way to write: FILE.parquet, FILE.csv or FILE.json (JSON lines), outside
the run directory, never over an existing file unless --force. The table format shows
control characters in captions as escapes (\\x1b); csv and json keep the data exact.""",
        formatter_class=Formatter,
    )
    q.add_argument("output", help="a `curate run` (or `curate mine`) output directory")
    q.add_argument(
        "sql",
        help="one SELECT over the view `samples` (and `dedup`, `hard_pairs`, `vocabulary` (id, name of "
        "concept_ids) where present)",
    )
    q.add_argument("--format", choices=["table", "csv", "json"], default=None, help="how to print (table)")
    q.add_argument(
        "--out", help="write the result to FILE.parquet, FILE.csv or FILE.json instead of printing"
    )
    q.add_argument("--force", action="store_true", help="with --out: replace an existing file")
    q.add_argument("--max-rows", type=at_least(0), default=1000, help="rows printed in table format")
    q.add_argument(
        "--memory-limit",
        default="4GB",
        metavar="SIZE",
        help="DuckDB's memory limit (4GB, 512MB, 50%%); larger sorts and joins spill to a private temp folder",
    )
    q.add_argument("--threads", type=at_least(1), help="DuckDB threads (default: one per core)")
    q.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="stop the statement after this long (0: no limit)",
    )
    q.set_defaults(func=cmd_query)


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=key_value,
        metavar="KEY=VALUE",
        help="override a config key (YAML value), e.g. --set runner.address=null; repeatable",
    )


def _load(args: argparse.Namespace):
    """The config with the command line's overrides, checked against the world (every problem at once)."""
    from curation.validation import load_checked_config

    overrides = dict(getattr(args, "overrides", []))
    if getattr(args, "output", None):
        overrides["output"] = args.output
    if getattr(args, "runner", None):
        overrides["runner.type"] = args.runner
    if getattr(args, "workers", None) is not None:  # 0 too: refused as in the config
        overrides["runner.workers"] = args.workers
    if getattr(args, "no_progress", False):
        overrides["runner.progress"] = False
    return load_checked_config(args.config, overrides=overrides, limit=getattr(args, "limit", None))


def cmd_validate(args: argparse.Namespace) -> int:
    from curation.config import ConfigError

    try:
        if _is_training_config(args.config):
            return _validate_training(args)
        cfg = _load(args)
    except ConfigError as e:
        return fail_config(e)
    stages = ", ".join(s.name for s in cfg.stages)
    files = _input_files(cfg)
    print(
        printable(
            f"{args.config}: ok ({cfg.input.format} input: {files}, stages: {stages}, output {cfg.output})"
        )
    )
    return EXIT_OK


def _input_files(cfg) -> str:
    """`3 file(s)`, or `6 of 10 files found (4 missing: ...)` where a brace pattern names files nobody wrote."""
    from curation.core.patterns import missing_note
    from curation.sources import make_source

    source = make_source(cfg.input, ())  # listing files needs no column names
    found, missing = source.files(), source.missing_files()
    what = "folders" if cfg.input.format == "image_folder" else "files"
    return missing_note(len(found), missing, what) if missing else f"{len(found)} {what[:-1]}(s)"


def _is_training_config(path: str) -> bool:
    """A `curate train` config (it has `output_dir`, a pipeline has `output`); raises ConfigError on bad YAML."""
    from curation.core.params import read_yaml_mapping

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return False  # the pipeline reader reports it
    return "output_dir" in read_yaml_mapping(text, path, ()).data


def _validate_training(args: argparse.Namespace) -> int:
    """A dry run of `curate train`: the config, its shards and sample counts, model and weights."""
    from train.data import describe_sources
    from train.validation import load_checked_train_config

    cfg = load_checked_train_config(args.config, overrides=dict(args.overrides))
    print(printable(f"{args.config}: ok (training config: model {cfg.model.name})"))
    for line in describe_sources(cfg.data)[0]:
        print(printable(f"  {line}"))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from curation.config import ConfigError
    from curation.core.cluster import RunnerError
    from curation.core.outputs import RunLocked
    from curation.core.storage import StoreUnavailable
    from curation.engine import execute
    from curation.rundir import RunConflict

    try:
        cfg = _load(args)
    except ConfigError as e:
        return fail_config(e)
    _say_models_load(cfg)
    if "missing" in (files := _input_files(cfg)):
        note(f"input.path: {files}; those are left out")
    try:
        summary = execute(cfg, limit=args.limit)
    except (RunConflict, RunLocked, RunnerError) as e:
        return fail(e)
    except StoreUnavailable as e:
        print(printable(f"curate: error: {cfg.output}: {e}"), file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        problem = output_error(e)
        if problem is None:
            raise
        return fail(problem if e.filename else f"{cfg.output}: {e.strerror}")
    if summary.shards_skipped == summary.shards_total and not summary.failures:
        share = f" ({100 * summary.run_kept / summary.run_rows:.1f}%)" if summary.run_rows else ""
        print(
            printable(
                f"{cfg.output}: 0 shard(s) written, {summary.shards_skipped} already done, 0 failed; "
                f"nothing left to do: the run holds {summary.run_rows:,} rows, {summary.run_kept:,} kept{share}"
            )
        )
        return EXIT_OK
    print(printable(f"{cfg.output}: {run_line(summary)}"))
    if summary.shards_skipped:  # a resumed run: this invocation's counts alone read as a small run
        print(printable(f"{cfg.output}: the whole run: {totals_line(cfg.output)}"))
    if summary.failures:
        for shard, err in sorted(summary.failures.items()):
            print(f"  shard {shard} failed: {printable(err.splitlines()[0])}", file=sys.stderr)
        print("re-run the same command to retry only the failed shards", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _say_models_load(cfg) -> None:
    """Model stages take a while to load (a minute on a CPU) before the first row: say so."""
    from curation.stages import STAGES
    from curation.stages.base import ModelStage

    models = [s.name for s in cfg.stages if issubclass(STAGES[s.name], ModelStage)]
    if models and cfg.runner.progress:
        note(f"loading models ({', '.join(models)}); progress starts with the first rows")


def totals_line(output) -> str:
    """Rows and kept over every finished shard of a run (this invocation's and earlier ones)."""
    from curation.query import compute_status

    st = compute_status(output)
    kept = f"{st['kept']:,} kept ({100 * st['kept'] / st['rows_done']:.1f}%)" if st["rows_done"] else "0 kept"
    return f"{st['shards_done']}/{st['shards_total']} shards done, {st['rows_done']:,} rows, {kept}"


def run_line(summary) -> str:
    """`N shard(s) written, ...; rows, kept, rate` of a RunSummary."""
    rows = summary.rows
    kept = f"{summary.kept:,} kept ({100 * summary.kept / rows:.1f}%)" if rows else "0 kept"
    speed = f", {rate(rows / summary.seconds)} rows/s" if rows and summary.seconds else ""
    return (
        f"{summary.shards_ok} shard(s) written, {summary.shards_skipped} already done, "
        f"{len(summary.failures)} failed; {rows:,} rows, {kept}{speed}"
    )


def cmd_summary(args: argparse.Namespace) -> int:
    """`curate status` (exit 1 when a shard failed) and `curate stats`."""
    from curation import query, stats

    status = args.command == "status"
    try:
        if status:
            st = query.compute_status(args.output)
        else:
            st = stats.compute_stats(args.output, bins=args.bins, exact=args.exact)
    except query.NoManifests as e:
        return fail(e)
    render = query.render_status if status else stats.render_stats
    print(query.dumps(st) if args.format == "json" else render(st))
    return EXIT_FAILED if status and st["shards_failed"] else EXIT_OK


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    from curation.query import (
        OUT_FORMATS,
        LimitError,
        Limits,
        NoManifests,
        QueryRefused,
        StatementTimeout,
        connect,
        deadline,
        explain_error,
        select_statement,
    )
    from curation.rundir import output_inside_run

    out = Path(args.out) if args.out else None
    if out is not None:
        if out.suffix.lower() not in OUT_FORMATS:
            raise UsageError(
                f"--out must end in {', '.join(OUT_FORMATS)} (the file format), got {out.name!r}"
            )
        problem = output_inside_run(args.out, args.output)  # as typed: a URL is not a Path (s3:/...)
        if problem:
            raise UsageError(problem)
        check_new_output(out, args.force)
        fmt = OUT_FORMATS[out.suffix.lower()]
        if args.format not in (None, fmt):
            raise UsageError(f"--format {args.format} contradicts --out {out.name} (written as {fmt})")
    if not args.timeout >= 0 or args.timeout == float("inf"):
        raise UsageError(f"--timeout must be a number of seconds >= 0 (0: no limit), got {args.timeout}")
    limits = Limits(args.memory_limit, args.threads, args.timeout or None)
    try:
        con = connect(args.output, limits=limits)
    except NoManifests as e:
        return fail(e)
    except LimitError as e:
        raise UsageError(f"--memory-limit: {e}") from None
    try:
        statement = select_statement(args.sql)
        with deadline(con, limits.timeout):
            return _answer(con, statement, args, out, fmt if out is not None else None)
    except QueryRefused as e:
        return fail(f"query refused: {e}")
    except StatementTimeout as e:
        return fail(f"query {e}")
    except duckdb.Error as e:
        return fail(f"query failed: {explain_error(e)}")


def _answer(con, statement, args: argparse.Namespace, out: Path | None, fmt: str | None) -> int:
    from curation.query import format_table, write_file, write_text

    if out is not None:
        n = write_file(con, statement, out, fmt)
        print(printable(f"wrote {n:,} rows to {out}"))
    elif args.format in ("csv", "json"):
        write_text(con, statement, args.format, sys.stdout)
    else:
        result = con.execute(statement)
        columns = [d[0] for d in result.description]
        rows = result.fetchmany(args.max_rows + 1)
        print(format_table(columns, rows, max_rows=args.max_rows))
        if not rows:
            print("(0 rows)")
    return EXIT_OK
