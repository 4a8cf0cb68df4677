"""`curate report`: one self-contained HTML file that shows what the filters of a run did."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from curation.cli.argtypes import add_images_from
from curation.cli.common import EXIT_OK, Formatter, UsageError, check_new_output, fail, note
from curation.core.terminal import printable

DEFAULT_SAMPLE = 48  # curation.report.DEFAULT_SAMPLE, not imported: `curate --help` stays light

DESCRIPTION = """\
Write ONE self-contained HTML file (no network, no server; open it from disk) that shows what the
filters of a `curate run` output did:

  - the funnel: rows each stage reached and dropped, drop reasons;
  - a histogram of every raw score in the manifests, with the run's thresholds drawn on it;
  - sample grids of kept pairs and of dropped pairs per drop reason: thumbnail (read from the run's
    own tars), caption, scores, and the text spotting boxes with the words the image shares with
    the caption; caption-only runs get tables;
  - the run's config, schema version, per-shard timings and failures.

--where picks the rows the grids show (and draws them over the histograms), so the report is a way
to judge a new threshold before `curate select`.

examples:
  curate report runs/demo_images                                   # writes report.html
  curate report runs/laion --where "caption_complexity BETWEEN 2 AND 3" --out c23.html
  curate report runs/laion --where "drop_reason = 'text_spotting' AND ocr_caption_overlap < 0.6"
  curate report runs/laion --sample 12 --seed 1                    # fewer, different rows
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML file: funnel, score histograms with thresholds, sample grids, run facts",
        description=DESCRIPTION,
        formatter_class=Formatter,
    )
    p.add_argument(
        "output",
        help="a `curate run` output: a directory or a URL (s3://bucket/run); works while the run is going",
    )
    p.add_argument("--out", default="report.html", help="the HTML file to write (a path or a URL)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    add_images_from(p)
    p.add_argument(
        "--sample",
        type=int,
        default=DEFAULT_SAMPLE,
        help="rows shown per outcome: kept, and each drop reason (0: no grids)",
    )
    p.add_argument("--where", help="SQL condition over the manifest columns: the rows the grids show")
    p.add_argument("--seed", type=int, default=0, help="which rows are sampled (the same every time)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    if args.sample < 0:
        raise UsageError("--sample must be >= 0")
    from curation.core.storage import is_url, open_store
    from curation.rundir import output_inside_run

    problem = output_inside_run(args.out, args.output)  # one rule with query and select --out
    if problem:
        raise UsageError(problem)
    out: Path | str = args.out if is_url(args.out) else Path(args.out)
    if isinstance(out, Path):
        check_new_output(out, args.force)
    else:
        folder, _, name = out.rstrip("/").rpartition("/")
        store = open_store(folder)
        store.check()
        if store.exists(name) and not args.force:
            raise UsageError(f"--out {out} exists; choose a new file or pass --force to replace it")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return fail("curate report draws its charts with matplotlib: pip install 'curate[report]'")
    from curation.query import NoManifests
    from curation.report import ReportError, build_report

    command = shlex.join(
        [
            "curate",
            "report",
            args.output,
            "--out",
            args.out,
            "--sample",
            str(args.sample),
            "--seed",
            str(args.seed),
        ]
        + (["--where", args.where] if args.where else [])
        + [a for loc in args.images_from for a in ("--images-from", loc)]
    )
    try:
        result = build_report(
            args.output,
            out,
            sample=args.sample,
            where=args.where,
            seed=args.seed,
            command=command,
            images_from=args.images_from,
        )
    except (NoManifests, ReportError) as e:
        return fail(e)
    size = result.size
    print(
        printable(
            f"wrote {out} ({size / 1e6:.2f} MB): {result.rows:,} rows, {result.charts} charts, "
            f"{result.samples:,} sampled rows, {result.thumbnails:,} thumbnails"
        )
    )
    if result.unreadable:
        note(f"{len(result.unreadable):,} sampled images could not be read (noted in the report):")
        for msg in result.unreadable[:10]:
            print(f"  {printable(msg)}", file=sys.stderr)  # uids and paths come from the data
    return EXIT_OK
