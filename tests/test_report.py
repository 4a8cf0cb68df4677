"""`curate report`: real runs (caption stages, webdataset images), real DuckDB, the HTML parsed back.

The browser check (headless Chromium on the demo image run) is in test_report_browser.py.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.cli import main
from curation.report import build_report
from curation.report.collect import plotted
from curation.report.thumbnails import THUMBNAIL_SIZE
from curation.rundir import RunDir
from curation.stages import STAGES, StageContext, manifest_columns
from tests.helpers import LAION_1K, write_config
from tests.imageserver import jpeg, png_header_bomb

HOSTILE = [
    "</script><script>alert('caption')</script> A man rides a red bicycle down the street.",
    "<img src=x onerror=alert(1)> A woman walks her dog in the park.",
    "A chef cooks $x^2$ dishes \\frac{1}{2} price ]]></svg><svg onload=alert(2)> today.",
]


class Page(HTMLParser):
    """The tags, attributes and visible text of a report."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag]

    def ids(self) -> set[str]:
        return {a["id"] for _, a in self.tags if a.get("id")}


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory) -> Path:
    """The caption stages over 300 real LAION captions plus hostile ones, in 3 shards."""
    tmp = tmp_path_factory.mktemp("captions")
    src = pq.read_table(LAION_1K, columns=["URL", "TEXT"]).slice(0, 297)
    hostile = pa.table({"URL": [f"http://example.com/{k}.jpg" for k in range(3)], "TEXT": HOSTILE})
    pq.write_table(pa.concat_tables([src, hostile]), tmp / "in.parquet")
    out = tmp / "run"
    assert main(["run", str(write_config(tmp / "c.yaml", tmp / "in.parquet", out, rows_per_shard=100))]) == 0
    return out


def svg_texts(text: str) -> list[str]:
    """The text of every chart (matplotlib writes SVG <text> elements, fonttype none)."""
    import html

    return [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", text)]


def report(tmp_path: Path, output: Path, *args: str) -> tuple[str, Page]:
    html = tmp_path / "r.html"
    assert main(["report", str(output), "--out", str(html), "--force", *args]) == 0
    text = html.read_text()
    return text, Page(text)


# ---------------------------------------------------------------------------- caption-only runs


def test_caption_run_report_funnel_histograms_thresholds_and_tables(caption_run, tmp_path, capsys):
    text, page = report(tmp_path, caption_run)
    assert "wrote" in capsys.readouterr().out
    con = duckdb.connect()
    glob = str(caption_run / "manifests" / "*.parquet")
    counts = dict(
        con.execute(
            f"SELECT coalesce(drop_reason, 'kept'), count(*) FROM read_parquet('{glob}') GROUP BY 1"
        ).fetchall()
    )
    # Self-contained, and nothing may run or load: no script, no external URL, a CSP that forbids both.
    assert page.all("script") == [] and page.all("link") == []
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text)
    [csp] = [m for m in page.all("meta") if m.get("http-equiv") == "Content-Security-Policy"]
    assert "default-src 'none'" in csp["content"] and "script" not in csp["content"]
    # caption-only: tables, no images
    assert page.all("img") == []
    # one chart per numeric caption column + caption_status, the funnel, the shard timings
    assert len(page.all("svg")) == 4 + 1 + 1 + 1
    # the thresholds from the run's own stages, drawn on their histograms
    ids = page.ids()
    assert {
        "threshold-caption_complexity-caption_complexity",
        "threshold-caption_action-caption_verbs",
    } <= ids
    assert "keep &gt;= 2" in text and "keep &gt;= 1" in text
    # grids: kept, then reasons in pipeline order, each with min(48, total) rows
    headings = re.findall(r'<h3 id="(kept|drop-[a-z_]+)">[^<]*<small>([\d,]+) of ([\d,]+) rows shown', text)
    assert [h[0] for h in headings] == ["kept", "drop-complexity", "drop-action"]
    for anchor, shown, total in headings:
        n = counts["kept" if anchor == "kept" else anchor[5:]]
        assert (int(shown), int(total.replace(",", ""))) == (min(48, n), n)
    tables = re.findall(r'<table class="samples">.*?</table>', text, re.S)
    assert [t.count("<tr>") - 1 for t in tables] == [int(h[1]) for h in headings]
    # run facts: config, schema version, one timing row per shard
    assert "schema v2" in text and "rows_per_shard: 100" in text
    per_shard = re.search(r"<summary>per shard</summary>(.*?)</details>", text, re.S).group(1)
    assert per_shard.count("<tr>") == 1 + 3


