"""The report as one HTML document: no script, no external resource, every value escaped.

Captions, OCR text, statuses and error messages come from the web and are
hostile input: every one goes through `html.escape`, and the page declares a
Content-Security-Policy that allows no script and no network (images are data
URIs, styles inline), so even a mistake here could not run code or phone home.
"""

from __future__ import annotations

import html
import json
import re
import statistics
import time
from typing import Any

from curation.core.terminal import rate
from curation.core.text import tokens, words
from curation.report.collect import ReportData, SampleGroup, ShardTiming, Threshold, plotted
from curation.report.thumbnails import Thumbnail

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
# Shown as one "W×H px" line on a card rather than one score each.
SIZE_COLUMNS = frozenset({"width", "height", "original_width", "original_height"})
# Status values that say nothing went wrong: left off the cards.
ROUTINE_STATUSES = frozenset({"ok", "success"})
FAIL_CLASS = ' class="fail"'
CAPTION_CHARS = 400  # longer captions are cut in the cards (the full text is in the manifest)
SHARD_ROWS = 500  # rows of the per-shard table


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def render(
    data: ReportData,
    charts: dict[str, str],
    thumbs: dict[int, Thumbnail | str],
    unreadable: list[str],
    command: str,
) -> str:
    """The page. `charts` maps section keys to inline SVG ('funnel', 'hist:COL', 'cat:COL', 'timings')."""
    f = data.funnel
    rec = data.facts.record or {}
    title = f"curate report: {str(data.output).rstrip('/').rsplit('/', 1)[-1] or data.output}"
    sections = [
        _header(data, title),
        _funnel(data, charts),
        _scores(data, charts),
        _samples(data, thumbs, unreadable),
        _run(data, charts),
    ]
    footer = (
        f"<footer>Written by <code>{esc(command)}</code> at {esc(time.strftime('%Y-%m-%d %H:%M:%S %z'))}. "
        f"Every number comes from the run's manifests (DuckDB over the <code>samples</code> view); "
        f"images are read from the run's own tars. {f['rows']:,} rows, schema v{esc(rec.get('schema_version', '?'))}."
        "</footer>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(sections)
        + footer
        + "</body></html>\n"
    )


# ---------------------------------------------------------------------------- header


def _header(data: ReportData, title: str) -> str:
    f = data.funnel
    rec = data.facts.record or {}
    rate = f"{100 * f['keep_rate']:.1f}%" if f["keep_rate"] is not None else "-"
    planned = f" of {f['rows_planned']:,} planned" if f["rows_planned"] not in (None, f["rows"]) else ""
    where = ""
    if data.where:
        share = f" ({100 * data.matching / f['rows']:.1f}% of all rows)" if f["rows"] else ""
        where = (
            f'<p class="where">--where <code>{esc(data.where)}</code>: {data.matching:,} rows match{share}. '
            "The sample grids show only these; histograms draw them in orange over all rows.</p>"
        )
    nav = " · ".join(
        f'<a href="#{k}">{v}</a>'
        for k, v in (("funnel", "funnel"), ("scores", "scores"), ("samples", "samples"), ("run", "run"))
    )
    return (
        f"<header><h1>{esc(title)}</h1>"
        f'<p class="path"><code>{esc(data.output)}</code>'
        + (f" · created {esc(rec['created'])}" if rec.get("created") else "")
        + (f" · schema v{esc(rec['schema_version'])}" if "schema_version" in rec else "")
        + "</p>"
        f'<div class="kpis"><div><b>{f["rows"]:,}</b>rows{esc(planned)}</div>'
        f"<div><b>{f['kept']:,}</b>kept ({rate})</div>"
        f"<div><b>{f['rows'] - f['kept']:,}</b>dropped</div>"
        f"<div><b>{len(data.facts.shards):,}</b>shards done</div>"
        + (
            f'<div class="bad"><b>{len(data.facts.failures):,}</b>shards failed</div>'
            if data.facts.failures
            else ""
        )
        + f"</div>{where}<nav>{nav}</nav></header>"
    )


