"""`curate`: score image-caption pairs once, select many times.

Exit codes: 0 success, 1 the run finished but some shards failed, 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from curation.argtypes import at_least, workers
from curation.terminal import printable, stdout_is_broken

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
Offline data curation for CLIP-style pre-training.

  curate run pipelines/demo.yaml           score every pair, write Parquet manifests (resumable)
  curate status runs/demo                  shards done / total, failures
  curate stats runs/demo                   pass rate per filter, drop reasons, score histograms
  curate query runs/demo "SELECT count(*) FROM samples WHERE caption_complexity >= 3"
  curate select runs/demo --where "keep" --out subset.parquet --uids-only
  curate report runs/demo --out report.html   one HTML file: funnel, histograms, sample grids
"""
# What a process killed by SIGPIPE reports (128 + 13): `curate ... | head` ends like `cat ... | head`.
EXIT_BROKEN_PIPE = 141


def _fail(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"curate: error: {printable(msg)}", file=sys.stderr)
    return code


def _load(args: argparse.Namespace):
    """The config with the command line's overrides, checked against the world (every problem at once)."""
    from curation.validation import load_checked_config

    overrides = {}
    if getattr(args, "output", None):
        overrides["output"] = args.output
    if getattr(args, "runner", None):
        overrides["runner.type"] = args.runner
    if getattr(args, "workers", None) is not None:  # 0 too: refused as in the config
        overrides["runner.workers"] = args.workers
    if getattr(args, "no_progress", False):
        overrides["runner.progress"] = False
    return load_checked_config(args.config, overrides=overrides, limit=getattr(args, "limit", None))