def test_hostile_captions_render_as_text(caption_run, tmp_path):
    text, page = report(tmp_path, caption_run, "--where", "caption LIKE '%<%' OR caption LIKE '%$%'")
    assert page.all("script") == [] and page.all("img") == []
    assert not [a for _, a in page.tags if any(k.startswith("on") for k in a)]  # no event handler attribute
    visible = "".join(page.text)
    for caption in HOSTILE:
        assert caption in visible  # shown verbatim, as text
    assert "&lt;/script&gt;&lt;script&gt;alert(&#x27;caption&#x27;)" in text
    # a caption's $...$ is not mathtext and its ]]></svg> closes nothing: every svg opened is closed
    assert text.count("<svg") == text.count("</svg>")


def test_where_selects_the_grids_and_is_drawn_over_the_histograms(caption_run, tmp_path):
    where = "caption_complexity BETWEEN 2 AND 3"
    text, _ = report(tmp_path, caption_run, "--where", where, "--sample", "500")
    con = duckdb.connect()
    glob = str(caption_run / "manifests" / "*.parquet")
    uids = {u for (u,) in con.execute(f"SELECT uid FROM read_parquet('{glob}') WHERE {where}").fetchall()}
    shown = set(re.findall(r'<td class="uid"><code>([0-9a-f]{32})</code>', text))
    assert shown == uids  # --sample 500 >= every group: exactly the matching rows
    assert f"{len(uids):,} rows match" in text
    assert text.count('fill="#f58518"') + text.count("fill: #f58518") > 0  # the --where bars


def test_sample_is_stable_and_seed_changes_it(caption_run, tmp_path):
    a, _ = report(tmp_path, caption_run, "--sample", "5")
    b, _ = report(tmp_path, caption_run, "--sample", "5")
    c, _ = report(tmp_path, caption_run, "--sample", "5", "--seed", "7")
    uids = [re.findall(r'<td class="uid"><code>(\w+)</code>', t) for t in (a, b, c)]
    assert len(uids[0]) == 15 and uids[0] == uids[1] and uids[0] != uids[2]
    text, page = report(tmp_path, caption_run, "--sample", "0")
    assert "samples" not in {a.get("class") for a in page.all("table")} and "No sample grids" in text


