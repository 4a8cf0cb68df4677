"""Face detection: boxes and a count per image, so `curate select --blur-faces` can blur them
(DataComp blurred every face in its pool) and `--where "faces = 0"` can leave faces out.

The detector is OpenCV's Haar cascade `haarcascade_frontalface_alt2.xml`, whose weights ship inside
the opencv-python-headless wheel (`cv2.data.haarcascades`): nothing is downloaded. Chosen by
bench/face_detectors.py on real photos that ship with scikit-image (BENCHMARKS.md): of the packaged
detectors it found the most faces (86 of LFW's 100 face crops) with no false detection on LFW's 100
non-face crops and on 12 photos without a face; `frontalface_default` found 81, scikit-image's LBP
cascade 67 and fired on 2 faceless photos. facenet-pytorch's MTCNN pins an old torch, numpy and Pillow.

What it does not find: faces turned more than ~30 degrees from the camera (profiles: the
cameraman of `skimage.data.camera` is missed), faces smaller than `min_size` pixels in the image
the stage sees (the downloaded image: at 256 px a face in a crowd often is), strongly occluded or
low-light faces. Blurring what it finds is a mitigation, not a guarantee that no face remains.

Boxes are in the pixels of the image as stored (after EXIF rotation, as every image stage and
`curate select` decode it): `face_boxes` is a list of {x, y, w, h}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from curation.core.imageio import DEFAULT_MAX_PIXELS
from curation.core.params import param
from curation.stages.base import Stage, column_values, decode_reasons

BOX = pa.struct([("x", pa.int32()), ("y", pa.int32()), ("w", pa.int32()), ("h", pa.int32())])
FACE_COLUMNS: dict[str, pa.DataType] = {
    "faces": pa.int32(),  # faces detected (null: not looked at)
    "face_boxes": pa.list_(BOX),  # their boxes in the stored image's pixels
    "faces_status": pa.string(),  # ok | no_image | too_large | truncated | decode_error
}
CASCADE = "haarcascade_frontalface_alt2.xml"


@dataclass(frozen=True)
class FacesParams:
    # OpenCV's detectMultiScale parameters (its documented defaults, but min_neighbors 5 not 3:
    # fewer false boxes on textures).
    scale_factor: float = param(1.1, gt=1, le=2)
    min_neighbors: int = param(5, ge=0)
    # Smallest face, in pixels of the image the detector sees.
    min_size: int = param(20, ge=8)
    # Larger images are shrunk to this longest side before detection (boxes scaled back): cost stays
    # bounded on full-size inputs; a face under min_size * side / max_side pixels is then missed.
    max_side: int = param(1024, ge=64)
    max_pixels: int = param(DEFAULT_MAX_PIXELS, ge=1)


def cascade_path() -> str:
    import cv2

    return str(cv2.data.haarcascades) + CASCADE


class Faces(Stage):
    """Count and locate faces; drops only images that cannot be decoded."""

    name = "faces"
    columns: ClassVar[dict[str, pa.DataType]] = FACE_COLUMNS
    bins: ClassVar[dict[str, tuple[float, float, float]]] = {"faces": (0, 64, 1)}
    cascade = True
    needs_images = True
    packages: ClassVar[dict[str, str]] = {"cv2": "pip install 'curate[images]'"}
    Params = FacesParams

    def __init__(self, params: FacesParams, context: Any) -> None:
        super().__init__(params, context)
        self._detector: Any = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_detector": None}  # a cv2 object does not pickle: each worker loads it

    def setup(self) -> None:
        if self._detector is None:
            import cv2

            cv2.setNumThreads(1)  # one core per worker: runners scale by workers
            detector = cv2.CascadeClassifier(cascade_path())
            if detector.empty():
                raise RuntimeError(f"OpenCV could not load its face cascade {cascade_path()}")
            self._detector = detector

    def check(self) -> list[str]:
        import os

        try:
            path = cascade_path()
        except ImportError:
            return []  # `packages` reports the missing module
        return [] if os.path.isfile(path) else [f"OpenCV's wheel has no {CASCADE} (at {path})"]

    def fingerprint(self) -> dict[str, Any]:
        """The cascade file's content hash: another OpenCV release may ship other weights."""
        import cv2

        from curation.models.checkpoints import file_sha256

        return {"cascade": CASCADE, "cascade_sha256": file_sha256(cascade_path()), "opencv": cv2.__version__}

    def detect(self, image) -> list[dict[str, int]]:
        """Face boxes of a decoded PIL image, in its own pixels."""
        self.setup()
        p = self.params
        grey = image.convert("L")
        scale = min(1.0, p.max_side / max(grey.size))
        if scale < 1.0:
            from PIL import Image

            grey = grey.resize(
                (max(1, round(grey.width * scale)), max(1, round(grey.height * scale))),
                Image.Resampling.BILINEAR,
            )
        found = self._detector.detectMultiScale(
            np.asarray(grey),
            scaleFactor=p.scale_factor,
            minNeighbors=p.min_neighbors,
            minSize=(p.min_size, p.min_size),
        )
        boxes = []
        for x, y, w, h in found if len(found) else []:
            boxes.append({k: round(float(v) / scale) for k, v in zip("xywh", (x, y, w, h))})
        return sorted(boxes, key=lambda b: (b["y"], b["x"]))

    def compute(self, table: pa.Table) -> pa.Table:
        from curation.core.imageio import ImageRefused, open_image

        counts: list[int | None] = []
        boxes: list[list[dict] | None] = []
        status: list[str] = []
        for data in column_values(table, "image"):
            try:
                image = open_image(data, self.params.max_pixels)
            except ImageRefused as e:
                counts.append(None)
                boxes.append(None)
                status.append(e.status)
                continue
            found = self.detect(image)
            counts.append(len(found))
            boxes.append(found)
            status.append("ok")
        return pa.table(
            {
                "faces": pa.array(counts, pa.int32()),
                "face_boxes": pa.array(boxes, pa.list_(BOX)),
                "faces_status": pa.array(status, pa.string()),
            }
        )

    def decide(self, table: pa.Table) -> pa.Array:
        return decode_reasons(table.column("faces_status"))


def blur_faces(image, boxes: list[dict[str, int]]):
    """`image` (PIL, RGB) with each box, grown by a fifth on every side, replaced by a Gaussian blur
    strong enough that the face is not recognisable (radius: a sixth of the box's longer side)."""
    from PIL import ImageFilter

    out = image.copy()
    for b in boxes:
        grow_x, grow_y = b["w"] // 5, b["h"] // 5
        box = (
            max(0, b["x"] - grow_x),
            max(0, b["y"] - grow_y),
            min(image.width, b["x"] + b["w"] + grow_x),
            min(image.height, b["y"] + b["h"] + grow_y),
        )
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        radius = max(2.0, max(b["w"], b["h"]) / 6)
        out.paste(out.crop(box).filter(ImageFilter.GaussianBlur(radius)), box[:2])
    return out
