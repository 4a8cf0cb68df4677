"""Clip art: real drawings with the text their authors wrote, as a LAION-shaped pool and a held-out test set.

Two Debian packages, public domain / GPL drawings with human-written text:
- `openclipart-png` + `openclipart-svg` (Open Clip Art Library 0.18): 8,121 drawings in 22 category
  folders; the PNG is the image, the SVG beside it (same path, .svg) carries the text: `dc:title`,
  `dc:description` and keyword tags (`dc:subject`).
- `tuxpaint-stamps-default`: stamps in 16 category folders, each PNG with a `.txt` whose first line is
  an English description ("A frog."). Stamps that ship only as SVG are skipped (no SVG renderer here).

    apt-get install openclipart-png openclipart-svg tuxpaint-stamps-default
    python -m train.clipart build DIR                    # from /usr/share (the installed packages)
    python -m train.clipart build DIR --from train/assets/clipart_subset   # the committed subset

What `build` writes:
- `DIR/images/ab/<sha256>.png`: every image, copied byte for byte, named by its sha256 (no odd names;
  identical files share one).
- `DIR/pool.parquet`: the training pool in LAION's shape, one row per drawing: `URL`
  (`http://127.0.0.1:8517/images/...`; `serve` starts the server, `pool_for` rewrites the port to the
  one actually bound), `TEXT` (the caption), `source` (`openclipart` / `tuxpaint`), `sha256`, and for
  analysis `category` and `keywords` (never used by training).
- `DIR/test.parquet`: held-out drawings: `path` (under DIR), `label` (class index), `class`, `split`
  (`shots`: the pool the few-shot probe draws from, `test`: evaluation), `TEXT` (for retrieval), `sha256`.
- `DIR/build.json`: counts (per source, class, drops) and the parameters.

Caption: what a web page would put in alt-text, as the authors wrote it: the title, then the
description when there is one and it is not the title again ("Red flower. A red flower with five
petals"); tuxpaint: the English description line. Keywords are not put into the caption (alt-text does
not carry a tag list, and many tags are boilerplate like "unsorted" or "flat icon collection"); they are
kept in the `keywords` column.

Labels come from the category folders, never from the captions: the top-level folder, mapped to one
shared class name (`CLASS_OF` below: tuxpaint "vehicles" and openclipart "transportation" are one class).
Folders without a visual class (openclipart "unsorted", "special", "buttons") stay in the pool only.

Split: per class with at least `min_class_size` drawings, a deterministic `test_fraction` of them
(ordered by sha256, at least `min_test_per_class`, at most `max_test_per_class`) is held out; then
every pool drawing whose perceptual hash (the project's pHash, `curation.stages.phash`) lies within
`radius` bits of a held-out one, or whose bytes are identical, is dropped from the pool, so no near-copy
of a test image is trained on. Drawings whose image cannot be decoded, or whose caption is empty, are
counted and left out.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import html
import http.server
import json
import re
import shutil
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SYSTEM_ROOT = Path("/usr/share")
SUBSET = Path(__file__).parent / "assets" / "clipart_subset"
PACKAGES = "openclipart-png openclipart-svg tuxpaint-stamps-default"
DEFAULT_PORT = 8517
URL_PREFIX = f"http://127.0.0.1:{DEFAULT_PORT}/"
# Zero-shot prompts for drawings (the prompt ensemble of the benchmark).
TEMPLATES = ["a drawing of {}.", "clip art of {}.", "an illustration of {}.", "{}."]

# Top-level category folder -> class name; None: kept in the pool, never held out.
CLASS_OF: dict[str, dict[str, str | None]] = {
    "openclipart": {
        "animals": "animals",
        "buildings": "buildings",
        "buttons": None,
        "computer": "computers",
        "containers": "containers",
        "decorations": "decorations",
        "education": "education",
        "electronics": "electronics",
        "food": "food",
        "geography": "maps and geography",
        "logos": "logos",
        "office": "office",
        "people": "people",
        "plants": "plants",
        "recreation": "recreation",
        "science": "science",
        "shapes": "shapes",
        "signs_and_symbols": "signs and symbols",
        "special": None,
        "tools": "tools",
        "transportation": "vehicles",
        "unsorted": None,
    },
    "tuxpaint": {
        "animals": "animals",
        "clothes": "clothes",
        "food": "food",
        "hobbies": "recreation",
        "household": "household objects",
        "medical": "medicine",
        "military": "military",
        "naturalforces": "weather and nature",
        "people": "people",
        "plants": "plants",
        "seasonal": "holidays",
        "space": "space",
        "sports": "sports",
        "symbols": "signs and symbols",
        "town": "buildings",
        "vehicles": "vehicles",
    },
}


class PackagesMissing(FileNotFoundError):
    """Neither package's files are under the root."""


