"""The report of the demo image run, as a person sees it: headless Chromium, with no network at all.

The demo image pipeline (caption filters, img2dataset from file: URLs, EasyOCR on the CPU) runs over
the bundled pairs plus one pair whose caption is an HTML/script injection; its report is opened in
Debian's Chromium inside a private network namespace (see tests/browser.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from curation.cli import main
from tests.helpers import REPO, netns_prefix

pytestmark = pytest.mark.slow

INJECTION = "<img src=x onerror=alert(1)> A man looks </script><script>alert(2)</script> through a camera."


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("demo_report")
    pairs = pq.read_table(REPO / "data" / "demo_pairs.parquet")
    # Absolute file: URLs, so the run does not depend on the working directory.
    urls = [u.replace("file:data/", f"file:{REPO}/data/") for u in pairs.column("url").to_pylist()]
    extra = pa.table({"url": [f"file:{REPO}/data/demo_images/photo_07_camera.jpg"], "caption": [INJECTION]})
    pq.write_table(
        pa.concat_tables([pairs.set_column(0, "url", pa.array(urls)), extra]), tmp / "pairs.parquet"
    )
    config = yaml.safe_load((REPO / "pipelines" / "demo_images.yaml").read_text())
    config["input"]["path"] = str(tmp / "pairs.parquet")
    config["output"] = str(tmp / "run")
    config["runner"]["progress"] = False
    (tmp / "demo.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp / "demo.yaml")]) == 0
    html = tmp / "report.html"
    assert main(["report", str(tmp / "run"), "--out", str(html)]) == 0
    return tmp / "run", html


def open_in_chromium(html: Path, screenshot: Path) -> dict:
    prefix = netns_prefix() or []  # no network namespace here: the page's CSP still forbids any request
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [*prefix, sys.executable, "-m", "tests.browser", str(html), "--screenshot", str(screenshot)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_demo_report_in_headless_chromium_offline(demo_report, tmp_path):
    run, html = demo_report
    shot = tmp_path / "report.png"
    seen = open_in_chromium(html, shot)

    # nothing ran, nothing was fetched but the page itself, nothing complained
    errors = [m for m in seen["console"] if m["type"] in ("error", "warning")]
    assert errors == [] and seen["page_errors"] == [] and seen["dialogs"] == [] and seen["scripts"] == 0
    assert seen["requests"] == [html.resolve().as_uri()[:100]]

    # every sampled row with an image shows it: decoded by the browser, not a broken icon
    con = duckdb.connect()
    glob = f"{run}/manifests/*.parquet"
    [(with_image, boxes, text_drops)] = con.execute(
        f"SELECT count(*) FILTER (WHERE image_path IS NOT NULL), sum(len(ocr_regions)), "
        f"count(*) FILTER (WHERE drop_reason = 'text_spotting') FROM read_parquet('{glob}')"
    ).fetchall()
    assert (
        with_image == 23 and text_drops == 6
    )  # the bundled demo (verbs rule): 22 downloaded images, plus ours
    assert len(seen["images"]) == seen["loaded_images"] == with_image
    # text spotting's boxes drawn over the thumbnails, one polygon per recognised box
    assert seen["polygons"] == boxes >= text_drops

    # the injected caption is text on the page, not markup
    assert INJECTION in seen["text"]
    assert "dropped: text_spotting" in seen["text"] and "Funnel" in seen["text"]

    # the screenshot is a rendered page, not a blank or single-colour one
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (900, 1280)
    grey = img.mean(axis=2)
    assert grey.std() > 20 and (grey < 200).mean() > 0.05
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200


@pytest.fixture(scope="module")
def wide_report(tmp_path_factory) -> Path:
    """A caption-only run with four caption stages (ten score columns) over the 1k LAION captions."""
    from tests.helpers import LAION_1K, write_config

    tmp = tmp_path_factory.mktemp("wide_report")
    stages = (
        "  - caption_length: {min_words: 3, min_chars: 6}\n  - caption_language: {languages: [en]}\n"
        "  - caption_complexity: {min: 2}\n  - caption_action: {min: 1}\n"
    )
    cfg = write_config(tmp / "c.yaml", LAION_1K, tmp / "run", rows_per_shard=250, stages=stages)
    assert main(["run", str(cfg)]) == 0
    assert main(["report", str(tmp / "run"), "--out", str(tmp / "report.html")]) == 0
    return tmp / "report.html"


def test_wide_caption_only_report_fits_its_page(wide_report, tmp_path):
    seen = open_in_chromium(wide_report, tmp_path / "wide.png")
    layout = seen["layout"]
    assert len(layout["tables"]) == 5  # kept, and four drop reasons
    for table in layout["tables"]:
        assert table["width"] <= table["box"] + 1, table  # no sideways scrolling in a 1,280 px window
        assert table["caption"] >= 300, table  # the caption keeps its room: whole words per line
    # 219 sampled rows: each table scrolls in its own box, the page stays a page (was 42,671 px)
    assert layout["height"] < 12_000, layout["height"]
