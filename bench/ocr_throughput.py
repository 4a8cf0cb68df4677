"""OCR throughput: EasyOCR's per-image `readtext` loop vs the batched text_spotting stage.

    NO_ALBUMENTATIONS_UPDATE=1 PYTHONPATH=. python bench/ocr_throughput.py --images 200 --device cpu

Both run on the same fixed, generated mix of encoded images (skimage photos
without text, random crops/resizes of them, rendered text on flat backgrounds
and over photos; long side 256-512 px), in one process, one after the other,
after a warm-up of each. Prints images/s of each, the ratio, the share of OCR
time spent in detection, and per-image agreement between the two.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.core.text import tokens
from curation.stages.base import StageContext
from curation.stages.text_spotting import TextSpotting, TextSpottingParams

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "immunohistochemistry",
    "hubble_deep_field",
    "camera",
    "coins",
    "moon",
    "grass",
    "gravel",
    "brick",
    "colorwheel",
    "cell",
    "retina",
    "stereo_motorcycle",
)
PHRASES = (
    "Grand opening this weekend",
    "Best pizza in town",
    "Happy birthday Emma",
    "Keep calm and carry on",
    "SALE 50% OFF",
    "Welcome to Portland",
    "Fresh bread every morning",
    "Open 24 hours",
    "The quick brown fox",
    "Live music tonight",
    "Free shipping on all orders",
    "Hotel California",
)
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansCondensed.ttf",
)


def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    path = Path("/usr/share/fonts/truetype") / name
    if not path.exists():
        path = next(Path("/usr/share/fonts").rglob(name), None) if Path("/usr/share/fonts").exists() else None
    return ImageFont.truetype(str(path), size) if path else ImageFont.load_default(size=size)


def _photo_arrays() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in PHOTOS:
        a = getattr(data, name)()
        a = a[0] if isinstance(a, tuple) else a
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        out.append(np.ascontiguousarray(a.astype(np.uint8)))
    return out


def _fit(img: Image.Image, rng: random.Random) -> Image.Image:
    side = rng.randint(256, 512)
    scale = side / max(img.size)
    return img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))), Image.BILINEAR)


def make_images(n: int, seed: int = 0, text_fraction: float = 0.35) -> list[tuple[str, str, bytes]]:
    """(kind, caption, JPEG bytes) for a fixed mix; same seed, same images."""
    rng = random.Random(seed)
    photos = [Image.fromarray(a) for a in _photo_arrays()]
    out = []
    for k in range(n):
        base = photos[k % len(photos)]
        if rng.random() >= text_fraction:
            if rng.random() < 0.5:  # random crop, 50-100% of each side
                w, h = base.size
                cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
                x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
                base = base.crop((x, y, x + cw, y + ch))
            img, kind, caption = _fit(base, rng), "photo", "a photo of something"
        else:
            phrase = rng.choice(PHRASES)
            size = (rng.randint(256, 512), rng.randint(256, 512))
            if rng.random() < 0.5:
                img = Image.new("RGB", size, tuple(rng.randint(170, 255) for _ in range(3)))
                fill = tuple(rng.randint(0, 80) for _ in range(3))
            else:
                img = base.resize(size, Image.BILINEAR)
                fill = rng.choice([(255, 255, 0), (255, 255, 255), (0, 0, 0)])
            font = _font(rng.choice(FONTS), rng.randint(22, 44))
            draw = ImageDraw.Draw(img)
            words, lines, line = phrase.split(), [], ""
            for word in words:  # wrap to the image width
                trial = f"{line} {word}".strip()
                if line and font.getlength(trial) > size[0] - 24:
                    lines.append(line)
                    line = word
                else:
                    line = trial
            lines.append(line)
            y = rng.randint(8, max(9, size[1] - 60 * len(lines)))
            for text in lines:
                draw.text((12, y), text, fill=fill, font=font)
                y += int(font.size * 1.3)
            kind, caption = "text", phrase
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=90)
        out.append((kind, caption, buf.getvalue()))
    return out


def run_naive(reader, images: list[bytes]) -> tuple[float, list[set[str]], float]:
    """The loop a user writes: readtext per image. Returns seconds, tokens per image, detect seconds."""
    detect_s = 0.0
    original = reader.detect

    def timed_detect(*a, **kw):  # measurement only: how much of readtext is detection
        nonlocal detect_s
        start = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            detect_s += time.perf_counter() - start

    reader.detect = timed_detect
    try:
        found = []
        start = time.perf_counter()
        for img in images:
            found.append(tokens(" ".join(t for _, t, _ in reader.readtext(img))))
        return time.perf_counter() - start, found, detect_s
    finally:
        del reader.detect


def run_stage(
    stage: TextSpotting, rows: list[tuple[str, str, bytes]], batch: int
) -> tuple[float, list[set[str]]]:
    found: list[set[str]] = []
    engine = stage.model
    engine.timings.clear()
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        out = stage.compute(
            pa.table({"caption": [c for _, c, _ in chunk], "image": [b for _, _, b in chunk]})
        )
        found += [tokens(t) for t in out.column("ocr_text").to_pylist()]
    return time.perf_counter() - start, found


def agreement(a: list[set[str]], b: list[set[str]], kinds: list[str]) -> dict:
    both_text = sum(1 for x, y in zip(a, b) if x and y)
    both_none = sum(1 for x, y in zip(a, b) if not x and not y)
    jacc = [len(x & y) / len(x | y) for x, y in zip(a, b) if x and y]
    recall = [len(x & y) / len(x) for x, y in zip(a, b) if x]
    return {
        "same_text_or_none": (both_text + both_none) / len(a),
        "both_text": both_text,
        "both_none": both_none,
        "only_readtext": sum(1 for x, y in zip(a, b) if x and not y),
        "only_stage": sum(1 for x, y in zip(a, b) if y and not x),
        "mean_token_jaccard_where_both": float(np.mean(jacc)) if jacc else None,
        "mean_readtext_token_recall": float(np.mean(recall)) if recall else None,
        "text_images_found_readtext": sum(1 for x, k in zip(a, kinds) if x and k == "text"),
        "text_images_found_stage": sum(1 for y, k in zip(b, kinds) if y and k == "text"),
        "text_images": kinds.count("text"),
        "photos_with_text_readtext": sum(1 for x, k in zip(a, kinds) if x and k == "photo"),
        "photos_with_text_stage": sum(1 for y, k in zip(b, kinds) if y and k == "photo"),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per compute() call")
    ap.add_argument("--detect-batch-size", type=int, default=16)
    ap.add_argument("--canvas", type=int, nargs="+", default=[640], help="stage canvas sizes to measure")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    rows = make_images(args.images)
    kinds = [k for k, _, _ in rows]
    images = [b for _, _, b in rows]
    print(f"{len(rows)} images: {kinds.count('photo')} photos, {kinds.count('text')} with text", flush=True)

    results: dict = {"images": len(rows), "args": vars(args) | {"json": str(args.json)}}
    stages = {}
    for canvas in args.canvas:
        params = TextSpottingParams(
            device=args.device,
            canvas_size=canvas,
            precision=args.precision,
            cpus=args.cpus,
            detect_batch_size=args.detect_batch_size,
        )
        st = TextSpotting(params, StageContext(output_dir=Path(".")))
        st.setup()
        stages[canvas] = st
    reader = next(iter(stages.values())).model.reader
    device = next(iter(stages.values())).device
    results["device"] = device

    # warm-up both paths (allocator, oneDNN/cuDNN kernel choice) on images outside the measured set
    warm = make_images(4, seed=1234)
    for st in stages.values():
        run_stage(st, warm, args.batch_size)
    if not args.skip_naive:
        for _, _, b in warm:
            reader.readtext(b)

    naive_found = None
    if not args.skip_naive:
        seconds, naive_found, det_s = run_naive(reader, images)
        results["readtext"] = {
            "seconds": seconds,
            "images_per_s": len(rows) / seconds,
            "detect_share": det_s / seconds,
        }
        print(
            f"(a) readtext loop: {len(rows) / seconds:.2f} img/s ({seconds:.1f} s), detection {det_s / seconds:.0%}",
            flush=True,
        )
    for canvas, st in stages.items():
        seconds, found = run_stage(st, rows, args.batch_size)
        t = dict(st.model.timings)
        ocr = sum(t.values())
        entry = {
            "seconds": seconds,
            "images_per_s": len(rows) / seconds,
            "timings": t,
            "detect_share": t.get("detect", 0) / ocr if ocr else None,
            "precision": st.model.precision,
        }
        line = f"(b) stage canvas={canvas} {st.model.precision}: {len(rows) / seconds:.2f} img/s ({seconds:.1f} s), detection {entry['detect_share']:.0%}"
        if naive_found is not None:
            entry["speedup"] = results["readtext"]["seconds"] / seconds
            entry["agreement"] = agreement(naive_found, found, kinds)
            line += (
                f", speedup {entry['speedup']:.2f}x, agreement {entry['agreement']['same_text_or_none']:.1%}"
            )
        results[f"stage_canvas_{canvas}"] = entry
        print(line, flush=True)
        if "agreement" in entry:
            print("    " + json.dumps(entry["agreement"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
