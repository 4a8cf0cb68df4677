"""CLIP score: cosine similarity of an image and its caption under a local open_clip model.

`clip_score` = <f(image), g(caption)> with f, g the model's image and text
towers (`encode_image`, `encode_text`) and both embeddings L2-normalised: the
score DataComp's CLIP-score baselines threshold (e.g. >= 0.28 for OpenAI's
ViT-B/32, or the top 30% of the pool, which `curate select --top-fraction`
computes over the whole run). The image is preprocessed exactly as open_clip's
validation transform does (resize the short side, centre crop, normalise);
JPEGs much larger than the model's input are decoded at 1/2, 1/4 or 1/8 scale
first (libjpeg's DCT scaling, never below the input size). The caption goes to
the model's own tokenizer as written (it cleans HTML entities and whitespace
itself, and truncates to the context length).

Images and captions are encoded in batches (one forward per `batch_size`
images; identical captions of a batch are encoded once), on the GPU when one
is present. `keep_embedding: true` stores the normalised image embedding as
float16 (`clip_image_embedding`) for `curate dedup`'s semantic dedup and for
mining, so nothing has to be embedded twice.

Statuses (`clip_status`): `ok`; the image statuses of `curation.core.imageio`
(`no_image`, `too_large`, `truncated`, `decode_error`; score null, row dropped
as `decode`); `no_caption` (null or blank caption: the image is still embedded,
the score is null and fails a `min` threshold); `not_finite` (the model gave NaN or
infinity, e.g. a checkpoint with NaN weights: an error, never a score).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.core.imageio import DEFAULT_MAX_PIXELS, IMAGE_STATUSES
from curation.core.params import param
from curation.stages.base import ModelStage, column_values, decode_failed

CLIP_COLUMNS: dict[str, pa.DataType] = {
    "clip_score": pa.float32(),  # cosine of the image and caption embeddings
    "clip_status": pa.string(),  # ok | no_image | too_large | truncated | decode_error | no_caption | not_finite
}
EMBEDDING_COLUMN = "clip_image_embedding"  # L2-normalised; only with keep_embedding: true


@dataclass(frozen=True)
class ClipScoreParams:
    # A checkpoint file (local path or URL, s3://...): a `curate train` checkpoint or an open_clip state dict.
    checkpoint: str | None = None
    # open_clip model name or JSON config path; null = the name a `curate train` checkpoint stores.
    model: str | None = None
    # Drop rows scoring below this; null records the score only (select by fraction later).
    min: float | None = param(None, ge=-1, le=1, hint="a cosine similarity")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # auto: fp32 on CPU (scores exact to open_clip's), fp16 autocast on CUDA.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Images (and distinct captions) per forward pass.
    batch_size: int = param(256, ge=1)
    # Also store the L2-normalised image embedding (float16 list column).
    keep_embedding: bool = False
    max_pixels: int = param(DEFAULT_MAX_PIXELS, ge=1)
    # CPU cores of one worker: torch threads on CPU, decode threads on CUDA.
    cpus: int = param(2, ge=1)


@dataclass
class Scores:
    scores: np.ndarray  # float32, NaN where there is no score
    status: list[str]
    embeddings: np.ndarray | None  # [n, d] float32, NaN rows where no image


class ClipScorer:
    """An open_clip model loaded once per worker, scoring (image bytes, caption) pairs in batches."""

    def __init__(
        self, params: ClipScoreParams, device: str, precision: str, decode_map: Callable[..., Iterator] = map
    ) -> None:
        import torch

        from curation.models.clip import load_for_eval

        self.torch = torch
        self.params = params
        self.device = device
        self.decode_map = decode_map
        built = load_for_eval(params.checkpoint, params.model, device=device)
        self.model = built.model
        self.preprocess = built.preprocess_val
        self.tokenizer = built.tokenizer
        size = self.model.visual.image_size
        self.input_size = (size, size) if isinstance(size, int) else tuple(size)
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def _prepare(self, data: bytes | None) -> Any:
        """The model's input tensor for one image, or its failure status."""
        from curation.core.imageio import ImageRefused, open_image

        try:
            image = open_image(data, self.params.max_pixels, draft=self.input_size)
        except ImageRefused as e:
            return e.status
        return self.preprocess(image)

    def _forward(self, fn, batch):
        torch = self.torch
        with (
            torch.inference_mode(),
            torch.autocast(
                self.device,
                dtype=self.autocast_dtype or torch.float32,
                enabled=self.autocast_dtype is not None,
            ),
        ):
            out = fn(batch.to(self.device, non_blocking=True)).float()
        return torch.nn.functional.normalize(out, dim=-1)

    def encode_images(self, images: list[bytes | None]) -> tuple[Any, list[str]]:
        """[n, d] normalised embeddings (zero rows where the image failed) and per-row statuses."""
        torch = self.torch
        prepared = self.decode_map(self._prepare, images)
        status: list[str] = []
        rows: list[int] = []
        pending: list[Any] = []
        chunks: list[Any] = []
        for i, x in enumerate(prepared):
            if isinstance(x, str):
                status.append(x)
                continue
            status.append("ok")
            rows.append(i)
            pending.append(x)
            if len(pending) == self.params.batch_size:
                chunks.append(self._forward(self.model.encode_image, torch.stack(pending)))
                pending = []
        if pending:
            chunks.append(self._forward(self.model.encode_image, torch.stack(pending)))
        if not chunks:  # no image decoded: the embedding width from one blank input
            blank = torch.zeros((1, 3, *self.input_size))
            chunks, rows = [self._forward(self.model.encode_image, blank)[:0]], []
        out = torch.zeros((len(images), chunks[0].shape[1]), device=self.device)
        if rows:
            out[torch.as_tensor(rows, device=self.device)] = torch.cat(chunks)
        return out, status

    def encode_texts(self, captions: list[str]) -> Any:
        """[n, d] normalised embeddings of `captions` (all non-blank), each distinct caption once."""
        torch = self.torch
        index: dict[str, int] = {}
        which = [index.setdefault(c, len(index)) for c in captions]
        distinct = list(index)
        step = self.params.batch_size
        chunks = [
            self._forward(self.model.encode_text, self.tokenizer(distinct[i : i + step]))
            for i in range(0, len(distinct), step)
        ]
        return torch.cat(chunks)[torch.as_tensor(which, device=self.device)]

    def score(self, images: list[bytes | None], captions: list[str | None]) -> Scores:
        torch = self.torch
        image_emb, status = self.encode_images(images)
        scores = np.full(len(images), np.nan, dtype=np.float32)
        has_caption = [bool(c and c.strip()) for c in captions]
        for i, ok in enumerate(has_caption):
            if not ok and status[i] == "ok":
                status[i] = "no_caption"
        rows = [i for i, s in enumerate(status) if s == "ok"]
        if rows:
            text_emb = self.encode_texts([captions[i] for i in rows])  # type: ignore[misc]
            at = torch.as_tensor(rows, device=self.device)
            scores[rows] = (image_emb[at] * text_emb).sum(dim=1).cpu().numpy()
            for i in rows:
                if not np.isfinite(scores[i]):  # NaN weights, an overflow: the model failed, not the pair
                    status[i] = "not_finite"
        embeddings = None
        if self.params.keep_embedding:
            embeddings = image_emb.cpu().numpy()
            embeddings[[s in IMAGE_STATUSES for s in status]] = np.nan
        return Scores(scores, status, embeddings)