@dataclass
class Drawing:
    source: str
    category: str  # top-level folder
    image: Path
    caption: str
    keywords: list[str] = field(default_factory=list)


@dataclass
class BuildResult:
    pool: int
    test: int
    counts: dict


# --------------------------------------------------------------------------- reading the packages


def _text(s: str) -> str:
    return " ".join(html.unescape(s).split())


_WORK = re.compile(r"<cc:Work\b.*?</cc:Work>", re.S)
_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.S)
_DESC = re.compile(r"<dc:description>(.*?)</dc:description>", re.S)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li>(.*?)</rdf:li>", re.S)
_AGENT = re.compile(r"<cc:Agent\b.*?</cc:Agent>", re.S)


def svg_metadata(svg: str) -> tuple[str, str, list[str]]:
    """(title, description, keywords) of the work an Open Clip Art SVG describes ("" when absent).

    Read with regular expressions from the `cc:Work` block (not an XML parser: several files in the
    package are not well-formed XML, and the metadata block is all we need); the publisher's and
    creator's `dc:title` sit inside `cc:Agent` blocks, which are removed first.
    """
    work = _WORK.search(svg)
    if not work:
        return "", "", []
    block = _AGENT.sub("", work.group(0))
    title = _TITLE.search(block)
    desc = _DESC.search(block)
    subject = _SUBJECT.search(block)
    keywords = [_text(k) for k in _LI.findall(subject.group(1))] if subject else []
    return (
        _text(title.group(1)) if title else "",
        _text(desc.group(1)) if desc else "",
        [k for k in keywords if k],
    )


def caption_of(title: str, description: str) -> str:
    """Title, then the description when it adds something (see the module docstring)."""
    title, description = title.strip(), description.strip()
    if not description or description.lower() == title.lower():
        return title
    if not title:
        return description
    sep = " " if title.endswith((".", "!", "?", ":")) else ". "
    return f"{title}{sep}{description}"


def openclipart_drawings(root: Path) -> Iterator[Drawing]:
    png_root, svg_root = root / "png", root / "svg"
    for png in sorted(png_root.rglob("*.png")):
        rel = png.relative_to(png_root)
        svg = (svg_root / rel).with_suffix(".svg")
        title, desc, keywords = ("", "", [])
        if svg.is_file():
            title, desc, keywords = svg_metadata(svg.read_text(encoding="utf-8", errors="replace"))
        yield Drawing("openclipart", rel.parts[0], png, caption_of(title, desc), keywords)


