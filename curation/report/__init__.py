"""`curate report`: one self-contained HTML file that shows what the filters did.

collect.py     DuckDB over the `samples` view: funnel, histograms, samples, run facts
charts.py      matplotlib -> inline SVG
thumbnails.py  images read from the run's tars by key, decoded safely, inlined as small JPEGs
page.py        the HTML (no script, no network, everything escaped)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curation.terminal import printable

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_SAMPLE = 48

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


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report",
        help="one self-contained HTML file: funnel, score histograms with thresholds, sample grids, run facts",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("output", help="a `curate run` output directory (works while the run is going)")
    p.add_argument("--out", default="report.html", help="the HTML file to write (default: report.html)")
    p.add_argument(
        "--sample",
        type=int,
        default=DEFAULT_SAMPLE,
        help=f"rows shown per outcome: kept, and each drop reason (default {DEFAULT_SAMPLE}; 0: no grids)",
    )
    p.add_argument("--where", help="SQL condition over the manifest columns: the rows the grids show")
    p.add_argument(
        "--seed", type=int, default=0, help="which rows are sampled (default 0: the same every time)"
    )
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from curation.query import NoManifests
    from curation.report.collect import ReportError

    if args.sample < 0:
        return _fail("--sample must be >= 0")
    out = Path(args.out)
    if out.is_dir():
        return _fail(f"--out {out} is a directory; give the HTML file to write")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return _fail("curate report draws its charts with matplotlib: pip install 'curate[report]'")
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
    )
    try:
        result = build_report(
            args.output, out, sample=args.sample, where=args.where, seed=args.seed, command=command
        )
    except (NoManifests, ReportError) as e:
        return _fail(str(e))
    size = out.stat().st_size
    print(
        f"wrote {out} ({size / 1e6:.2f} MB): {result.rows:,} rows, {result.charts} charts, "
        f"{result.samples:,} sampled rows, {result.thumbnails:,} thumbnails"
    )
    if result.unreadable:
        print(
            f"curate: {len(result.unreadable):,} sampled images could not be read (noted in the report):",
            file=sys.stderr,
        )
        for msg in result.unreadable[:10]:
            print(f"  {printable(msg)}", file=sys.stderr)  # uids and paths come from the data
    return EXIT_OK


def _fail(msg: str) -> int:
    print(f"curate: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


@dataclass
class ReportResult:
    rows: int
    charts: int
    samples: int
    thumbnails: int
    unreadable: list[str]


def build_report(
    output: str | Path,
    out: str | Path,
    sample: int = DEFAULT_SAMPLE,
    where: str | None = None,
    seed: int = 0,
    command: str = "curate report",
) -> ReportResult:
    """Collect, draw and write the report of `output` to `out` (atomically). Raises NoManifests, ReportError."""
    from curation.report import charts as ch
    from curation.report.collect import collect
    from curation.report.page import render
    from curation.report.thumbnails import Thumbnail, thumbnails

    data = collect(output, where=where or None, sample=sample, seed=seed)
    svgs = {"funnel": ch.funnel_chart(data.funnel)}
    svgs.update({f"hist:{h.column}": ch.histogram_chart(h) for h in data.histograms})
    svgs.update({f"cat:{c.column}": ch.categories_chart(c) for c in data.categories})
    created = (data.facts.record or {}).get("created")
    timings = ch.timings_chart(data.facts.shards, created)
    if timings:
        svgs["timings"] = timings
    rows = [r for g in data.groups for r in g.rows]
    thumbs, unreadable = thumbnails(data.output, rows)
    text = render(data, svgs, thumbs, unreadable, command)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8", errors="replace")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ReportResult(
        rows=data.funnel["rows"],
        charts=len(svgs),
        samples=len(rows),
        thumbnails=sum(isinstance(t, Thumbnail) for t in thumbs.values()),
        unreadable=unreadable,
    )