class ClipScore(ModelStage):
    """Score every kept pair with a local open_clip model; optionally drop those below `min`."""

    name = "clip_score"
    packages: ClassVar[dict[str, str]] = {m: "pip install 'curate[clip]'" for m in ("torch", "open_clip")}
    # Every column the stage can write; an instance without keep_embedding writes only CLIP_COLUMNS.
    columns: ClassVar[dict[str, pa.DataType]] = {**CLIP_COLUMNS, EMBEDDING_COLUMN: pa.list_(pa.float16())}
    bins: ClassVar[dict[str, tuple[float, float, float]]] = {"clip_score": (-1, 1.002, 0.002)}
    cascade = True
    needs_images = True
    model_file_params = ("checkpoint",)
    Params = ClipScoreParams

    def __init__(self, params: ClipScoreParams, context) -> None:
        super().__init__(params, context)
        if not params.keep_embedding:
            self.columns = CLIP_COLUMNS  # type: ignore[misc]  # this instance's manifest has no embedding

    def auto_precision(self) -> str:
        # fp32 on CPU: scores exact to open_clip's
        return "fp16" if self.device == "cuda" else "fp32"

    def load_model(self) -> ClipScorer:
        assert self.params.checkpoint is not None  # check() refuses a config without one
        local = replace(self.params, checkpoint=self.model_path(self.params.checkpoint))
        return ClipScorer(local, self.device, self.precision, self.decode_map)

    def compute(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        images = column_values(table, "image")
        captions = table.column("caption").to_pylist()
        result = self.model.score(images, captions)
        columns: dict[str, pa.Array] = {
            "clip_score": pa.array(result.scores, pa.float32(), from_pandas=True),
            "clip_status": pa.array(result.status, pa.string()),
        }
        if result.embeddings is not None:
            emb = result.embeddings.astype(np.float16)
            values = pa.array(emb.reshape(-1), pa.float16())
            offsets = pa.array(np.arange(n + 1, dtype=np.int32) * emb.shape[1], pa.int32())
            missing = pa.array(np.isnan(result.embeddings[:, 0]) if n else np.zeros(0, bool))
            columns[EMBEDDING_COLUMN] = pa.ListArray.from_arrays(offsets, values, mask=missing)
        return pa.table(columns)

    def decide(self, table: pa.Table) -> pa.Array:
        null = pa.scalar(None, pa.string())
        failed = decode_failed(table.column("clip_status"))
        reason = pa.nulls(table.num_rows, pa.string())
        if self.params.min is not None:
            # float32 storage: compare at that precision, so a score stored as the threshold passes.
            low = pc.fill_null(
                pc.less(table.column("clip_score"), pa.scalar(self.params.min, pa.float32())), True
            )
            scored = pc.is_valid(table.column("clip_status"))  # rows the cascade skipped are not judged
            reason = pc.if_else(pc.and_(low, scored), pa.scalar("clip_score"), null)
        reason = pc.if_else(failed, pa.scalar("decode"), reason)
        return reason

    def thresholds(self) -> dict[str, tuple[str, float]]:
        return {} if self.params.min is None else {"clip_score": (">=", self.params.min)}

    def fingerprint(self) -> dict[str, Any]:
        """The checkpoint by content: one overwritten in place would otherwise score a resumed run twice."""
        from curation.models.checkpoints import file_sha256

        assert self.params.checkpoint is not None  # check() refuses a config without one
        checkpoint = self.model_path(self.params.checkpoint)
        return {"model": self.params.model, "checkpoint_sha256": file_sha256(checkpoint)}

    def check(self) -> list[str]:
        p = self.params
        if p.checkpoint is None:
            return [
                "checkpoint is required: an open_clip checkpoint file (local path or URL) "
                "(a `curate train` checkpoint or an open_clip state dict; nothing is downloaded)",
            ]
        from curation.models.clip import checkpoint_problems
        from curation.models.files import ModelFileError

        try:
            checkpoint = self.model_path(p.checkpoint)
        except ModelFileError as e:
            return [*super().check(), str(e)]
        return super().check() + checkpoint_problems(checkpoint, p.model)
