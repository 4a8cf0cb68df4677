"""The stage contract, and the one function that applies a stage to a batch.

A stage computes raw measurements (columns) and, separately, decides on them
(a drop reason per row, or null to keep). Keeping the two apart is what makes
"score once, select many times" work: the manifest holds the measurement, and
a stricter threshold later is a SQL query, not a re-run.

The same stage objects run under every runner: the local runner calls
`apply_stage` in worker processes, the Ray runner inside `map_batches` actors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.core.imageio import IMAGE_STATUSES

T = TypeVar("T")


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs. Runners size their pools from this."""

    cpus: float = 1.0
    gpus: float = 0.0


@dataclass(frozen=True)
class StageContext:
    """Run-wide facts a stage may need (where to put images, for example)."""

    # The run's output: a local directory or a URL (s3://...; a str, as `Path` would mangle it), and the
    # fsspec options to reach it (credentials: never printed).
    output_dir: Path | str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


class Stage(ABC):
    """One step of a pipeline.

    Subclasses set `name` (the key used in YAML configs), `columns` (the raw
    measurements they add, name -> Arrow type, the one declaration of each;
    stages sharing a column declare the same type),
    `Params` (a dataclass of their YAML parameters), `cascade` (True when
    the stage should only see rows that earlier stages kept) and `needs_images`
    (True when it reads the image bytes or the sizes a download records, so
    on URL input it must come after a stage that `provides_images`). `packages`
    maps the modules it imports to how to install them, and `shared_params`
    names the params that must agree between stages writing the same columns
    (they compute them once); `curation.validation` checks all three. A stage that
    decides by a threshold on one of its columns says so in `thresholds()`
    (a row passes when `column op value`); `curate report` draws it.
    """

    name: ClassVar[str]
    columns: ClassVar[dict[str, pa.DataType]]
    # Fixed histogram bins of the numeric columns, (lo, hi, step): what the per-shard summaries count
    # (`curate stats`); sub-bins of `step` merge exactly across shards. Values outside [lo, hi) fall
    # into an under- or overflow bin. Every numeric column but a hash declares one (tested).
    bins: ClassVar[dict[str, tuple[float, float, float]]] = {}
    cascade: ClassVar[bool] = False
    needs_images: ClassVar[bool] = False
    provides_images: ClassVar[bool] = False
    packages: ClassVar[dict[str, str]] = {}
    shared_params: ClassVar[tuple[str, ...]] = ()
    # Params naming model files (paths or URLs) whose contents `fingerprint()` covers: where they lie is
    # left out of the run's fingerprint, so the same weights moved or named by URL resume the same run.
    model_file_params: ClassVar[tuple[str, ...]] = ()
    Params: ClassVar[type]

    def __init__(self, params: Any, context: StageContext) -> None:
        self.params = params
        self.context = context

    @property
    def resources(self) -> Resources:
        return Resources()

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load models; called once per worker before the first batch."""

    def teardown(self) -> None:  # noqa: B027 - optional hook
        """Release what `setup` took (models, threads); called once when a worker finishes, also after a
        failed shard or a failed setup. Must not raise."""

    @abstractmethod
    def compute(self, table: pa.Table) -> pa.Table:
        """Return a table of `self.columns` with one row per input row, same order.

        Per-row failures must become values (a status column, nulls), never
        exceptions: one bad image must not fail a shard.
        """

    @abstractmethod
    def decide(self, table: pa.Table) -> pa.Array | pa.ChunkedArray:
        """Drop reason per row (string), null where the row passes this stage.

        Called on the full batch after `compute`; rows the stage skipped
        (cascade) have null measurements and are not looked at.
        """

    def check(self) -> list[str]:
        """Problems with the world this stage can see without running (model files; empty: fine).
        Ranges belong on `Params` (`curation.core.params.param`), packages in `packages`."""
        return []

    def model_path(self, location: str, *, directory: bool = False) -> str:
        """A local path for a model file (folder) the config names: a URL (s3://...) is copied into the
        model cache with the config's `storage_options` (curation.models.files.local_model_path), so
        check(), fingerprint() and setup() all see the same local file. Raises ModelFileError."""
        from curation.models.files import local_model_path

        return local_model_path(location, self.context.storage_options, directory=directory)

    def thresholds(self) -> dict[str, tuple[str, float]]:
        """Decision thresholds on this stage's columns, {column: (op, value)}, op in '>=', '>', '<', '<='."""
        return {}

    def fingerprint(self) -> dict[str, Any]:
        """What else, beyond its params, decides this stage's results: the contents of the model files it
        loads (a checkpoint overwritten in place, an edited vocabulary). Folded into the run's config hash
        by `curation.engine.execute`, once per run in the driver, so a resume cannot mix two models."""
        return {}


class ModelStage(Stage):
    """A stage that runs a torch model on `params.device` with `params.cpus` cores.

    It owns what every model stage needs around its model, so a subclass only loads it
    (`load_model`) and runs it (`self.model`):
    - `device` follows the one rule of curation.core.devices (`auto` = CUDA when this process sees a GPU),
      resolved once; `resources` declare the GPU, so the Ray runner gives the stage its own GPU pool
      and the local runner can refuse a CUDA stage on a machine without one;
    - `precision`: `params.precision`, `auto` resolved by the stage's `auto_precision()`;
    - threads: on CPU torch gets the worker's `cpus` cores (more threads only contend); on CUDA
      those cores decode images ahead of the GPU (`decode_map`);
    - teardown: the decode threads stop and the model is released.
    """

    _device: str | None = None
    _model: Any = None
    _decode_pool: ThreadPoolExecutor | None = None

    @property
    def device(self) -> str:
        if self._device is None:
            from curation.core.devices import resolve_device

            self._device = resolve_device(self.params.device)
        return self._device

    @property
    def resources(self) -> Resources:
        return Resources(cpus=max(1, self.params.cpus), gpus=1.0 if self.device == "cuda" else 0.0)

    def auto_precision(self) -> str:
        """What `precision: auto` means for this stage on `self.device`."""
        return "fp32"

    @property
    def precision(self) -> str:
        return self.params.precision if self.params.precision != "auto" else self.auto_precision()

    @abstractmethod
    def load_model(self) -> Any:
        """The stage's model on `self.device` in `self.precision`, loaded once per worker."""

    @property
    def model(self) -> Any:
        self.setup()
        return self._model

    def setup(self) -> None:
        if self._model is not None:
            return
        if self.device == "cpu":
            import torch

            torch.set_num_threads(max(1, self.params.cpus))
        else:
            self._decode_pool = ThreadPoolExecutor(max(1, self.params.cpus), f"{self.name}-decode")
        self._model = self.load_model()

    def decode_map(self, fn: Callable[[Any], T], items: Iterable[Any]) -> Iterator[T]:
        """`map(fn, items)`, in order; on CUDA run ahead in the decode threads (PIL and cv2 release the
        GIL) while the GPU works. On CPU inline: torch already uses every core of the worker."""
        return self._decode_pool.map(fn, items) if self._decode_pool else map(fn, items)

    def teardown(self) -> None:
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._decode_pool = self._model = None

    def check(self) -> list[str]:
        # Whether a GPU is there is the runner's question (a Ray driver needs none; its GPU workers do).
        if self.params.precision == "fp16" and self.device == "cpu":
            return ["precision fp16 is not supported on CPU (use fp32 or bf16)"]
        return []


def column_values(table: pa.Table, name: str) -> list[Any]:
    """A column's values, or all None where the batch has no such column (an input without images)."""
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def decode_failed(status: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """True where an image stage's status is one of `curation.core.imageio`'s failures (no image to judge:
    the row is dropped as `decode`); False where it is ok or null (a row the cascade skipped)."""
    return pc.fill_null(pc.is_in(status, value_set=pa.array(IMAGE_STATUSES)), False)


def decode_reasons(status: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """`decide()` of a stage that drops only images it could not read."""
    return pc.if_else(decode_failed(status), pa.scalar("decode"), pa.scalar(None, pa.string()))


def apply_stage(stage: Stage, table: pa.Table) -> pa.Table:
    """Compute the stage's columns (unless present) and fold its decision into keep/drop_reason.

    Measurements a previous stage already computed are reused, so stages that
    share one expensive computation (the caption parse) pay for it once.
    """
    if "keep" not in table.column_names:
        table = table.append_column("keep", pa.array(np.ones(table.num_rows, dtype=bool)))
    for col in ("drop_reason", "drop_stage"):
        if col not in table.column_names:
            table = table.append_column(col, pa.nulls(table.num_rows, pa.string()))

    missing = [c for c in stage.columns if c not in table.column_names]
    if missing:
        if stage.cascade:
            idx = np.flatnonzero(table.column("keep").to_numpy(zero_copy_only=False))
            computed = stage.compute(table.take(pa.array(idx, pa.int64()))) if len(idx) else None
            if computed is not None:
                _check_computed(stage, computed, len(idx))
            table = _scatter(table, computed, idx, stage.columns, missing)
        else:
            computed = stage.compute(table)
            _check_computed(stage, computed, table.num_rows)
            for col in missing:
                table = _append(table, col, computed.column(col).cast(stage.columns[col]))

    keep = table.column("keep").to_numpy(zero_copy_only=False)
    reasons = stage.decide(table)
    if isinstance(reasons, pa.ChunkedArray):  # compute on a table's columns gives chunks
        reasons = reasons.combine_chunks()
    if len(reasons) != table.num_rows:
        raise RuntimeError(
            f"stage {stage.name!r} decided {len(reasons)} rows for a batch of {table.num_rows}"
        )
    failed = keep & pc.is_valid(reasons).to_numpy(zero_copy_only=False)
    if failed.any():
        mask = pa.array(failed)
        drop = pc.if_else(mask, reasons, table.column("drop_reason"))
        by = pc.if_else(mask, pa.scalar(stage.name), table.column("drop_stage"))
        table = table.set_column(table.schema.get_field_index("keep"), "keep", pa.array(keep & ~failed))
        table = table.set_column(table.schema.get_field_index("drop_reason"), "drop_reason", drop)
        table = table.set_column(table.schema.get_field_index("drop_stage"), "drop_stage", by)
    return table


def _check_computed(stage: Stage, computed: pa.Table, n: int) -> None:
    if computed.num_rows != n:
        raise RuntimeError(f"stage {stage.name!r} returned {computed.num_rows} rows for a batch of {n}")


def _append(table: pa.Table, name: str, column: pa.ChunkedArray | pa.Array) -> pa.Table:
    # Decision columns stay last in the table so the manifest layout is stable.
    at = table.schema.get_field_index("keep")
    return table.add_column(at, name, column)


def _scatter(table, computed, idx, columns: dict[str, pa.DataType], missing):
    """Place `computed` rows back at positions `idx`; other rows get nulls."""
    n = table.num_rows
    # position in `computed` for each output row, null where the stage skipped it
    pos = np.full(n, -1, dtype=np.int64)
    pos[idx] = np.arange(len(idx))
    take = pa.array(pos, mask=pos < 0)
    for col in missing:
        if computed is None:
            values = pa.nulls(n, columns[col])
        else:
            values = computed.column(col).combine_chunks().take(take).cast(columns[col])
        table = _append(table, col, values)
    return table
