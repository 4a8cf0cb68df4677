"""`curate report`: one self-contained HTML file that shows what the filters did.

collect.py     DuckDB over the `samples` view: funnel, histograms, samples, run facts
charts.py      matplotlib -> inline SVG
thumbnails.py  images read from the run's tars by key, decoded safely, inlined as small JPEGs
page.py        the HTML (no script, no network, everything escaped)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from curation.core.storage import is_url, open_store
from curation.report.collect import ReportError

DEFAULT_SAMPLE = 48
__all__ = ["DEFAULT_SAMPLE", "ReportError", "ReportResult", "build_report"]


@dataclass
class ReportResult:
    rows: int
    charts: int
    samples: int
    thumbnails: int
    unreadable: list[str]
    size: int  # bytes written


def build_report(
    output: str | Path,
    out: str | Path,
    sample: int = DEFAULT_SAMPLE,
    where: str | None = None,
    seed: int = 0,
    command: str = "curate report",
    images_from: Sequence[str] = (),
) -> ReportResult:
    """Collect, draw and write the report of `output` to `out` (atomically). Raises NoManifests, ReportError.

    `output` and `out` are local paths or URLs (s3://...); thumbnails are read from the run's own
    storage and the locations in `images_from` (`--images-from`), never from ones its run.json names."""
    import duckdb

    from curation.query import explain_error
    from curation.report import charts as ch
    from curation.report.collect import collect
    from curation.report.page import render
    from curation.report.thumbnails import Thumbnail, thumbnails

    try:
        data = collect(output, where=where or None, sample=sample, seed=seed)
    except duckdb.Error as e:  # a --where that parses alone but not inside a query of the report
        if not where:  # no --where to blame: the manifests themselves (a corrupt file)
            raise ReportError(f"reading the manifests of {output}: {explain_error(e)}") from None
        raise ReportError(f"--where {where!r}: {explain_error(e)}") from None
    svgs = {"funnel": ch.funnel_chart(data.funnel)}
    svgs.update({f"hist:{h.column}": ch.histogram_chart(h) for h in data.histograms})
    svgs.update({f"cat:{c.column}": ch.categories_chart(c) for c in data.categories})
    created = (data.facts.record or {}).get("created")
    timings = ch.timings_chart(data.facts.shards, created)
    if timings:
        svgs["timings"] = timings
    rows = [r for g in data.groups for r in g.rows]
    thumbs, unreadable = thumbnails(data.output, rows, images_from=images_from)
    text = render(data, svgs, thumbs, unreadable, command)

    # One atomic write through the storage layer: a local file (temp + rename) or one PUT to a URL.
    if is_url(out):
        folder, _, name = str(out).rpartition("/")
    else:
        folder, name = os.path.split(os.path.abspath(out))
    page = text.encode("utf-8", errors="replace")
    open_store(folder).put_bytes(name, page)
    return ReportResult(
        rows=data.funnel["rows"],
        charts=len(svgs),
        samples=len(rows),
        thumbnails=sum(isinstance(t, Thumbnail) for t in thumbs.values()),
        unreadable=unreadable,
        size=len(page),
    )
