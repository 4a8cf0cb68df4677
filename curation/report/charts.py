"""The report's charts: matplotlib figures rendered to inline SVG strings.

SVG rather than PNG: crisp at any zoom, a few KB per chart with text kept as
text (`svg.fonttype: none`), and no JavaScript, so the page works offline and
under a Content-Security-Policy that forbids scripts. matplotlib renders from
`Figure` objects directly (no pyplot, no GUI backend). Each figure gets its own
`svg.hashsalt`, so the ids inside it (clip paths) are deterministic and never
collide with another figure's on the same page.
"""

from __future__ import annotations

import io
import itertools
import math
from typing import TYPE_CHECKING, Any

from curation.report.collect import Categories, Histogram, ShardTiming, Threshold

if TYPE_CHECKING:
    from collections.abc import Callable

    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

PASS = "#4c78a8"
DROP = "#e45756"
SELECTED = "#f58518"
GREY = "#9d9d9d"
# Drop reasons, in pipeline order; orange is kept for --where.
REASON_COLORS = ("#e45756", "#b279a2", "#9d755d", "#72b7b2", "#eeca3b", "#ff9da6", "#8c6d31", "#bab0ac")

_figures = itertools.count()


def _rc() -> dict[str, Any]:
    return {
        "svg.fonttype": "none",
        "svg.hashsalt": f"curate-report-{next(_figures)}",
        "text.parse_math": False,  # values from the data are text, never mathtext ($...$)
        "font.size": 8.5,
        "font.family": "sans-serif",
        "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial"],
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.titlesize": 9.5,
        "axes.titleweight": "bold",
        "axes.titlelocation": "left",
    }


def _figure(width: float, height: float, fixed: bool) -> Figure:
    from matplotlib.figure import Figure

    if fixed:
        # Histograms all have the same furniture (short tick labels: 950, 12k, 1.2M), so fixed
        # margins fit; measuring every text (constrained layout) would cost ~0.1 s per chart.
        fig = Figure(figsize=(width, height))
        fig.subplots_adjust(left=0.13, right=0.97, top=0.88, bottom=0.13)
        return fig
    return Figure(figsize=(width, height), layout="constrained")


def _svg(fig: Figure, rc: dict[str, Any]) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context(rc):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: the SVG goes inline


def _render(draw: Callable[[Figure], None], width: float, height: float, fixed: bool = False) -> str:
    import matplotlib

    rc = _rc()
    with matplotlib.rc_context(rc):
        fig = _figure(width, height, fixed)
        draw(fig)
        return _svg(fig, rc)


def _count(n: float) -> str:
    return f"{n:,.0f}"


# ---------------------------------------------------------------------------- funnel


def funnel_chart(funnel: dict[str, Any]) -> str:
    """One bar per configured stage: rows it passed, and those it dropped split by reason."""
    filters = funnel["filters"]
    reasons = list(
        dict.fromkeys([r for f in filters for r in f["drop_reasons"]] + list(funnel["drop_reasons"]))
    )
    colors = {r: REASON_COLORS[k % len(REASON_COLORS)] for k, r in enumerate(reasons)}

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        labels = ["input"] + [f["stage"] for f in filters] + ["kept"]
        y = list(range(len(labels)))
        ax.barh(0, funnel["rows"], color=GREY)
        for k, f in enumerate(filters, start=1):
            passed = f["reached"] - f["dropped"]
            ax.barh(k, passed, color=PASS)
            left = passed
            for reason, n in sorted(f["drop_reasons"].items(), key=lambda kv: -kv[1]):
                ax.barh(k, n, left=left, color=colors.get(reason, DROP))
                left += n
            rate = f"{100 * f['pass_rate']:.1f}% pass" if f["pass_rate"] is not None else ""
            ax.text(f["reached"], k, f"  {_count(f['reached'])} reached, {rate}", va="center", fontsize=7.5)
        ax.barh(len(labels) - 1, funnel["kept"], color=PASS)
        keep = f" ({100 * funnel['keep_rate']:.1f}%)" if funnel["keep_rate"] is not None else ""
        ax.text(
            funnel["kept"], len(labels) - 1, f"  {_count(funnel['kept'])}{keep}", va="center", fontsize=7.5
        )
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_xlim(0, max(1, funnel["rows"]) * 1.45)
        _count_axis(ax.xaxis)
        ax.set_xlabel("rows")
        handles = [_patch(PASS, "passed")] + [_patch(colors[r], f"dropped: {r}") for r in reasons]
        ax.legend(handles=handles, loc="lower right", fontsize=7.5, frameon=False)

    return _render(draw, 7.5, 0.45 * (len(filters) + 2) + 0.9)