# ---------------------------------------------------------------------------- funnel


def _funnel(data: ReportData, charts: dict[str, str]) -> str:
    f = data.funnel
    rows = "".join(
        f"<tr><td>{esc(s['stage'])}</td><td>{s['reached']:,}</td><td>{s['dropped']:,}</td>"
        f"<td>{_pct(s['pass_rate'])}</td>"
        f"<td>{esc(', '.join(f'{r}: {n:,}' for r, n in sorted(s['drop_reasons'].items(), key=lambda kv: -kv[1])))}</td></tr>"
        for s in f["filters"]
    )
    reasons = "".join(
        f'<tr><td><a href="#drop-{_anchor(r)}">{esc(r)}</a></td><td>{n:,}</td><td>{_pct(n / f["rows"] if f["rows"] else None)}</td></tr>'
        for r, n in f["drop_reasons"].items()
    )
    return (
        '<section id="funnel"><h2>Funnel</h2>'
        "<p>Stages in pipeline order; a row is counted at the first stage that drops it.</p>"
        f'<div class="chart wide">{charts["funnel"]}</div>'
        '<div class="tables"><table><thead><tr><th>stage</th><th>reached</th><th>dropped</th><th>pass rate</th>'
        f"<th>drop reasons</th></tr></thead><tbody>{rows}</tbody></table>"
        + (
            "<table><thead><tr><th>drop reason</th><th>rows</th><th>of all</th></tr></thead>"
            f"<tbody>{reasons}</tbody></table>"
            if reasons
            else ""
        )
        + "</div></section>"
    )


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _anchor(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", text)


# ---------------------------------------------------------------------------- scores


def _scores(data: ReportData, charts: dict[str, str]) -> str:
    figures = [charts[f"hist:{h.column}"] for h in data.histograms] + [
        charts[f"cat:{c.column}"] for c in data.categories
    ]
    if not figures:
        return '<section id="scores"><h2>Scores</h2><p>This run has no score columns.</p></section>'
    lines = [
        f"<li><code>{esc(t.stage)}</code> keeps <code>{esc(t.column)} {esc(t.op)} {t.value:g}</code></li>"
        for h in data.histograms
        for t in h.thresholds
    ]
    skipped = data.facts.skipped_stages
    note = (
        f"<p>No threshold drawn for {esc(', '.join(skipped))}: this version of curate cannot rebuild "
        "those stages from run.json.</p>"
        if skipped
        else ""
    )
    return (
        '<section id="scores"><h2>Scores</h2>'
        "<p>Every raw measurement in the manifests, over all rows. Dashed lines are the run's thresholds "
        "(the shaded side is dropped); rows a cascade stage never saw are counted as not scored.</p>"
        + (f'<ul class="thresholds">{"".join(lines)}</ul>' if lines else "")
        + note
        + '<div class="charts">'
        + "".join(f'<div class="chart">{svg}</div>' for svg in figures)
        + "</div></section>"
    )


# ---------------------------------------------------------------------------- samples


def _samples(data: ReportData, thumbs: dict[int, Thumbnail | str], unreadable: list[str]) -> str:
    numeric, categorical = plotted(data.columns)
    score_columns = [name for name, _, _ in numeric] + categorical
    rules = {t.column: t for h in data.histograms for t in h.thresholds}
    has_images = "image_path" in data.columns
    parts = ['<section id="samples"><h2>Samples</h2>']
    how = "drawn by a hash of uid (the same rows every time; <code>--seed</code> draws others)"
    shown = max((len(g.rows) for g in data.groups), default=0)
    if data.groups and not shown:
        return parts[0] + "<p>No sample grids (<code>--sample 0</code>).</p></section>"
    parts.append(
        f"<p>Up to {shown} rows per outcome, {how}"
        + (", among the rows matching <code>--where</code>" if data.where else "")
        + ". "
        + (
            "Boxes on the images are the text that text spotting read (hover for the text). "
            if has_images
            else ""
        )
        + "Find a row again with <code>curate query OUTPUT \"SELECT * FROM samples WHERE uid = '…'\"</code>.</p>"
    )
    if unreadable:
        parts.append(
            f'<p class="bad">{len(unreadable):,} sampled images could not be read: '
            + esc("; ".join(unreadable[:5]))
            + ("; …" if len(unreadable) > 5 else "")
            + "</p>"
        )
    if not data.groups:
        parts.append("<p>No rows match.</p>")
    for g in data.groups:
        anchor = "kept" if g.reason is None else f"drop-{_anchor(g.reason)}"
        name = "kept" if g.reason is None else f"dropped: {g.reason}"
        parts.append(
            f'<h3 id="{anchor}">{esc(name)} <small>{len(g.rows):,} of {g.total:,} rows shown</small></h3>'
        )
        if not g.rows:
            continue
        if any(r.get("image_path") for r in g.rows):
            parts.append(_cards(g, score_columns, rules, thumbs))
        else:
            parts.append(_table(g, score_columns, rules, has_images))
    parts.append("</section>")
    return "".join(parts)


def _cards(
    g: SampleGroup, columns: list[str], rules: dict[str, Threshold], thumbs: dict[int, Thumbnail | str]
) -> str:
    cards = []
    for row in g.rows:
        thumb = thumbs.get(id(row))
        if isinstance(thumb, Thumbnail):
            picture = (
                f'<div class="thumb"><img src="{thumb.data_uri}" width="{thumb.width}" height="{thumb.height}" '
                f'alt="{esc(_cut(row.get("caption") or "", 120))}">{_boxes(row.get("ocr_regions"))}</div>'
            )
        else:
            picture = f'<div class="noimg">{esc(_no_image(row, thumb))}</div>'
        cards.append(
            f'<figure class="card">{picture}<figcaption>'
            + _caption(row.get("caption"))
            + _ocr(row)
            + _card_scores(row, columns, rules)
            + _meta(row)
            + "</figcaption></figure>"
        )
    return f'<div class="cards">{"".join(cards)}</div>'


def _caption(caption: str | None) -> str:
    """The caption, clamped to a few lines on the card; the title (hover) holds up to CAPTION_CHARS."""
    if not caption:
        return '<p class="caption"><i>(no caption)</i></p>'
    text = esc(_cut(caption, CAPTION_CHARS))
    return f'<p class="caption" title="{text}">{text}</p>'


def _no_image(row: dict[str, Any], thumb: str | None) -> str:
    if thumb is not None:
        return f"image refused: {thumb}"
    if row.get("image_path"):
        return "image could not be read"
    if row.get("status") and row["status"] != "success":
        return f"no image: {row['status']}"
    return "no image (not downloaded: dropped before download)"


def _boxes(regions: list[dict[str, Any]] | None) -> str:
    """Text spotting's boxes over the thumbnail: an SVG in the image's unit square."""
    if not regions:
        return ""
    polys = []
    for r in regions:
        box = r.get("box") or []
        if len(box) < 6:
            continue
        points = " ".join(f"{x:.4f},{y:.4f}" for x, y in zip(box[0::2], box[1::2]))
        polys.append(f'<polygon points="{points}"><title>{esc(r.get("text") or "")}</title></polygon>')
    return f'<svg class="boxes" viewBox="0 0 1 1" preserveAspectRatio="none">{"".join(polys)}</svg>'


def _ocr(row: dict[str, Any]) -> str:
    text = row.get("ocr_text")
    if not text:
        return ""
    caption = tokens(row.get("caption"))
    out, last = [], 0
    # The words the caption shares with the image are what text spotting drops a pair for.
    for m in words(text):
        out.append(esc(text[last : m.start()]))
        word = m.group(0)
        shared = word.lower() in caption  # tokens() holds only words of 2+ characters
        out.append(f"<mark>{esc(word)}</mark>" if shared else esc(word))
        last = m.end()
    out.append(esc(text[last:]))
    return f'<p class="ocr"><span>text in image</span> {"".join(out)}</p>'


def _card_scores(row: dict[str, Any], columns: list[str], rules: dict[str, Threshold]) -> str:
    """Thresholded scores as chips (red when the row fails the rule), the rest as one muted line."""
    chips, others = [], []
    for c in columns:
        v = row.get(c)
        if v is None or c in SIZE_COLUMNS:
            continue
        if c in rules:
            fails = not _passes(v, rules[c])
            chips.append(
                f'<span class="chip{" fail" if fails else ""}">{esc(c)} <b>{esc(_value(v))}</b></span>'
            )
        elif not (isinstance(v, str) and v in ROUTINE_STATUSES):
            others.append(f"{esc(c)} <b>{esc(_value(v))}</b>")
    if row.get("width") is not None:
        size = f"{row['width']}×{row['height']} px"
        if row.get("original_width") is not None:
            size += f" (downloaded {row['original_width']}×{row['original_height']})"
        others.append(esc(size))
    return (f'<p class="chips">{"".join(chips)}</p>' if chips else "") + (
        f'<p class="others">{" · ".join(others)}</p>' if others else ""
    )


def _passes(value: Any, rule: Threshold) -> bool:
    v = value[0] if isinstance(value, list) else value
    if not isinstance(v, (int, float)):
        return True
    return {">=": v >= rule.value, ">": v > rule.value, "<": v < rule.value, "<=": v <= rule.value}[rule.op]


def _meta(row: dict[str, Any]) -> str:
    bits = []
    if row.get("drop_stage"):
        bits.append(f"dropped by {esc(row['drop_stage'])}")
    if row.get("error_message"):
        bits.append(esc(_cut(row["error_message"], 120)))
    bits.append(f'<code title="uid">{esc(row.get("uid", ""))}</code>')
    return f'<p class="meta">{" · ".join(bits)}</p>'


def _table(g: SampleGroup, columns: list[str], rules: dict[str, Threshold], has_images: bool) -> str:
    shown = [c for c in columns if any(r.get(c) is not None for r in g.rows)]
    if any(r.get("error_message") for r in g.rows):  # why a download or decode dropped the row
        shown.append("error_message")
    # Column names break after their underscores, so many score columns leave the caption its room.
    head = "".join(f"<th>{esc(c).replace('_', '_<wbr>')}</th>" for c in ["caption", *shown, "uid"])
    body = []
    for row in g.rows:
        cells = [f'<td class="caption">{esc(_cut(row.get("caption") or "", CAPTION_CHARS))}</td>']
        for c in shown:
            v = row.get(c)
            fails = c in rules and v is not None and not _passes(v, rules[c])
            text = _cut(v, 120) if c == "error_message" and v else _value(v)
            cells.append(f"<td{FAIL_CLASS if fails else ''}>{esc(text)}</td>")
        cells.append(f'<td class="uid"><code>{esc(row.get("uid", ""))}</code></td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    fetched = any(r.get("status") is not None for r in g.rows)
    note = (
        '<p class="note">These rows were dropped before any image was fetched.</p>'
        if has_images and not fetched
        else ""
    )
    return f'{note}<div class="scroll rows"><table class="samples"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return _value(v[0]) if v else ""
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------- run


def _run(data: ReportData, charts: dict[str, str]) -> str:
    facts = data.facts
    rec = facts.record
    parts = ['<section id="run"><h2>Run</h2>']
    if rec is None:
        parts.append(
            "<p>No run.json: these manifests were not written by <code>curate run</code> (or it was removed).</p>"
        )
    else:
        plan = rec.get("shards", [])
        fp = rec.get("fingerprint", {})
        rows = [
            ("output", f"<code>{esc(data.output)}</code>"),
            ("created", esc(rec.get("created", "?"))),
            ("manifest schema", f"v{esc(rec.get('schema_version', '?'))}"),
            ("config hash", f"<code>{esc(rec.get('config_hash', '?'))}</code>"),
            ("stages", esc(" → ".join(rec.get("stages", [])))),
            (
                "shards",
                f"{len(facts.shards):,} done of {len(plan):,} planned, {len(facts.failures):,} failed",
            ),
        ]
        if fp.get("limit") is not None:
            rows.append(("--limit", esc(fp["limit"])))
        parts.append(
            '<table class="facts">'
            + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
            + "</table>"
        )
        parts.append(
            "<details open><summary>config (what changes results; runner settings are not recorded)</summary>"
            f"<pre>{esc(_yaml(fp))}</pre></details>"
        )
    parts.append(_timings(facts.shards, charts.get("timings")))
    if facts.failures:
        items = "".join(
            f"<tr><td>{esc(e.get('shard'))}</td><td>{esc(e.get('time', ''))}</td>"
            f"<td><details><summary>{esc(_cut(str(e.get('error', '')).strip().splitlines()[-1] if e.get('error') else '', 200))}</summary>"
            f"<pre>{esc(e.get('error', ''))}</pre></details></td></tr>"
            for e in facts.failures
        )
        parts.append(
            '<h3 class="bad">Failed shards</h3><p>Re-run the same <code>curate run</code> to retry only these.</p>'
            f"<table><thead><tr><th>shard</th><th>when</th><th>error</th></tr></thead><tbody>{items}</tbody></table>"
        )
    parts.append("</section>")
    return "".join(parts)


def _yaml(obj: Any) -> str:
    try:
        import yaml

        return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)
    except Exception:
        return json.dumps(obj, indent=1, default=str)


def _timings(shards: list[ShardTiming], chart: str | None) -> str:
    if not shards:
        return "<h3>Timings</h3><p>No shard has finished yet.</p>"
    timed = [s for s in shards if s.seconds > 0]
    rates = [s.rows / s.seconds for s in timed]
    summary = (
        f"{len(shards):,} shards, {sum(s.rows for s in shards):,} rows; "
        + (
            f"per shard {rate(statistics.median(rates))} rows/s median "
            f"({rate(min(rates))}-{rate(max(rates))}), {sum(s.seconds for s in timed):,.1f} shard-seconds in all"
            if rates
            else "no timings recorded"
        )
        + (f"; {len(shards) - len(timed)} adopted without a timing" if len(timed) < len(shards) else "")
        + "."
    )
    rows = "".join(
        f"<tr><td>{s.shard}</td><td>{s.rows:,}</td><td>{s.kept:,}</td><td>{s.seconds:,.2f}</td>"
        f"<td>{rate(s.rows / s.seconds) if s.seconds > 0 else ''}</td>"
        f"<td>{esc(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(s.finished)) if s.finished == s.finished else '')}</td></tr>"
        for s in shards[:SHARD_ROWS]
    )
    more = (
        f"<p>… {len(shards) - SHARD_ROWS:,} more shards not listed.</p>" if len(shards) > SHARD_ROWS else ""
    )
    return (
        f"<h3>Timings</h3><p>{summary}</p>"
        + (f'<div class="chart wide">{chart}</div>' if chart else "")
        + "<details><summary>per shard</summary><table><thead><tr><th>shard</th><th>rows</th><th>kept</th>"
        f"<th>seconds</th><th>rows/s</th><th>finished</th></tr></thead><tbody>{rows}</tbody></table>{more}</details>"
    )


STYLE = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg:#f6f8fa;--pass:#4c78a8;--drop:#e45756;--sel:#f58518}
*{box-sizing:border-box}
body{margin:0;padding:0 28px 40px;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);max-width:1320px}
header{padding:18px 0 0}
h1{font-size:22px;margin:0 0 2px}h2{font-size:18px;margin:28px 0 6px;padding-top:8px;border-top:1px solid var(--line)}
h3{font-size:15px;margin:22px 0 8px}h3 small{font-weight:normal;color:var(--muted);margin-left:6px}
p{margin:6px 0}.path{color:var(--muted)}code{font:12px/1.3 ui-monospace,"DejaVu Sans Mono",monospace;background:var(--bg);padding:1px 4px;border-radius:4px;overflow-wrap:anywhere}
nav{margin:10px 0 4px}nav a{color:var(--pass)}
.kpis{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}.kpis div{background:var(--bg);border:1px solid var(--line);border-radius:8px;padding:8px 14px;color:var(--muted)}
.kpis b{display:block;font-size:20px;color:var(--fg)}.kpis .bad b,.bad{color:var(--drop)}
.where{background:#fff4e5;border-left:4px solid var(--sel);padding:6px 10px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border-bottom:1px solid var(--line);padding:4px 10px;text-align:left;vertical-align:top}
th{background:var(--bg);font-weight:600}td:not(.caption){font-variant-numeric:tabular-nums}
.tables{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(400px,1fr));gap:14px}
.chart svg{width:100%;height:auto;display:block}.chart.wide{max-width:820px}
.thresholds{margin:4px 0;padding-left:20px;color:var(--muted)}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
.card{margin:0;border:1px solid var(--line);border-radius:8px;padding:8px;background:#fff;display:flex;flex-direction:column;gap:6px}
.thumb{position:relative;align-self:center;line-height:0}.thumb img{display:block;max-width:100%;height:auto;border-radius:4px}
.boxes{position:absolute;inset:0;width:100%;height:100%}.boxes polygon{fill:rgba(228,87,86,.16);stroke:var(--drop);stroke-width:2px;vector-effect:non-scaling-stroke}
.noimg{height:100px;display:flex;align-items:center;justify-content:center;text-align:center;background:var(--bg);border-radius:4px;color:var(--muted);font-size:12px;padding:8px}
.caption{margin:0;font-size:13px;overflow-wrap:anywhere}
.card .caption{display:-webkit-box;-webkit-line-clamp:5;line-clamp:5;-webkit-box-orient:vertical;overflow:hidden}
.ocr{margin:0;font-size:12px;overflow-wrap:anywhere}.ocr span{color:var(--muted);font-size:11px;text-transform:uppercase;letter-spacing:.03em;margin-right:4px}
mark{background:#ffd7d6;color:inherit;padding:0 1px;border-radius:2px}
.chips{margin:0;display:flex;flex-wrap:wrap;gap:4px}.chip{font-size:11px;border:1px solid var(--line);border-radius:10px;padding:0 7px;color:var(--muted);background:var(--bg)}
.chip b{color:var(--fg)}.chip.fail{border-color:var(--drop);background:#fdeceb}.chip.fail b{color:var(--drop)}
.others{margin:0;font-size:11px;color:var(--muted);overflow-wrap:anywhere}.others b{color:var(--fg);font-weight:600}
.meta{margin:0;font-size:11px;color:var(--muted)}.meta code{font-size:10px}
.scroll{overflow-x:auto}td.fail{color:var(--drop);font-weight:600}td.uid code{font-size:11px;word-break:break-all}
.samples{width:100%}.samples th{white-space:normal;overflow-wrap:normal;font-size:11px;padding:4px 6px}.samples td{padding:4px 6px}.samples td.caption{min-width:300px;max-width:520px;overflow-wrap:anywhere}
.samples td.uid{width:9.5em;min-width:9.5em}.samples td:not(.caption):not(.uid){width:1%}
.scroll.rows{max-height:600px;overflow-y:auto}.scroll.rows thead th{position:sticky;top:0;z-index:1}.note{color:var(--muted)}
.facts th{width:160px}pre{background:var(--bg);padding:10px;border-radius:6px;overflow:auto;font-size:12px;max-height:420px}
details summary{cursor:pointer;color:var(--muted);margin:6px 0}
footer{margin-top:36px;padding-top:10px;border-top:1px solid var(--line);color:var(--muted);font-size:12px}
"""