def tuxpaint_drawings(root: Path) -> Iterator[Drawing]:
    for png in sorted(root.rglob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            continue  # thumbnails and mirrored variants have no description of their own
        first = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        caption = _text(first[0]) if first else ""
        yield Drawing("tuxpaint", png.relative_to(root).parts[0], png, caption)


def find_sources(root: Path) -> dict[str, Path]:
    """The package folders under `root` (`/usr/share` when installed): {source: folder}."""
    found = {}
    if (root / "openclipart" / "png").is_dir():
        found["openclipart"] = root / "openclipart"
    if (root / "tuxpaint" / "stamps").is_dir():
        found["tuxpaint"] = root / "tuxpaint" / "stamps"
    if not found:
        raise PackagesMissing(
            f"no clip art under {root} (expected {root}/openclipart/png and/or {root}/tuxpaint/stamps): "
            f"apt-get install {PACKAGES}, or pass --from {SUBSET} (the committed subset)"
        )
    return found


def drawings(root: Path) -> Iterator[Drawing]:
    sources = find_sources(root)
    if "openclipart" in sources:
        yield from openclipart_drawings(sources["openclipart"])
    if "tuxpaint" in sources:
        yield from tuxpaint_drawings(sources["tuxpaint"])


# --------------------------------------------------------------------------- build


def build(
    out: Path,
    root: Path = SYSTEM_ROOT,
    test_fraction: float = 0.15,
    radius: int = 6,
    min_class_size: int = 20,
    max_test_per_class: int = 60,
    min_test_per_class: int = 0,
) -> BuildResult:
    """Write DIR/images, pool.parquet, test.parquet, build.json (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.core.imageio import ImageRefused, open_image
    from curation.core.phash import hamming, phash_image

    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be in (0, 1)")
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    rows = []
    for d in drawings(root):
        counts[f"{d.source}_found"] += 1
        if not d.caption:
            counts[f"{d.source}_no_caption"] += 1
            continue
        data = d.image.read_bytes()
        try:
            ph = phash_image(open_image(data))
        except ImageRefused:
            counts[f"{d.source}_unreadable"] += 1
            continue
        sha = hashlib.sha256(data).hexdigest()
        rel = f"images/{sha[:2]}/{sha}.png"
        target = out / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(d.image, target)
        cls = CLASS_OF.get(d.source, {}).get(d.category)
        rows.append((d, sha, rel, ph, cls))

    # Held out: per class, the first `test_fraction` by sha256, at least `min_test_per_class` (a third of
    # the held-out drawings are few-shot images: 24 gives an 8-shot probe in every class), at most
    # `max_test_per_class` (the largest folders are icon sets and generated stars: uncapped, they would be
    # most of the test set); classes with fewer than `min_class_size` drawings stay in the pool.
    by_class: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r[4] is not None:
            by_class.setdefault(r[4], []).append(i)
    by_class = {c: m for c, m in by_class.items() if len(m) >= max(2, min_class_size)}
    held: set[int] = set()
    for members in by_class.values():
        members.sort(key=lambda i: rows[i][1])
        n = max(1, min_test_per_class, round(len(members) * test_fraction))
        held.update(members[: min(max_test_per_class, n, len(members) - 1)])
    classes = sorted(by_class)
    held_sha = {rows[i][1] for i in held}
    held_hash = np.array([rows[i][3] for i in held], dtype=np.int64)

    pool_rows = []
    for i, r in enumerate(rows):
        if i in held:
            continue
        if r[1] in held_sha:
            counts["pool_dropped_same_bytes_as_test"] += 1
            continue
        if len(held_hash) and int(hamming(held_hash, np.array([r[3]] * len(held_hash))).min()) <= radius:
            counts["pool_dropped_near_duplicate_of_test"] += 1
            continue
        pool_rows.append(r)
    pool = pa.table(
        {
            "URL": [URL_PREFIX + r[2] for r in pool_rows],
            "TEXT": [r[0].caption for r in pool_rows],
            "source": [r[0].source for r in pool_rows],
            "sha256": [r[1] for r in pool_rows],
            "category": [r[0].category for r in pool_rows],
            "keywords": pa.array([r[0].keywords for r in pool_rows], pa.list_(pa.string())),
        }
    )
    held_sorted = sorted(held, key=lambda i: rows[i][1])
    # Within each class, every third held-out drawing is a shot-pool image for the few-shot probe.
    rank: Counter = Counter()
    split = []
    for i in held_sorted:
        split.append("shots" if rank[rows[i][4]] % 3 == 2 else "test")
        rank[rows[i][4]] += 1
    test = pa.table(
        {
            "path": [rows[i][2] for i in held_sorted],
            "label": pa.array([classes.index(rows[i][4]) for i in held_sorted], pa.int64()),
            "class": [rows[i][4] for i in held_sorted],
            "split": split,
            "TEXT": [rows[i][0].caption for i in held_sorted],
            "source": [rows[i][0].source for i in held_sorted],
            "sha256": [rows[i][1] for i in held_sorted],
        }
    )
    pq.write_table(pool, out / "pool.parquet")
    pq.write_table(test, out / "test.parquet")
    summary = {
        "root": str(root),
        "test_fraction": test_fraction,
        "radius": radius,
        "min_class_size": min_class_size,
        "max_test_per_class": max_test_per_class,
        "min_test_per_class": min_test_per_class,
        "classes": classes,
        "pool": pool.num_rows,
        "test": test.num_rows,
        "pool_by_source": dict(Counter(pool.column("source").to_pylist())),
        "test_by_class": dict(Counter(test.column("class").to_pylist())),
        **dict(counts),
    }
    (out / "build.json").write_text(json.dumps(summary, indent=1) + "\n")
    return BuildResult(pool.num_rows, test.num_rows, summary)


# --------------------------------------------------------------------------- serving


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve(directory: Path, port: int = 0) -> Iterator[str]:
    """Serve `directory` on 127.0.0.1 (`port` 0: any free port); yields the base URL `http://127.0.0.1:P/`."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def pool_for(directory: Path, base_url: str, out: Path, limit: int | None = None, seed: int = 0) -> Path:
    """pool.parquet with its URLs pointing at `base_url` (the port the server bound), as `out`; with
    `limit`, a random sample of that many rows (`seed`), in pool order."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pool = pq.read_table(directory / "pool.parquet")
    if limit is not None and limit < pool.num_rows:
        pool = pool.take(np.sort(np.random.default_rng(seed).permutation(pool.num_rows)[:limit]))
    urls = pc.replace_substring(pool.column("URL"), URL_PREFIX, base_url)
    pool = pool.set_column(pool.schema.get_field_index("URL"), "URL", urls)
    pq.write_table(pool.drop_columns(["keywords"]).combine_chunks(), out)
    return out


def load_test(directory: Path) -> tuple[list, np.ndarray, list[str], list[str], list[str]]:
    """(PIL images, labels, class names, splits, captions) of DIR/test.parquet."""
    import pyarrow.parquet as pq

    from curation.core.imageio import open_image

    t = pq.read_table(directory / "test.parquet").to_pydict()
    build_info = json.loads((directory / "build.json").read_text())
    images = [open_image((directory / p).read_bytes()) for p in t["path"]]
    return images, np.asarray(t["label"]), build_info["classes"], t["split"], t["TEXT"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.clipart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write DIR/pool.parquet, DIR/test.parquet and DIR/images")
    b.add_argument("dir", type=Path)
    b.add_argument(
        "--from",
        dest="root",
        type=Path,
        default=SYSTEM_ROOT,
        help=f"folder holding openclipart/ and/or tuxpaint/stamps/ (default /usr/share; {SUBSET} is the "
        "committed subset)",
    )
    b.add_argument("--test-fraction", type=float, default=0.15)
    b.add_argument(
        "--radius", type=int, default=6, help="pHash bits: pool images this close to a test one go"
    )
    b.add_argument("--min-class-size", type=int, default=20, help="smaller classes are not held out")
    b.add_argument("--max-test-per-class", type=int, default=60)
    b.add_argument(
        "--min-test-per-class",
        type=int,
        default=0,
        help="hold out at least this many per class (a third become few-shot images; 24: 8 shots)",
    )
    s = sub.add_parser("serve", help="serve DIR on 127.0.0.1:PORT until interrupted")
    s.add_argument("dir", type=Path)
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    a = p.parse_args(argv)
    if a.cmd == "serve":
        with serve(a.dir, a.port) as url:
            print(f"serving {a.dir} at {url} (pool.parquet's URLs point at port {DEFAULT_PORT})", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
        return 0
    if not 0 < a.test_fraction < 1:
        print("python -m train.clipart: error: --test-fraction must be in (0, 1)", file=sys.stderr)
        return 2
    try:
        result = build(
            a.dir,
            a.root,
            a.test_fraction,
            a.radius,
            a.min_class_size,
            a.max_test_per_class,
            a.min_test_per_class,
        )
    except PackagesMissing as e:
        print(f"python -m train.clipart: error: {e}", file=sys.stderr)
        return 2
    c = result.counts
    print(
        f"wrote {result.pool:,} pool pairs and {result.test:,} held-out drawings ({len(c['classes'])} classes) "
        f"to {a.dir}; dropped from the pool as near-duplicates of test images: "
        f"{c.get('pool_dropped_near_duplicate_of_test', 0) + c.get('pool_dropped_same_bytes_as_test', 0)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
