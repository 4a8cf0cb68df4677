"""`curate select`: a curated subset as webdataset shards, or a file of uids."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from curation.cli.argtypes import add_images_from, at_least
from curation.cli.common import EXIT_FAILED, EXIT_OK, Formatter, UsageError, check_new_output, fail, note
from curation.core.imageio import DEFAULT_MAX_PIXELS
from curation.core.terminal import printable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "select",
        help="write the samples matching a SQL condition as webdataset shards + sizes.json",
        description=(
            "Select the samples of OUTPUT (a `curate run` output) matching --where, a DuckDB SQL condition "
            "over the manifest columns, and write them to --out as webdataset shards 00000.tar, 00001.tar, ... "
            "({key}.jpg/png/webp, {key}.txt caption, {key}.json manifest row) plus sizes.json, readable by "
            'open_clip (--train-data "DIR/{00000..0000N}.tar") and `curate train`. '
            "With --uids-only, write the selected uids instead: FILE.parquet, or FILE.npy in DataComp's "
            "subset format (sorted 128-bit uids, dtype u8,u8; the input's own `uid` column where it had one). "
            "Images are read only from the run's own output and the locations named with --images-from."
        ),
        epilog=(
            'examples:\n  curate select runs/laion --where "keep AND caption_complexity >= 3" --out subsets/cat3\n'
            "  curate select runs/laion --where keep --dedup --top-fraction 0.3 --by clip_score --out subsets/top30\n"
            "  curate select runs/datacomp --where keep --uids-only --out subset.npy   # DataComp's format"
        ),
        formatter_class=Formatter,
    )
    p.add_argument("output", help="a `curate run` output: a directory or a URL (s3://bucket/run)")
    p.add_argument("--where", default="keep", help="SQL condition over the manifest columns")
    p.add_argument(
        "--out",
        required=True,
        help="new or empty directory (or empty s3://... prefix) for the shards; with --uids-only, "
        "FILE.parquet or FILE.npy (a path or a URL)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    add_images_from(p)
    p.add_argument("--shard-size", type=at_least(1), default=10_000, help="samples per tar")
    p.add_argument(
        "--max-pixels",
        type=at_least(1),
        default=DEFAULT_MAX_PIXELS,
        help="images whose header declares more pixels are left out, undecoded (Pillow's warning level); "
        "training would decode them",
    )
    p.add_argument("--uids-only", action="store_true", help="write only the selected uids (.parquet or .npy)")
    p.add_argument(
        "--dedup",
        action="store_true",
        help="one sample per duplicate group of `curate dedup` (the best-ranked one among those --where selects)",
    )
    p.add_argument(
        "--top-fraction",
        type=float,
        metavar="F",
        help="keep the top fraction F of the selected rows by --by, over the whole run (DataComp's "
        "CLIP-score baselines: --top-fraction 0.3 --by clip_score)",
    )
    p.add_argument(
        "--by", metavar="COLUMN", help="the numeric column --top-fraction ranks by (higher is better)"
    )
    p.add_argument(
        "--balance",
        metavar="ENTRIES",
        help="MetaCLIP balancing after the other options: `concepts` (top-1 concept) and/or metadata files "
        "(one entry a line, matched as whole words); docs/balance.md",
    )
    p.add_argument("--balance-t", type=float, default=20_000, metavar="T", help="pairs per entry")
    p.add_argument(
        "--balance-seed", type=at_least(0), default=0, metavar="N", help="seed of the draws (>= 0)"
    )
    p.add_argument(
        "--balance-match",
        choices=["substring", "word"],
        default="word",
        help="how a metadata entry matches a caption: whole word (default: MetaCLIP's code matches "
        "space-padded entries in space-padded captions) or substring",
    )
    p.add_argument(
        "--include-contaminated",
        action="store_true",
        help="keep the samples `curate decontaminate` matched to evaluation images (left out by default)",
    )
    p.add_argument(
        "--blur-faces",
        action="store_true",
        help="blur the faces the faces stage found in each written image (DataComp's practice); rows "
        "the stage did not look at are left out",
    )
    p.set_defaults(func=cmd_select)


def _balance(con, where: str, args: argparse.Namespace) -> str:
    from curation.balance import BalanceError, balanced_where, describe, parse_spec
    from curation.select import SelectError

    try:
        where, result = balanced_where(
            con, where, parse_spec(args.balance, args.balance_t, args.balance_seed, args.balance_match)
        )
    except BalanceError as e:
        raise SelectError(str(e)) from None
    print(describe(result, args.balance_t))
    return where


def _command(args: argparse.Namespace) -> list[str]:
    """The `curate select` arguments that reproduce this selection (for the dataset card)."""
    cmd = [
        "select",
        args.output,
        "--where",
        args.where,
        "--out",
        str(args.out),
        "--shard-size",
        str(args.shard_size),
    ]
    if args.max_pixels != DEFAULT_MAX_PIXELS:
        cmd += ["--max-pixels", str(args.max_pixels)]
    for location in args.images_from or ():
        cmd += ["--images-from", location]
    for flag in ("dedup", "blur_faces", "include_contaminated"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    if args.top_fraction is not None:
        cmd += ["--top-fraction", str(args.top_fraction), "--by", args.by]
    if args.balance:
        cmd += [
            "--balance",
            args.balance,
            "--balance-t",
            str(args.balance_t),
            "--balance-seed",
            str(args.balance_seed),
            "--balance-match",
            args.balance_match,
        ]
    return cmd


def cmd_select(args: argparse.Namespace) -> int:
    import duckdb

    from curation.core.storage import is_url
    from curation.query import NoManifests, QueryRefused, connect, explain_error
    from curation.rundir import output_inside_run
    from curation.select import SelectError, leave_out_contaminated, narrow, select_shards, select_uids

    out = args.out if is_url(args.out) else Path(args.out)  # s3://... : written to the object store
    problem = output_inside_run(args.out, args.output)
    if problem:
        raise UsageError(problem)
    if (args.top_fraction is None) != (args.by is None):
        raise UsageError("--top-fraction and --by go together, e.g. --top-fraction 0.3 --by clip_score")
    if args.top_fraction is not None and not 0 < args.top_fraction <= 1:
        raise UsageError("--top-fraction must be in (0, 1]")
    if args.blur_faces and args.uids_only:
        raise UsageError("--blur-faces blurs the images select writes; --uids-only writes none")
    if isinstance(out, Path):  # an object-store prefix must be empty (checked by select_shards)
        check_new_output(out, args.force, directory=not args.uids_only)
    try:
        con = connect(args.output)
    except NoManifests as e:
        return fail(e)
    try:
        where = (
            args.where if args.include_contaminated else leave_out_contaminated(con, args.where, say=print)
        )
        where = narrow(con, where, dedup=args.dedup, top_fraction=args.top_fraction, by=args.by, say=print)
        if args.balance:
            where = _balance(con, where, args)
        if args.uids_only:
            n = select_uids(con, where, out, force=args.force)
            print(printable(f"wrote {n:,} uids to {out}"))
            return EXIT_OK
        result = select_shards(
            con,
            args.output,
            where,
            out,
            args.shard_size,
            args.max_pixels,
            replace=args.force,
            blur_faces=args.blur_faces,
            command=_command(args),
            images_from=args.images_from,
        )
    except SelectError as e:
        return fail(e)
    except QueryRefused as e:
        return fail(f"--where {args.where!r} refused: {e}")
    except duckdb.Error as e:
        return fail(f"--where {args.where!r}: {explain_error(e)}")
    print(
        printable(f"wrote {result.samples:,} samples in {len(result.sizes)} shard(s) to {out}")
        + (
            f"; {result.no_image:,} selected rows have no image (not downloaded) and are left out"
            if result.no_image
            else ""
        )
    )
    if result.unreadable:
        note(f"{len(result.unreadable):,} selected images could not be read, left out:")
        for msg in result.unreadable[:10]:
            print(f"  {printable(msg)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
