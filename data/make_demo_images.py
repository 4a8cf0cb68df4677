"""Generate the demo's bundled image set: data/demo_images/*.jpg and data/demo_pairs.parquet.

    python data/make_demo_images.py      # from the repository root; output is committed

Three kinds of pairs, so every stage of pipelines/demo_images.yaml has something to do:
- scikit-image's bundled photos (small crops and resizes), with captions some of which
  the caption filters keep (an action with a subject) and some they drop;
- rendered-text images whose caption is the very text drawn in them, which
  text_spotting drops (DiHT's point: such pairs teach a model to read, not to see),
  and a few whose drawn text differs from the caption, which it keeps;
- a missing file and a truncated JPEG, which the download stage records as
  failed_to_download / failed_to_resize.

URLs are relative `file:` URLs (urllib, and so img2dataset, reads them), resolved
against the repository root where `make demo` runs: no server, no network.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent
IMAGES = ROOT / "demo_images"
PAIRS = ROOT / "demo_pairs.parquet"

# (skimage.data function, crop box as fractions or None, caption)
PHOTOS = [
    ("astronaut", None, "An astronaut poses in front of the flag at the space center."),
    ("astronaut", (0.25, 0.0, 0.75, 0.5), "A smiling woman wears a white space suit."),
    ("coffee", None, "A barista serves a cup of coffee on a red saucer."),
    ("coffee", (0.3, 0.1, 0.8, 0.7), "coffee cup"),
    ("chelsea", None, "A ginger cat stares at the camera from the floor."),
    ("chelsea", (0.2, 0.0, 0.7, 0.6), "cat face close up"),
    ("rocket", None, "A rocket stands on the launch pad before the flight."),
    ("camera", None, "A photographer looks through his camera in a park."),
    ("horse", None, "A horse gallops across an empty white field."),
    ("coins", None, "old coins"),
    ("moon", None, "surface of the moon"),
    ("clock", None, "An old clock hangs on the wall of the station."),
    ("brick", None, "brick wall texture"),
    ("grass", None, "green grass"),
    ("gravel", None, "Gravel covers the path that leads to the garden."),
    ("hubble_deep_field", None, "Thousands of distant galaxies shine in the deep field."),
    ("immunohistochemistry", None, "stained tissue under a microscope"),
    ("logo", None, "scikit-image logo"),
    ("colorwheel", None, "color wheel"),
    ("page", None, "A page of printed text from an old book"),
    ("cell", None, "A cell divides under the microscope in the lab."),
    ("retina", None, "A doctor examines the retina of a patient."),
    ("binary_blobs", None, "black and white blobs"),
]

# (text drawn in the image, caption); the first ones are the same words: text_spotting drops them
TEXTS = [
    ("Our bakery sells fresh bread every morning", None),
    ("The home team wins the big game tonight", None),
    ("Dogs play in the park on Sundays", None),
    ("Grandma bakes the best apple pie in town", None),
    ("We deliver hot pizza to your door", None),
    ("Children build sandcastles on the beach", None),
    ("SALE 50% OFF", "A woman walks past a shop window on a rainy day."),
    ("OPEN", "A man unlocks the door of his small shop at dawn."),
    ("EXIT", "People leave the stadium after the concert ends."),
]


def _photo(name: str, crop: tuple[float, float, float, float] | None) -> Image.Image:
    import skimage.data

    arr = np.asarray(getattr(skimage.data, name)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = (255 * (arr - arr.min()) / max(float(np.ptp(arr)), 1e-9)).astype(np.uint8)
    img = Image.fromarray(arr)
    if crop:
        w, h = img.size
        img = img.crop((int(crop[0] * w), int(crop[1] * h), int(crop[2] * w), int(crop[3] * h)))
    img = img.convert("RGB")
    img.thumbnail((128, 128))
    return img


def _text_image(text: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    img = Image.new("RGB", (320, 160), bg)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=30)
    lines = textwrap.wrap(text, width=18)
    y = (160 - 36 * len(lines)) // 2
    for line in lines:
        draw.text((16, y), line, fill=(20, 20, 30), font=font)
        y += 36
    return img


def _save(img: Image.Image, name: str) -> str:
    path = IMAGES / name
    img.save(path, format="JPEG", quality=70, optimize=True)
    return f"file:data/demo_images/{name}"


def main() -> None:
    IMAGES.mkdir(exist_ok=True)
    urls, captions = [], []
    for i, (name, crop, caption) in enumerate(PHOTOS):
        try:
            img = _photo(name, crop)
        except Exception as e:  # a dataset that skimage would have to download: skip it
            print(f"skipping {name}: {type(e).__name__}")
            continue
        urls.append(_save(img, f"photo_{i:02d}_{name}.jpg"))
        captions.append(caption)
    for i, (text, caption) in enumerate(TEXTS):
        urls.append(_save(_text_image(text, i), f"text_{i:02d}.jpg"))
        captions.append(caption or text)
    # failures, with captions the caption filters keep so the download stage reaches them
    buf = io.BytesIO()
    _text_image("broken", 99).save(buf, format="JPEG")
    (IMAGES / "truncated.jpg").write_bytes(buf.getvalue()[:300])
    urls += ["file:data/demo_images/truncated.jpg", "file:data/demo_images/missing.jpg"]
    captions += ["A truncated file ends before its image does.", "A missing file never arrives at the server."]
    pq.write_table(pa.table({"url": urls, "caption": captions}), PAIRS)
    size = sum(p.stat().st_size for p in IMAGES.iterdir()) + PAIRS.stat().st_size
    print(f"{len(urls)} pairs, {len(list(IMAGES.iterdir()))} files, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