def _patch(color: str, label: str) -> Patch:
    from matplotlib.patches import Patch

    return Patch(color=color, label=label)


# ---------------------------------------------------------------------------- scores


def histogram_chart(h: Histogram) -> str:
    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        ax.set_title(h.title)
        if not h.counts:
            ax.text(0.5, 0.5, "no values (not scored)", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            return
        widths = [b - a for a, b in itertools.pairwise(h.edges)]
        # Integer bars stand apart (one per value); binned floats touch.
        gap = 0.12 if h.integer else 0.0
        left = [a + gap * w / 2 for a, w in zip(h.edges, widths)]
        widths = [w * (1 - gap) for w in widths]
        ax.bar(
            left, h.counts, width=widths, align="edge", color=PASS, label="all rows", linewidth=0, zorder=2
        )
        if h.selected is not None:
            ax.bar(
                left,
                h.selected,
                width=widths,
                align="edge",
                color=SELECTED,
                label="--where",
                linewidth=0,
                zorder=3,
            )
            ax.legend(loc="best", fontsize=7, frameon=False)
        if h.thresholds or h.missing or h.above:
            # Headroom above the tallest bar: the threshold's label and the notes sit there, never over a bar.
            ax.set_ylim(0, max(h.counts) * 1.22)
        for t in h.thresholds:
            _threshold(ax, h, t)
        notes = []
        if h.missing:
            notes.append(f"{_count(h.missing)} not scored")
        if h.above:
            top = f"{math.floor(h.edges[-1])}" if h.integer else f"{h.edges[-1]:.4g}"
            notes.append(f"{_count(h.above)} above {top} (max {h.maximum:.4g})")
        if notes:
            ax.text(
                0.99,
                0.98,
                "\n".join(notes),
                ha="right",
                va="top",
                transform=ax.transAxes,
                fontsize=7,
                color="#555",
            )
        if h.integer and len(h.counts) <= 25 and h.edges[1] - h.edges[0] == 1:
            ax.set_xticks([a + 0.5 for a in h.edges[:-1]], [f"{a + 0.5:.0f}" for a in h.edges[:-1]])
        ax.set_ylabel("rows")
        _count_axis(ax.yaxis)

    return _render(draw, 4.6, 2.7, fixed=True)


def _threshold(ax: Axes, h: Histogram, t: Threshold) -> None:
    """The decision line, labelled on the side that passes; the side that is dropped is shaded."""
    from matplotlib.transforms import blended_transform_factory

    x = t.value
    if h.integer:
        # Between bars: `>= 2` passes the bar of 2, `> 2` starts at the bar of 3.
        x = math.ceil(x) - 0.5 if t.op in (">=", "<") else math.floor(x) + 0.5
    lo, hi = h.edges[0], h.edges[-1]
    margin = 0.03 * (hi - lo)
    ax.set_xlim(min(lo, x - margin), max(hi, x + margin))
    left, right = ax.get_xlim()
    keeps_right = t.op.startswith(">")
    ax.axvspan(*((left, x) if keeps_right else (x, right)), color=DROP, alpha=0.09, linewidth=0, zorder=0)
    ax.set_xlim(left, right)
    ax.axvline(x, color=DROP, linestyle="--", linewidth=1.2, zorder=4, gid=f"threshold-{t.stage}-{t.column}")
    ax.text(
        x,
        0.97,
        f" keep {t.op} {t.value:g} ",
        transform=blended_transform_factory(ax.transData, ax.transAxes),
        ha="left" if keeps_right else "right",
        va="top",
        color=DROP,
        fontsize=7.5,
        zorder=5,
        bbox={"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 1},
    )


def _count_axis(axis: Axis) -> None:
    """Row counts: at most 5 integer ticks, written 950, 12,000, 340k, 1.2M."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    def label(v: float, _: Any) -> str:
        if abs(v) < 100_000:
            return f"{v:,.0f}"
        if abs(v) < 1_000_000:
            return f"{v / 1000:,.0f}k"
        return f"{v / 1e6:,.3g}M"

    axis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    axis.set_major_formatter(FuncFormatter(label))


def categories_chart(c: Categories) -> str:
    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        ax.set_title(c.column)
        if not c.counts:
            ax.text(0.5, 0.5, "no values (not scored)", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            return
        labels = [_short(v) for v, _ in c.counts]
        y = list(range(len(labels)))
        ax.barh(y, [n for _, n in c.counts], color=PASS, label="all rows")
        if c.selected is not None:
            ax.barh(y, c.selected, color=SELECTED, label="--where", height=0.5)
            ax.legend(loc="lower right", fontsize=7, frameon=False)
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        _count_axis(ax.xaxis)
        for k, (_, n) in enumerate(c.counts):
            ax.text(n, k, f" {_count(n)}", va="center", fontsize=7)
        ax.set_xlim(0, max(n for _, n in c.counts) * 1.25)
        if c.missing:
            ax.set_xlabel(f"rows ({_count(c.missing)} not scored)")
        else:
            ax.set_xlabel("rows")

    return _render(draw, 4.6, max(1.6, 0.9 + 0.2 * len(c.counts)))


def _short(value: str, limit: int = 28) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


# ---------------------------------------------------------------------------- timings


def timings_chart(shards: list[ShardTiming], created: str | None) -> str | None:
    """Rows/s of each shard at the time it finished, and the rows finished so far."""
    timed = sorted(
        (s for s in shards if s.seconds > 0 and math.isfinite(s.finished)), key=lambda s: s.finished
    )
    if not timed:
        return None
    start = _epoch(created) if created else None
    if start is None or start > timed[0].finished:
        start = timed[0].finished - timed[0].seconds
    span = max(1.0, timed[-1].finished - start)
    unit, scale = next(
        (u, f)
        for u, f in (("s", 1), ("min", 60), ("h", 3600), ("days", 86400))
        if span < 120 * f or u == "days"
    )
    at = [(s.finished - start) / scale for s in timed]

    def draw(fig: Figure) -> None:
        from matplotlib.ticker import FuncFormatter

        ax = fig.subplots()
        ax.set_title("shards: rows/s of each (dots), rows finished so far (line)")
        total = ax.twinx()
        total.spines["right"].set_visible(True)
        done = list(itertools.accumulate(s.rows for s in timed))
        total.step([0.0, *at], [0, *done], where="post", color=GREY, zorder=1)
        total.set_ylabel("rows finished", color="#555")
        _count_axis(total.yaxis)
        total.set_ylim(0, done[-1] * 1.08)
        rates = [s.rows / s.seconds for s in timed]
        ax.scatter(at, rates, s=14, color=PASS, zorder=3)
        ax.set_zorder(total.get_zorder() + 1)  # dots over the line
        ax.patch.set_visible(False)
        ax.set_xlabel(f"{unit} since the run started (when each shard finished)")
        ax.set_ylabel("rows/s per shard")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.3g}"))
        ax.set_ylim(0, max(rates) * 1.12)
        ax.set_xlim(0, at[-1] * 1.03)

    return _render(draw, 7.5, 2.6)


def _epoch(created: str) -> float | None:
    from datetime import datetime

    try:
        return datetime.strptime(created, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None
