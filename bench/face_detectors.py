"""Which packaged face detector the `faces` stage uses: accuracy on real photos that ship with
scikit-image (no download), per-image time. Prints a table; numbers in BENCHMARKS.md.

Sets:
- LFW subset (`skimage.data.lfw_subset`): 100 face crops and 100 non-face crops of real photos
  (25 x 25 grey), upscaled to 100 x 100: a detector should fire on the first, not on the second;
- photos: astronaut (1 face), camera (the cameraman: 1 face), and 12 photos without a face
  (chelsea, coffee, rocket, hubble_deep_field, coins, moon, page, text, brick, grass, gravel, horse).

Detectors (weights inside installed packages): OpenCV's Haar cascades `frontalface_default` and
`frontalface_alt2` (cv2.data.haarcascades), scikit-image's LBP frontal-face cascade.
facenet-pytorch's MTCNN was not measured: it pins torch<2.3, numpy<2 and Pillow<10.3 (ours: 2.14, 2.4, 13).

    python bench/face_detectors.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import skimage.data as data
from PIL import Image


def grey_u8(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8:
        a = (a * 255).clip(0, 255).astype(np.uint8)
    if a.ndim == 3:
        a = np.asarray(Image.fromarray(a[..., :3]).convert("L"))
    return a


def sets():
    lfw = data.lfw_subset()
    up = [np.asarray(Image.fromarray(grey_u8(x)).resize((100, 100), Image.Resampling.BICUBIC)) for x in lfw]
    faces_photos = {"astronaut": data.astronaut(), "camera": data.camera()}
    no_face = {}
    for name in (
        "chelsea",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "coins",
        "moon",
        "page",
        "text",
        "brick",
        "grass",
        "gravel",
        "horse",
    ):
        no_face[name] = getattr(data, name)()
    return up[:100], up[100:], faces_photos, no_face


def detectors():
    import cv2
    from skimage.feature import Cascade

    out = {}
    for name in ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml"):
        c = cv2.CascadeClassifier(cv2.data.haarcascades + name)
        out[name.removeprefix("haarcascade_").removesuffix(".xml")] = lambda g, c=c: len(
            c.detectMultiScale(g, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        )
    lbp = Cascade(data.lbp_frontal_face_cascade_filename())
    out["skimage_lbp"] = lambda g: len(
        lbp.detect_multi_scale(
            g,
            scale_factor=1.2,
            step_ratio=1,
            min_size=(24, 24),
            max_size=g.shape[::-1],
            min_neighbor_number=4,
        )
    )
    return out


def main() -> None:
    faces, nonfaces, face_photos, noface_photos = sets()
    print(
        f"{'detector':<28}{'LFW faces found':>16}{'LFW non-faces fired':>21}{'photos w/ face':>16}"
        f"{'faceless photos fired':>23}{'ms/photo (median)':>19}"
    )
    for name, detect in detectors().items():
        hit = sum(detect(g) > 0 for g in faces)
        fp = sum(detect(g) > 0 for g in nonfaces)
        ph = [detect(grey_u8(a)) for a in face_photos.values()]
        times, fired = [], []
        for a in noface_photos.values():
            g = grey_u8(a)
            t = time.perf_counter()
            fired.append(detect(g) > 0)
            times.append((time.perf_counter() - t) * 1000)
        print(
            f"{name:<28}{hit:>12}/100{fp:>17}/100{ph!s:>16}{sum(fired):>20}/12"
            f"{statistics.median(times):>19.1f}"
        )


if __name__ == "__main__":
    main()