def test_bad_input_is_one_line_exit_2_and_writes_nothing(caption_run, tmp_path, capsys):
    out = tmp_path / "r.html"
    cases = [
        [str(caption_run), "--where", "no_such_column > 1"],
        [str(caption_run), "--where", "caption_complexity >"],
        [str(tmp_path / "nowhere")],
        [str(caption_run), "--sample", "-1"],
    ]
    for args in cases:
        assert main(["report", *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("curate: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists()
    assert main(["report", str(caption_run), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_where_that_smuggles_a_statement_is_refused(caption_run, tmp_path, capsys):
    manifest = sorted((caption_run / "manifests").glob("*.parquet"))[0]
    before = manifest.read_bytes()
    smuggled = f"true); COPY (SELECT 1 AS x) TO '{manifest}' (FORMAT parquet); SELECT (1"
    assert main(["report", str(caption_run), "--where", smuggled, "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and err.count("\n") == 1
    assert manifest.read_bytes() == before and not (tmp_path / "r.html").exists()


def test_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = capsys.readouterr().out
    assert "--where" in text and "examples:" in text and "curate report runs/" in text


def test_failures_and_a_run_without_run_json(caption_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(caption_run, run)
    record = json.loads((run / "run.json").read_text())  # a 4th shard, planned but not done (failures
    record["shards"].append({**record["shards"][-1], "index": 7})  # outside the plan are ignored)
    (run / "run.json").write_text(json.dumps(record))
    RunDir(run).record_failure(7, "Traceback (most recent call last):\nValueError: <b>bad row</b>")
    text, _ = report(tmp_path, run)
    assert "Failed shards" in text and "ValueError: &lt;b&gt;bad row&lt;/b&gt;" in text
    (run / "run.json").unlink()
    text, page = report(tmp_path, run)
    assert "No run.json" in text and page.all("svg")  # still the funnel (from drop_stage) and charts
    assert "threshold-" not in text  # no stages to ask


# ---------------------------------------------------------------------------- thresholds


def _decide(name: str, params: dict, columns: dict) -> list[str | None]:
    cls = STAGES[name]
    stage = cls(cls.Params(**params), StageContext(output_dir=Path("/nonexistent")))
    return stage.decide(pa.table(columns)).to_pylist()


@pytest.mark.parametrize(
    "name, params, column, values, extra",
    [
        ("caption_complexity", {"min": 3}, "caption_complexity", [0, 2, 3, 4, 9], {}),
        ("caption_action", {"min": 1}, "caption_verbs", [0, 1, 2], {}),
        ("caption_action", {"min": 2, "count": "actions"}, "caption_actions", [0, 1, 2, 3], {}),
        ("text_spotting", {"max_overlap": 0.5}, "ocr_caption_overlap", [0.0, 0.49, 0.5, 0.51, 1.0], "ocr"),
    ],
)
def test_thresholds_say_what_decide_does(name, params, column, values, extra):
    cls = STAGES[name]
    stage = cls(cls.Params(**params), StageContext(output_dir=Path("/nonexistent")))
    rules = stage.thresholds()
    assert list(rules) == [column] and set(rules) <= set(cls.columns)
    op, value = rules[column]
    columns = {column: pa.array(values, cls.columns[column])}
    if extra == "ocr":
        columns["ocr_status"] = pa.array(["ok"] * len(values))
    passes = {">=": lambda v: v >= value, ">": lambda v: v > value, "<": lambda v: v < value}[op]
    decided = _decide(name, params, columns)
    stored = pa.array(values, cls.columns[column]).to_pylist()  # compare at the stored precision
    assert [d is None for d in decided] == [passes(v) for v in stored]


def test_every_stage_states_thresholds_on_its_own_columns():
    for name, cls in STAGES.items():
        stage = cls(cls.Params(), StageContext(output_dir=Path("/nonexistent")))
        for column, (op, value) in stage.thresholds().items():
            assert (
                column in cls.columns and op in (">=", ">", "<", "<=") and isinstance(value, int | float)
            ), name


# ---------------------------------------------------------------------------- columns other stages add


def test_columns_added_to_the_schema_are_charted_without_code_changes(caption_run, tmp_path, monkeypatch):
    """A stage another branch adds (CLIP score, concept teacher, language id, pHash, embeddings)."""
    new = {
        "clip_score": pa.float32(),
        "concept_probs": pa.list_(pa.float32()),
        "caption_lang": pa.string(),
        "clip_status": pa.string(),
        "phash": pa.uint64(),
        "image_embedding": pa.list_(pa.float32()),
    }
    monkeypatch.setitem(STAGES, "more", type("More", (), {"columns": new}))
    assert manifest_columns()["image_embedding"] == new["image_embedding"]
    run = tmp_path / "more"
    shutil.copytree(caption_run, run)
    for path in sorted((run / "manifests").glob("*.parquet")):
        t = pq.read_table(path)
        n = t.num_rows
        score = [None if k % 10 == 0 else (float("nan") if k == 1 else 0.2 + 0.001 * k) for k in range(n)]
        extra = {
            "clip_score": pa.array(score, pa.float32()),
            "concept_probs": pa.array([[0.9 - 0.001 * k, 0.05] for k in range(n)], pa.list_(pa.float32())),
            "caption_lang": pa.array(["en" if k % 3 else "<b>de</b>" for k in range(n)]),
            "clip_status": pa.array(["ok"] * n),
            "phash": pa.array(range(n), pa.uint64()),
            "image_embedding": pa.array([[0.1, 0.2]] * n, pa.list_(pa.float32())),
        }
        for name, column in extra.items():
            t = t.add_column(t.schema.get_field_index("keep"), name, column)
        pq.write_table(t, path)
    con = duckdb.connect()
    columns = dict(
        con.execute(
            f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM '{run}/manifests/*.parquet')"
        ).fetchall()
    )
    numeric, categorical = plotted(columns)
    assert [c for c, _, _ in numeric] == [
        "caption_complexity",
        "caption_actions",
        "caption_verbs",
        "caption_tokens",
        "clip_score",
        "concept_probs",
    ]
    assert categorical == ["caption_status", "clip_status", "caption_lang"]  # schema order
    text, _ = report(tmp_path, run)
    titles = svg_texts(text)
    assert "clip_score" in titles and "concept_probs[0]: top-1 concept confidence" in titles
    assert "caption_lang" in titles and "clip_status" in titles
    assert not any("phash" in t or "embedding" in t for t in titles)
    assert "&lt;b&gt;de&lt;/b&gt;" in text and "<b>de</b>" not in text
    # clip_score: the nulls and the NaN are counted as not scored, not plotted
    n = int(pc.sum(pq.read_table(run / "manifests", columns=["clip_score"]).column(0).is_null()).as_py())
    assert f"{n + 3:,} not scored" in titles  # one NaN per shard


# ---------------------------------------------------------------------------- images


def _jpeg_bytes(size=(300, 200), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """A webdataset input with good, huge-header (bomb), truncated and undecodable images."""
    tmp = tmp_path_factory.mktemp("images")
    good = "A man rides a red bicycle down the street."
    samples = [
        ("a", "jpg", _jpeg_bytes((300, 200)), good),
        ("b", "jpg", jpeg("b", (64, 48)), "A woman walks her dog in the park."),
        ("c", "png", png_header_bomb(), "A child holds a very large picture of the sea."),
        ("d", "jpg", _jpeg_bytes()[:300], "A dog chases the ball across the grass."),
        ("e", "jpg", b"not an image at all", "The cat sleeps on the warm window sill."),
        ("f", "jpg", jpeg("f"), HOSTILE[1]),
        ("g", "jpg", jpeg("g"), "dog"),  # dropped by complexity, still has its image in the tar
    ]
    tar_path = tmp / "in" / "part-0.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tar:
        for key, ext, data, caption in samples:
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    cfg = tmp / "c.yaml"
    cfg.write_text(
        f"""input: {{format: webdataset, path: "{tar_path}", rows_per_shard: 4}}
output: {tmp / "run"}
runner: {{type: local, workers: 1, progress: false}}
stages:
  - caption_complexity: {{min: 2}}
  - caption_action: {{min: 1}}
"""
    )
    assert main(["run", str(cfg)]) == 0
    return tmp / "run"


def test_thumbnails_are_read_from_the_tars_by_key_and_hostile_images_are_refused(image_run, tmp_path):
    before = sorted(p.relative_to(image_run) for p in image_run.rglob("*"))
    text, page = report(tmp_path, image_run)
    imgs = page.all("img")
    assert len(imgs) == 4  # a, b, f (kept) and g (dropped): the rest are refused, not decoded
    for img in imgs:
        assert img["src"].startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        assert max(thumb.size) <= THUMBNAIL_SIZE and (int(img["width"]), int(img["height"])) == thumb.size
    big = next(i for i in imgs if i["width"] == str(THUMBNAIL_SIZE))  # the 300x200 image, scaled down
    assert big["height"] == str(round(THUMBNAIL_SIZE * 200 / 300))
    assert "image refused: too_large" in text and "image refused: truncated" in text
    assert "image refused: decode_error" in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text  # as the alt text and the caption, escaped
    assert sorted(p.relative_to(image_run) for p in image_run.rglob("*")) == before  # nothing extracted


def test_report_result_and_a_missing_tar(image_run, tmp_path):
    result = build_report(image_run, tmp_path / "r.html")
    assert (result.samples, result.thumbnails, result.unreadable) == (7, 4, [])
    moved = tmp_path / "moved"
    shutil.copytree(image_run, moved)
    manifests = sorted((moved / "manifests").glob("*.parquet"))
    t = pq.read_table(manifests[0])
    gone = pa.array([str(tmp_path / "gone.tar")] * t.num_rows)
    pq.write_table(t.set_column(t.schema.get_field_index("image_path"), "image_path", gone), manifests[0])
    result = build_report(moved, tmp_path / "r2.html")
    assert result.thumbnails < 4 and result.unreadable and "gone.tar" in result.unreadable[0]
    assert "could not be read" in (tmp_path / "r2.html").read_text()


def test_ocr_boxes_are_drawn_from_ocr_regions(tmp_path):
    from curation.report.page import _boxes, _ocr

    regions = [
        {"text": "SALE</title><script>", "box": [0.1, 0.2, 0.5, 0.2, 0.5, 0.4, 0.1, 0.4]},
        {"text": "today", "box": [0.6, 0.2, 0.9, 0.2, 0.9, 0.4, 0.6, 0.4]},
    ]
    svg = Page(_boxes(regions))
    assert len(svg.all("polygon")) == 2 and svg.all("script") == []
    assert svg.all("polygon")[0]["points"] == "0.1000,0.2000 0.5000,0.2000 0.5000,0.4000 0.1000,0.4000"
    marked = _ocr({"caption": "Big sale today only", "ocr_text": "SALE</b> today"})
    assert "<mark>SALE</mark>&lt;/b&gt; <mark>today</mark>" in marked


def test_histogram_bins_cover_every_value_once():
    """One bar per integer, a cut long tail, a constant float, NaN and null counted as not scored."""
    from curation.report.collect import histograms

    n = 2000
    table = pa.table(
        {
            "caption_complexity": pa.array([k % 5 for k in range(n)], pa.int32()),
            "caption_tokens": pa.array([k % 40 if k % 400 else 5000 + k for k in range(n)], pa.int32()),
            "ocr_area": pa.array([0.25] * n, pa.float32()),
            "ocr_caption_overlap": pa.array(
                [None if k % 7 == 0 else float("nan") if k == 1 else (k % 100) / 100 for k in range(n)],
                pa.float32(),
            ),
        }
    )
    con = duckdb.connect()
    con.register("samples", table)
    columns = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE samples)").fetchall())
    hs = {h.column: h for h in histograms(con, columns, {}, "caption_complexity >= 3")}
    c = hs["caption_complexity"]
    assert (
        c.edges == [-0.5, 0.5, 1.5, 2.5, 3.5, 4.5]
        and c.counts == [400] * 5
        and c.selected == [0, 0, 0, 400, 400]
    )
    t = hs["caption_tokens"]
    assert t.above == 5 and t.maximum == 5000 + 1600 and sum(t.counts) + t.above == n
    a = hs["ocr_area"]
    assert a.counts == [n] and a.edges[0] < 0.25 < a.edges[1]
    o = hs["ocr_caption_overlap"]
    nulls = len(range(0, n, 7))
    assert o.missing == nulls + 1 and sum(o.counts) + o.above == n - nulls - 1


def test_threshold_label_and_notes_never_cover_a_bar(monkeypatch):
    """caption_actions with `keep >= 1`: the label right of the line used to sit on the bar of 1."""
    from matplotlib.text import Text

    from curation.report import charts
    from curation.report.collect import Histogram, Threshold

    figures = []
    monkeypatch.setattr(charts, "_svg", lambda fig, rc: figures.append(fig) or "<svg/>")
    h = Histogram(
        column="caption_actions",
        title="caption_actions",
        integer=True,
        edges=[0, 1, 2, 3, 4],
        counts=[5200, 4900, 700, 90],
        selected=None,
        missing=120,
        above=3,
        maximum=9,
        thresholds=[Threshold(stage="caption_action", column="caption_actions", op=">=", value=1)],
    )
    charts.histogram_chart(h)
    (fig,) = figures
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    (ax,) = fig.axes
    bars = [bar.get_window_extent(renderer) for container in ax.containers for bar in container]
    assert len(bars) == 4
    labels = [t for t in ax.findobj(Text) if "keep" in t.get_text() or "not scored" in t.get_text()]
    assert len(labels) == 2
    for label in labels:
        box = label.get_window_extent(renderer)
        assert not any(box.overlaps(bar) for bar in bars), label.get_text()


def test_download_drop_table_shows_error_message(tmp_path):
    """Rows dropped by download have no image: their table shows img2dataset's error_message."""
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "ok.jpg").write_bytes(jpeg("ok"))
    good = "A man rides a red bicycle down the street."
    pq.write_table(
        pa.table(
            {
                "URL": [f"file://{images}/ok.jpg", f"file://{images}/missing.jpg"],
                "TEXT": [good, "A woman walks her dog in the park."],
            }
        ),
        tmp_path / "pairs.parquet",
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"""input: {{format: parquet, path: "{tmp_path / "pairs.parquet"}", url_column: URL, caption_column: TEXT}}
output: {tmp_path / "run"}
runner: {{type: local, workers: 1, progress: false}}
stages:
  - download: {{image_size: 64, timeout: 5, allow_local: ["{images}"]}}
"""
    )
    assert main(["run", str(cfg)]) == 0
    message = pq.read_table(tmp_path / "run" / "manifests").to_pylist()
    message = next(r["error_message"] for r in message if r["error_message"])
    import html

    text, _ = report(tmp_path, tmp_path / "run")
    assert "<th>error_<wbr>message</th>" in text
    assert html.escape(message[:60]) in text
