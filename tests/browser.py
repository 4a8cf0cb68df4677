"""Open an HTML file in headless Chromium and report what a person would see. Used by the report tests.

    python -m tests.browser REPORT.html [--screenshot OUT.png] [--height 900] [--full-page] [--colors 256]
    python -m tests.browser runs/demo_report.html --screenshot docs/report.png --colors 128 \
        --parts "header" "#funnel" "h3#drop-text_spotting" "h3#drop-text_spotting + .cards"   # docs/report.png

Prints one JSON object: console messages, page errors, dialogs, every request
the page made, the images (and how many decoded: naturalWidth > 0), the
polygons drawn, and the visible text.

The browser is Debian's `chromium` package (`/usr/bin/chromium`, or
$CURATE_CHROMIUM), driven by Playwright's Python package. Playwright's own
browser builds download from Microsoft's CDN, which is not a package registry
(unreachable here, and not part of `make`'s set-up); the Debian build needs no
download at test time and runs with no network at all. A fresh profile per run,
and the flags below keep Chromium from contacting anything on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("CURATE_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
]


# How the page is laid out: its height, and per sample table its width against its box and the
# narrowest caption cell (a squeezed caption breaks mid-word).
LAYOUT = """() => ({
  height: document.documentElement.scrollHeight,
  tables: [...document.querySelectorAll('table.samples')].map(t => ({
    width: t.scrollWidth,
    box: t.parentElement.clientWidth,
    caption: Math.min(...[...t.querySelectorAll('td.caption')].map(c => c.getBoundingClientRect().width)),
  })),
})"""


def inspect(
    html: Path,
    screenshot: Path | None = None,
    width: int = 1280,
    height: int = 900,
    full_page: bool = False,
    colors: int | None = None,
    parts: list[str] | None = None,
) -> dict[str, Any]:
    """What the page did and shows. `parts`: CSS selectors whose elements, stacked, make the screenshot."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(
            f"{CHROMIUM} not found: `make test` installs Debian's chromium (apt-get install chromium)"
        )
    found: dict[str, Any] = {"console": [], "page_errors": [], "dialogs": [], "requests": []}
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": width, "height": height},
        )
        try:
            page = context.new_page()
            page.on("console", lambda m: found["console"].append({"type": m.type, "text": m.text}))
            page.on("pageerror", lambda e: found["page_errors"].append(str(e)))
            page.on("dialog", lambda d: (found["dialogs"].append(d.message), d.dismiss()))
            page.on("request", lambda r: found["requests"].append(r.url[:100]))
            page.goto(html.resolve().as_uri(), wait_until="load")
            found["images"] = page.evaluate(
                "[...document.images].map(i => ({complete: i.complete, naturalWidth: i.naturalWidth}))"
            )
            found["loaded_images"] = sum(
                1 for i in found["images"] if i["complete"] and i["naturalWidth"] > 0
            )
            found["polygons"] = page.evaluate("document.querySelectorAll('svg.boxes polygon').length")
            found["scripts"] = page.evaluate("document.scripts.length")
            found["text"] = page.inner_text("body")
            found["layout"] = page.evaluate(LAYOUT)
            if screenshot is not None and parts:
                _stack([page.locator(sel).first.screenshot() for sel in parts], screenshot)
            elif screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=full_page)
        finally:
            context.close()
    if screenshot is not None and colors:
        from PIL import Image

        # A palette PNG: a fraction of the size of the RGB one, and the charts are flat colours anyway.
        Image.open(screenshot).convert("RGB").quantize(colors, dither=Image.Dither.NONE).save(
            screenshot, optimize=True
        )
    return found


def _stack(pngs: list[bytes], out: Path) -> None:
    import io

    from PIL import Image

    images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]
    pad = 16
    sheet = Image.new(
        "RGB", (max(i.width for i in images) + 2 * pad, sum(i.height + pad for i in images) + pad), "white"
    )
    y = pad
    for img in images:
        sheet.paste(img, (pad, y))
        y += img.height + pad
    sheet.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("html", type=Path)
    ap.add_argument("--screenshot", type=Path)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--full-page", action="store_true")
    ap.add_argument("--colors", type=int, help="save the screenshot as a palette PNG of this many colours")
    ap.add_argument("--parts", nargs="+", help="CSS selectors: screenshot these elements, stacked")
    args = ap.parse_args()
    found = inspect(
        args.html, args.screenshot, args.width, args.height, args.full_page, args.colors, args.parts
    )
    print(json.dumps(found))


if __name__ == "__main__":
    main()
