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

Split (`build`; the rules are in its comments): held-out drawings are grouped by author (the SVG's
dc:creator; for tuxpaint stamps, which name no author, their sub-folder): per class with at least
`min_class_size` drawings, whole authors are taken in a fixed pseudo-random order until the class has
`test_fraction` of its drawings (at least `min_test_per_class`, at most `max_test_per_class`), and
every drawing of a taken author leaves the pool. Then every pool drawing whose caption equals a
held-out caption after normalisation (case, whitespace, punctuation), whose bytes are identical, or
whose perceptual hash (the project's pHash, `curation.stages.phash`) lies within `radius` bits of a
held-out one (10: near-copies at 7-10 bits are caught) is dropped from the pool. `check_split`
measures these promises on the written tables (build.json `split_check`; `build` refuses a split that
breaks one). Drawings whose image cannot be decoded, or whose caption is empty, are counted and left out.

Reading `--from DIR` follows the image_folder reader's rules (curation.core.folders): files are listed
without entering symlinked folders, and read only when they are regular files whose real path lies
inside the source folder, bounded in size (a FIFO, a device, a link out of the folder are refused and
counted in build.json); SVG metadata is read in linear time (no backtracking regular expression).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import html
import http.server
import json
import os
import sys
import threading
import unicodedata
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
class BuildResult:
    pool: int
    test: int
    counts: dict


# --------------------------------------------------------------------------- reading the packages

# Bounds on what `build` reads from the folder it is given (`--from` may name a folder someone else
# made: the same rules as the image_folder reader, curation.core.folders): regular files whose real
# path lies inside the source folder, at most this many bytes each.
MAX_IMAGE_BYTES = 16 * 2**20
MAX_SVG_BYTES = 8 * 2**20
MAX_TXT_BYTES = 256 * 2**10


@dataclass
class Drawing:
    source: str
    category: str  # top-level folder
    image: Path
    caption: str
    keywords: list[str] = field(default_factory=list)
    # Who drew it: the SVG's dc:creator; tuxpaint stamps carry no author, their sub-folder (one set of
    # stamps, usually one artist) stands in. Held-out drawings are grouped by it.
    author: str = ""
    data: bytes | None = None  # the image's bytes (None: refused, `refused` says why)
    refused: str | None = None


def _text(s: str) -> str:
    return " ".join(html.unescape(s).split())


def _spans(text: str, start: str, end: str, pos: int = 0) -> Iterator[tuple[int, int]]:
    """(begin, stop) of each `start ... end` block from `pos`, in one pass over `text`: `str.find` only,
    so unclosed openings cost linear time (a regex `start.*?end` retries at each of them: quadratic)."""
    while True:
        a = text.find(start, pos)
        if a < 0:
            return
        b = text.find(end, a + len(start))
        if b < 0:
            return  # no closing tag after this opening: none after any later one either
        yield a, b + len(end)
        pos = b + len(end)


def _first(text: str, tag: str) -> str | None:
    """The content of the first `<tag>...</tag>` in `text` (None when absent)."""
    for a, b in _spans(text, f"<{tag}>", f"</{tag}>"):
        return text[a + len(tag) + 2 : b - len(tag) - 3]
    return None


def _without_agents(block: str) -> str:
    out, pos = [], 0
    for a, b in _spans(block, "<cc:Agent", "</cc:Agent>"):
        out.append(block[pos:a])
        pos = b
    out.append(block[pos:])
    return "".join(out)


def _work(svg: str) -> str | None:
    for a, b in _spans(svg, "<cc:Work", "</cc:Work>"):
        if svg[a + 8 : a + 9] in (">", " ", "\t", "\n", "\r", "/"):
            return svg[a:b]
    return None


def svg_metadata(svg: str) -> tuple[str, str, list[str]]:
    """(title, description, keywords) of the work an Open Clip Art SVG describes ("" when absent).

    Read from the `cc:Work` block with `str.find` (not an XML parser: several files in the package are
    not well-formed XML, and the metadata block is all we need; not regular expressions: linear time
    on hostile input); the publisher's and creator's `dc:title` sit inside `cc:Agent` blocks, which are
    removed first.
    """
    work = _work(svg)
    if work is None:
        return "", "", []
    block = _without_agents(work)
    title, desc, subject = (
        _first(block, "dc:title"),
        _first(block, "dc:description"),
        _first(block, "dc:subject"),
    )
    keywords = []
    if subject is not None:
        keywords = [_text(subject[a + 8 : b - 9]) for a, b in _spans(subject, "<rdf:li>", "</rdf:li>")]
    return _text(title or ""), _text(desc or ""), [k for k in keywords if k]


def svg_author(svg: str) -> str:
    """The dc:creator's name in the work's metadata ("" when absent)."""
    work = _work(svg)
    creator = _first(work, "dc:creator") if work is not None else None
    return _text(_first(creator, "dc:title") or "") if creator is not None else ""


def caption_of(title: str, description: str) -> str:
    """Title, then the description when it adds something (see the module docstring)."""
    title, description = title.strip(), description.strip()
    if not description or description.lower() == title.lower():
        return title
    if not title:
        return description
    sep = " " if title.endswith((".", "!", "?", ":")) else ". "
    return f"{title}{sep}{description}"


def _read(path: Path, top: Path, max_bytes: int) -> tuple[bytes | None, str | None]:
    from curation.core.folders import FileRefused, read_inside

    try:
        return read_inside(path, top, max_bytes), None
    except FileRefused as e:
        return None, e.status


def openclipart_drawings(root: Path) -> Iterator[Drawing]:
    from curation.core.folders import list_files

    png_root, svg_root = root / "png", root / "svg"
    for name in list_files(str(png_root), ("png",)):
        png = Path(name)
        rel = png.relative_to(png_root)
        data, refused = _read(png, root, MAX_IMAGE_BYTES)
        svg = (svg_root / rel).with_suffix(".svg")
        title, desc, keywords, author = "", "", [], ""
        if os.path.lexists(svg):
            raw, _ = _read(svg, root, MAX_SVG_BYTES)
            if raw is not None:
                text = raw.decode("utf-8", errors="replace")
                title, desc, keywords = svg_metadata(text)
                author = svg_author(text)
        author = author.lower() or f"unknown:{rel.parent}"
        caption = caption_of(title, desc)
        yield Drawing("openclipart", rel.parts[0], png, caption, keywords, author, data, refused)


def tuxpaint_drawings(root: Path) -> Iterator[Drawing]:
    from curation.core.folders import list_files

    for name in list_files(str(root), ("png",)):
        png = Path(name)
        txt = png.with_suffix(".txt")
        if not os.path.lexists(txt):
            continue  # thumbnails and mirrored variants have no description of their own
        raw, refused_txt = _read(txt, root, MAX_TXT_BYTES)
        first = raw.decode("utf-8", errors="replace").splitlines() if raw is not None else []
        caption = _text(first[0]) if first else ""
        data, refused = _read(png, root, MAX_IMAGE_BYTES)
        rel = png.relative_to(root)
        author = f"tuxpaint:{rel.parent}"
        yield Drawing("tuxpaint", rel.parts[0], png, caption, [], author, data, refused or refused_txt)


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


def normalise_caption(caption: str) -> str:
    """Caption identity for the split: case, whitespace and punctuation do not count
    ("Lemon SVG theme." == "lemon  svg-theme")."""
    s = unicodedata.normalize("NFKC", caption).lower()
    s = "".join(" " if unicodedata.category(c)[0] in "PZC" else c for c in s)
    return " ".join(s.split())


def build(
    out: Path,
    root: Path = SYSTEM_ROOT,
    test_fraction: float = 0.15,
    radius: int = 10,
    min_class_size: int = 20,
    max_test_per_class: int = 60,
    min_test_per_class: int = 0,
    max_author_share: float = 0.02,
) -> BuildResult:
    """Write DIR/images, pool.parquet, test.parquet, build.json (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.core.imageio import ImageRefused, open_image
    from curation.core.phash import phash_image

    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be in (0, 1)")
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    rows = []
    for d in drawings(root):
        counts[f"{d.source}_found"] += 1
        if d.refused is not None or d.data is None:
            counts[f"{d.source}_refused_{d.refused}"] += 1
            continue
        if not d.caption:
            counts[f"{d.source}_no_caption"] += 1
            continue
        try:
            ph = phash_image(open_image(d.data))
        except ImageRefused:
            counts[f"{d.source}_unreadable"] += 1
            continue
        sha = hashlib.sha256(d.data).hexdigest()
        rel = f"images/{sha[:2]}/{sha}.png"
        target = out / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(d.data)
        d.data = None  # the copy is on disk
        cls = CLASS_OF.get(d.source, {}).get(d.category)
        rows.append((d, sha, rel, ph, cls))

    # Held out, grouped by author: authors are taken in a fixed pseudo-random order (sha256 of the name)
    # while some class they drew in is short of its quota (`test_fraction` of the class, at least
    # `min_test_per_class`, at most `max_test_per_class`); every drawing of a taken author leaves the
    # pool (their drawings beyond a class's quota, or outside the held-out classes, are dropped), so no
    # test author's style or series is trained on. Authors of more than `max_author_share` of all
    # drawings (the generated-star and icon-set series) are never taken: they would empty the pool.
    # Classes with fewer than `min_class_size` drawings stay in the pool.
    by_class: dict[str, list[int]] = {}
    by_author: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_author.setdefault(r[0].author, []).append(i)
        if r[4] is not None:
            by_class.setdefault(r[4], []).append(i)
    by_class = {c: m for c, m in by_class.items() if len(m) >= max(2, min_class_size)}
    quota = {
        c: min(max_test_per_class, max(1, min_test_per_class, round(len(m) * test_fraction)), len(m) - 1)
        for c, m in by_class.items()
    }
    taken: Counter = Counter()
    test_authors: set[str] = set()
    largest = max(1, int(max_author_share * len(rows)))
    for author in sorted(by_author, key=lambda a: hashlib.sha256(a.encode()).hexdigest()):
        members = by_author[author]
        if len(members) > largest:
            continue
        wanted = {
            rows[i][4] for i in members if rows[i][4] in quota and taken[rows[i][4]] < quota[rows[i][4]]
        }
        if not wanted:
            continue
        test_authors.add(author)
        for i in sorted(members, key=lambda i: rows[i][1]):
            if rows[i][4] in quota:
                taken[rows[i][4]] += 1
        if all(taken[c] >= q for c, q in quota.items()):
            break
    held: set[int] = set()
    for c in quota:
        members = sorted(
            (i for i in by_class[c] if rows[i][0].author in test_authors), key=lambda i: rows[i][1]
        )
        held.update(members[: quota[c]])
    classes = sorted(by_class)
    held_sha = {rows[i][1] for i in held}
    held_captions = {normalise_caption(rows[i][0].caption) for i in held}
    held_hash = np.array([rows[i][3] for i in held], dtype=np.int64)

    pool_rows = []
    for i, r in enumerate(rows):
        if i in held:
            continue
        if r[0].author in test_authors:
            counts["dropped_test_author_not_held_out"] += 1
        elif r[1] in held_sha:
            counts["pool_dropped_same_bytes_as_test"] += 1
        elif normalise_caption(r[0].caption) in held_captions:
            counts["pool_dropped_caption_of_test"] += 1
        elif len(held_hash) and _nearest(r[3], held_hash) <= radius:
            counts["pool_dropped_near_duplicate_of_test"] += 1
        else:
            pool_rows.append(r)
    pool = pa.table(
        {
            "URL": [URL_PREFIX + r[2] for r in pool_rows],
            "TEXT": [r[0].caption for r in pool_rows],
            "source": [r[0].source for r in pool_rows],
            "sha256": [r[1] for r in pool_rows],
            "category": [r[0].category for r in pool_rows],
            "keywords": pa.array([r[0].keywords for r in pool_rows], pa.list_(pa.string())),
            "author": [r[0].author for r in pool_rows],
            "phash": pa.array([r[3] for r in pool_rows], pa.int64()),
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
            "author": [rows[i][0].author for i in held_sorted],
            "phash": pa.array([rows[i][3] for i in held_sorted], pa.int64()),
        }
    )
    pq.write_table(pool, out / "pool.parquet")
    pq.write_table(test, out / "test.parquet")
    checked = check_split(out, radius)
    summary = {
        "root": str(root),
        "test_fraction": test_fraction,
        "radius": radius,
        "min_class_size": min_class_size,
        "max_test_per_class": max_test_per_class,
        "min_test_per_class": min_test_per_class,
        "max_author_share": max_author_share,
        "classes": classes,
        "pool": pool.num_rows,
        "test": test.num_rows,
        "test_authors": len(test_authors),
        "pool_by_source": dict(Counter(pool.column("source").to_pylist())),
        "test_by_class": dict(Counter(test.column("class").to_pylist())),
        "split_check": checked,
        **dict(counts),
    }
    (out / "build.json").write_text(json.dumps(summary, indent=1) + "\n")
    return BuildResult(pool.num_rows, test.num_rows, summary)


def _nearest(h: int, hashes: np.ndarray) -> int:
    from curation.core.phash import hamming

    return int(hamming(hashes, np.full(len(hashes), h, dtype=np.int64)).min())


class SplitLeak(RuntimeError):
    """The built split breaks one of its promises (a bug in `build`, never expected)."""


def check_split(directory: Path, radius: int) -> dict:
    """The split's promises, measured on the written tables: no test author, caption (normalised) or
    image bytes in the pool, and every pool image more than `radius` pHash bits from every test image.
    Raises SplitLeak when one fails; returns the measurements (build.json's `split_check`)."""
    import pyarrow.parquet as pq

    from curation.core.phash import hamming
    from curation.decontaminate import match_hashes

    pool = pq.read_table(directory / "pool.parquet").to_pydict()
    test = pq.read_table(directory / "test.parquet").to_pydict()
    t_captions = {normalise_caption(c) for c in test["TEXT"]}
    t_hash = np.asarray(test["phash"], np.int64)
    p_hash = np.asarray(pool["phash"], np.int64)
    nearest = 64
    for chunk in range(0, len(p_hash), 2048):  # bounded memory: 2048 x |test| distances at a time
        part = p_hash[chunk : chunk + 2048]
        if len(part) and len(t_hash):
            nearest = min(nearest, int(hamming(part[:, None], t_hash[None, :]).min()))
    result = {
        "test_authors_in_pool": len(set(test["author"]) & set(pool["author"])),
        "test_captions_in_pool": sum(normalise_caption(c) in t_captions for c in pool["TEXT"]),
        "test_images_in_pool": len(set(test["sha256"]) & set(pool["sha256"])),
        "min_phash_distance_pool_to_test": nearest,
        "radius": radius,
        # The same check through the code users run (`curate decontaminate`'s matcher).
        "pool_images_within_radius": len(set(match_hashes(p_hash, t_hash, radius)[0].tolist())),
    }
    keys = (
        "test_authors_in_pool",
        "test_captions_in_pool",
        "test_images_in_pool",
        "pool_images_within_radius",
    )
    broken = [k for k in keys if result[k]]
    if broken or nearest <= radius:
        raise SplitLeak(f"the split leaks: {result}")
    return result


# --------------------------------------------------------------------------- the emoji evaluation set

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
CLDR_EN = Path("/usr/share/unicode/cldr/common/annotations/en.xml")
EMOJI_PACKAGES = "fonts-noto-color-emoji unicode-cldr-core"
# English heads that name no concrete thing (the last word of "grinning face with big eyes" is "eyes").
_NOT_NOUNS = {"sign", "symbol", "button", "mark", "with", "and", "the", "of"}


def cldr_names(path: Path = CLDR_EN) -> dict[str, str]:
    """{character sequence: English short name} from CLDR's `type="tts"` annotations."""
    from curation.core.folders import read_inside

    text = read_inside(path, path.parent, 16 * 2**20).decode("utf-8")
    names = {}
    for line in text.splitlines():
        line = line.strip()
        head, sep, rest = line.partition('" type="tts">')
        if sep and head.startswith('<annotation cp="') and rest.endswith("</annotation>"):
            names[html.unescape(head[len('<annotation cp="') :])] = _text(rest[: -len("</annotation>")])
    return names


def build_emoji(
    out: Path,
    pool_captions: list[str],
    pool_hashes: np.ndarray,
    radius: int = 10,
    min_pool_captions: int = 5,
    limit: int | None = None,
    font: Path = EMOJI_FONT,
    names_file: Path = CLDR_EN,
) -> dict:
    """A second evaluation set, disjoint from the clip-art pool: every emoji of Noto Color Emoji that has
    a CLDR English name, rendered with Pillow on white (136 x 128), captioned with that name. Writes
    DIR/emoji/<n>.png, DIR/emoji.parquet (`path`, `TEXT`, `label`: class index or -1, `class`) and
    DIR/emoji.json.

    Zero-shot classes are concrete nouns both sides share: the last word of a name of at most three
    words (English names end with their head noun: "red apple", "sport utility vehicle") that occurs as a
    whole word in at least `min_pool_captions` pool captions (normalised); an emoji whose head is such a
    word is labelled with it. Emoji whose image lies within `radius` pHash bits of a pool image are left
    out (none are expected: a check, counted)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw, ImageFont

    from curation.core.phash import phash_image

    face = ImageFont.truetype(str(font), 109)  # the bitmap size of the CBDT colour glyphs
    names = cldr_names(names_file)
    vocabulary: Counter = Counter()
    for c in pool_captions:
        vocabulary.update(set(normalise_caption(c).split()))
    counts: Counter = Counter()
    rows = []
    folder = out / "emoji"
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[bytes] = set()
    # A fixed pseudo-random order (sha256 of the name): `limit` keeps a sample across the alphabet.
    for cp, name in sorted(names.items(), key=lambda kv: hashlib.sha256(kv[1].encode()).hexdigest()):
        image = Image.new("RGB", (136, 128), "white")
        ImageDraw.Draw(image).text((0, 0), cp, font=face, embedded_color=True)
        pixels = np.asarray(image)
        if (pixels < 250).any(axis=2).mean() < 0.02:
            counts["no_glyph"] += 1  # the font draws nothing (text symbols, letters)
            continue
        raw = pixels.tobytes()
        if raw in seen:
            counts["same_image_as_another"] += 1
            continue
        seen.add(raw)
        h = phash_image(image)
        if len(pool_hashes) and _nearest(h, pool_hashes) <= radius:
            counts["near_copy_of_pool_image"] += 1
            continue
        rows.append((cp, name, image, h))
        if limit is not None and len(rows) >= limit:
            break
    heads = [n.split()[-1] if len(n.split()) <= 3 else "" for _, n, _, _ in rows]
    classes = sorted(
        {
            w
            for w in heads
            if w.isalpha() and len(w) > 2 and w not in _NOT_NOUNS and vocabulary[w] >= min_pool_captions
        }
    )
    paths = []
    for i, (_, _, image, _) in enumerate(rows):
        rel = f"emoji/{i:05d}.png"
        image.save(out / rel)
        paths.append(rel)
    table = pa.table(
        {
            "path": paths,
            "TEXT": [r[1] for r in rows],
            "codepoints": [r[0] for r in rows],
            "label": pa.array([classes.index(w) if w in classes else -1 for w in heads], pa.int64()),
            "class": [w if w in classes else None for w in heads],
            "phash": pa.array([r[3] for r in rows], pa.int64()),
        }
    )
    pq.write_table(table, out / "emoji.parquet")
    summary = {
        "font": str(font),
        "names": str(names_file),
        "cldr_names": len(names),
        "images": len(rows),
        "classes": classes,
        "labelled": sum(w in classes for w in heads),
        "pool_captions_per_class": {w: vocabulary[w] for w in classes},
        "min_pool_captions": min_pool_captions,
        **dict(counts),
    }
    (out / "emoji.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def load_emoji(directory: Path) -> tuple[list, np.ndarray, list[str], list[str]]:
    """(PIL images, labels (-1: no class), class names, captions) of DIR/emoji.parquet."""
    import pyarrow.parquet as pq

    from curation.core.imageio import open_image

    t = pq.read_table(directory / "emoji.parquet").to_pydict()
    info = json.loads((directory / "emoji.json").read_text())
    images = [open_image((directory / p).read_bytes()) for p in t["path"]]
    return images, np.asarray(t["label"]), info["classes"], t["TEXT"]


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
        "--radius", type=int, default=10, help="pHash bits: pool images this close to a test one go"
    )
    b.add_argument(
        "--max-author-share",
        type=float,
        default=0.02,
        help="authors of more than this share of all drawings are never held out (they would empty the pool)",
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
            a.max_author_share,
        )
    except PackagesMissing as e:
        print(f"python -m train.clipart: error: {e}", file=sys.stderr)
        return 2
    c = result.counts
    print(
        f"wrote {result.pool:,} pool pairs and {result.test:,} held-out drawings ({len(c['classes'])} classes) "
        f"to {a.dir}; dropped from the pool as near-duplicates of test images: "
        f"{c.get('pool_dropped_near_duplicate_of_test', 0) + c.get('pool_dropped_same_bytes_as_test', 0)}, "
        f"with a test caption: {c.get('pool_dropped_caption_of_test', 0)}, by a test author: "
        f"{c.get('dropped_test_author_not_held_out', 0)}"
    )
    check = c["split_check"]
    print(
        f"split checked: test authors in the pool {check['test_authors_in_pool']}, test captions in the pool "
        f"{check['test_captions_in_pool']} (case, whitespace, punctuation ignored), test images in the pool "
        f"{check['test_images_in_pool']}, nearest pool image to a test image {check['min_phash_distance_pool_to_test']} "
        f"pHash bits (> radius {check['radius']})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