# ---------------------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace) -> int:
    from curation.config import ConfigError

    try:
        if _is_training_config(args.config):
            return _validate_training(args)
        cfg = _load(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    stages = ", ".join(s.name for s in cfg.stages)
    print(f"{args.config}: ok ({cfg.input.format} input, stages: {stages}, output {cfg.output})")
    return EXIT_OK


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
    from curation.core.params import ConfigError
    from train.config import dry_run_problems, load_train_config

    cfg = load_train_config(args.config)
    problems = dry_run_problems(cfg)
    if problems:
        raise ConfigError(problems, args.config)
    print(f"{args.config}: ok (training config: model {cfg.model.name}, shards {cfg.data.shards})")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from curation.config import ConfigError
    from curation.engine import execute
    from curation.engine.errors import RunnerError
    from curation.manifest import RunConflict, RunLocked

    try:
        cfg = _load(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = execute(cfg, limit=args.limit)
    except (RunConflict, RunLocked, RunnerError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished shards are kept; run the same command again to resume", file=sys.stderr
        )
        return 130
    if summary.shards_skipped == summary.shards_total and not summary.failures:
        share = f" ({100 * summary.run_kept / summary.run_rows:.1f}%)" if summary.run_rows else ""
        print(
            f"{cfg.output}: 0 shard(s) written, {summary.shards_skipped} already done, 0 failed; "
            f"nothing left to do: the run holds {summary.run_rows:,} rows, {summary.run_kept:,} kept{share}"
        )
        return EXIT_OK
    rate = summary.rows / summary.seconds if summary.seconds else 0.0
    kept = f"{summary.kept:,} kept ({100 * summary.kept / summary.rows:.1f}%)" if summary.rows else "0 kept"
    print(
        f"{cfg.output}: {summary.shards_ok} shard(s) written, {summary.shards_skipped} already done, "
        f"{len(summary.failures)} failed; {summary.rows:,} rows, {kept}"
        + (f", {rate:,.1f} rows/s" if summary.rows else "")
    )
    if summary.failures:
        for shard, err in sorted(summary.failures.items()):
            print(f"  shard {shard} failed: {printable(err.splitlines()[0])}", file=sys.stderr)
        print("re-run the same command to retry only the failed shards", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from curation.query import NoManifests, compute_status, dumps, render_status

    try:
        st = compute_status(args.output)
    except NoManifests as e:
        return _fail(str(e))
    print(dumps(st) if args.format == "json" else render_status(st))
    return EXIT_FAILED if st["shards_failed"] else EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    from curation.query import NoManifests, compute_stats, dumps, render_stats

    try:
        st = compute_stats(args.output, bins=args.bins)
    except NoManifests as e:
        return _fail(str(e))
    print(dumps(st) if args.format == "json" else render_stats(st))
    return EXIT_OK


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    from curation.query import (
        OUT_FORMATS,
        NoManifests,
        QueryRefused,
        connect,
        explain_error,
        format_table,
        out_problem,
        select_statement,
        write_file,
        write_text,
    )

    out = Path(args.out) if args.out else None
    if out is not None:
        problem = out_problem(out, Path(args.output), args.force)
        if problem:
            return _fail(problem)
        fmt = OUT_FORMATS[out.suffix.lower()]
        if args.format not in (None, fmt):
            return _fail(f"--format {args.format} contradicts --out {out.name} (written as {fmt})")
    try:
        con = connect(args.output)
    except NoManifests as e:
        return _fail(str(e))
    try:
        statement = select_statement(args.sql)
        if out is not None:
            n = write_file(con, statement, out, fmt)
            print(f"wrote {n:,} rows to {out}")
        elif args.format in ("csv", "json"):
            write_text(con, statement, args.format, sys.stdout)
        else:
            result = con.execute(statement)
            columns = [d[0] for d in result.description]
            print(format_table(columns, result.fetchmany(args.max_rows + 1), max_rows=args.max_rows))
    except QueryRefused as e:
        return _fail(f"query refused: {e}")
    except duckdb.Error as e:
        return _fail(f"query failed: {explain_error(e)}")
    return EXIT_OK


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="curate", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from curation import __version__

    p.add_argument("--version", action="version", version=f"curate {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser(
        "run",
        help="run a pipeline config: score, decide, write manifests (resumes a half-finished output)",
        description="Run the stages of CONFIG over its input, shard by shard, into OUTPUT/manifests/*.parquet. "
        "Every input row gets one manifest row (rejected pairs have keep=false and a drop_reason). "
        "Re-running on the same output finishes only missing or failed shards.",
    )
    r.add_argument("config", help="pipeline YAML (see pipelines/demo.yaml)")
    r.add_argument("--output", "-o", help="output directory (overrides `output:` in the config)")
    r.add_argument(
        "--limit", type=at_least(1), help="process only the first N input rows (part of the run record)"
    )
    r.add_argument("--runner", choices=["local", "ray"], help="override runner.type")
    r.add_argument(
        "--workers",
        type=workers,
        help="override runner.workers: N >= 1 or auto (local: processes; ray: CPU actors per stage group)",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser(
        "validate",
        help="check a config without running it",
        description="Report every problem in CONFIG at once (unknown keys, wrong types, missing input files "
        "or columns, unwritable output, an output that holds a run made with another config), each with "
        "its key path and line. Nothing runs. A training config (`curate train`) gets a dry run: shards, "
        "sample counts, model and weights.\n\n  curate validate pipelines/demo.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("config")
    v.add_argument("--output", "-o", help="check this output directory instead of `output:` in the config")
    v.add_argument(
        "--limit",
        type=at_least(1),
        help="check as `curate run --limit N` would (it is part of the run record)",
    )
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("status", help="shards done / total, rows, failures of an output")
    s.add_argument("output")
    s.add_argument("--format", choices=["table", "json"], default="table")
    s.set_defaults(func=cmd_status)

    st = sub.add_parser(
        "stats", help="rows kept, pass rate per filter, drop reasons, score histograms (works mid-run)"
    )
    st.add_argument("output")
    st.add_argument("--format", choices=["table", "json"], default="table")
    st.add_argument(
        "--bins", type=at_least(1), default=10, help="histogram buckets for wide-ranged scores (>= 1)"
    )
    st.set_defaults(func=cmd_stats)

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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("output")
    q.add_argument("sql")
    q.add_argument(
        "--format", choices=["table", "csv", "json"], default=None, help="how to print (default: table)"
    )
    q.add_argument(
        "--out", help="write the result to FILE.parquet, FILE.csv or FILE.json instead of printing"
    )
    q.add_argument("--force", action="store_true", help="with --out: replace an existing file")
    q.add_argument(
        "--max-rows", type=at_least(0), default=1000, help="rows printed in table format (default 1000)"
    )
    q.set_defaults(func=cmd_query)

    # Commands that live with their feature; absent only in a partial checkout.
    for module in ("curation.select", "curation.report", "curation.dedup", "train.cli", "train.mining.cli"):
        if importlib.util.find_spec(module.split(".")[0]) and importlib.util.find_spec(module):
            importlib.import_module(module).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from curation.core.storage import StorageError

    try:
        code = _dispatch(argv)
        sys.stdout.flush()
        return code
    except StorageError as e:  # an unusable store (credentials, bucket, endpoint down): one line
        return _fail(str(e))
    except BrokenPipeError:
        if not stdout_is_broken():
            raise  # another pipe (a worker's, a socket's): a real failure
        # The reader went away (`| head`): stop quietly, and keep the interpreter's final flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _dispatch(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if hasattr(args, "config") and isinstance(args.config, str) and not Path(args.config).exists():
        return _fail(f"config file not found: {args.config}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
