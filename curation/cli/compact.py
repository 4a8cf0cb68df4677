"""`curate compact`: a run's shard manifests rewritten as a few large files."""

from __future__ import annotations

import argparse
import sys

from curation.cli.argtypes import at_least
from curation.cli.common import EXIT_FAILED, EXIT_OK, Formatter, fail, note
from curation.core.terminal import printable


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compact",
        help="rewrite a run's many shard manifests as a few large files (faster queries); any time",
        description=(
            "Rewrite the finished shard manifests of OUTPUT (a `curate run` output, finished or still running) "
            "into a few large Parquet files under OUTPUT/manifests/compacted/ (about --part-mb each, row "
            "groups of --row-group-rows), committed by one index. Every command sees exactly the same rows "
            "before and after; killed at any moment, run it again. The small manifests it folds in are "
            "retired, and removed by a later compaction once --retain seconds have passed (commands that "
            "started before may still be reading them). A run resumed afterwards writes new manifests that "
            "the next compaction folds in."
        ),
        epilog=(
            "examples:\n"
            "  curate compact runs/laion\n"
            "  curate compact s3://bucket/laion --retain 0     # nothing else reads the run: remove at once"
        ),
        formatter_class=Formatter,
    )
    p.add_argument("output", help="a `curate run` output: a directory or a URL (s3://bucket/run)")
    p.add_argument("--part-mb", type=at_least(1), default=512, help="size of a compacted file in MB")
    p.add_argument("--row-group-rows", type=at_least(1), default=262_144, help="rows per Parquet row group")
    p.add_argument(
        "--retain",
        type=_seconds,
        default=600.0,
        metavar="SECONDS",
        help="how long retired manifests stay for commands already reading them",
    )
    p.set_defaults(func=cmd_compact)


def cmd_compact(args: argparse.Namespace) -> int:
    from curation.compact import CompactError, compact
    from curation.core.outputs import RunLocked
    from curation.core.storage import StorageError

    try:
        r = compact(
            args.output,
            part_bytes=args.part_mb << 20,
            row_group_rows=args.row_group_rows,
            retain=args.retain,
            say=lambda m: print(printable(m)),
        )
    except (CompactError, RunLocked, StorageError) as e:
        return fail(e)
    if r.shards:
        print(
            f"compacted {r.shards:,} shard(s), {r.rows:,} rows, into {len(r.parts)} file(s); "
            f"{r.retired:,} file(s) retired"
        )
    else:
        print("nothing to compact: every finished shard is in a compacted file")
    if r.removed or r.orphans:
        print(f"removed {r.removed:,} retired file(s) and {r.orphans:,} left by a killed compaction")
    if r.skipped:
        note(f"{len(r.skipped)} shard(s) left as they are:")
        for msg in r.skipped[:10]:
            print(f"  {printable(msg)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
