"""Stage registry: the names usable under `stages:` in a config.

Importing a stage module must stay cheap (models load in `Stage.setup`), so the
registry can be built by `curate validate` without loading spaCy or torch.
Stage modules never import the config: `curation.config` reads each stage's
`Params` from here (importing this registry only for pipeline configs), and
`curation.validation` checks what each stage declares (`packages`, `needs_images`)
and calls its `check()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from curation.core.params import ConfigError, param_problems
from curation.core.storage import is_url
from curation.schema import IMAGE_COLUMNS, READ_COLUMNS
from curation.stages.base import Resources, Stage, StageContext, apply_stage
from curation.stages.caption import CaptionAction, CaptionComplexity
from curation.stages.caption_language import CaptionLanguage
from curation.stages.caption_length import CaptionLength
from curation.stages.clip_score import ClipScore
from curation.stages.concepts import Concepts
from curation.stages.download import Download
from curation.stages.image_size import ImageSize
from curation.stages.phash import Phash
from curation.stages.text_spotting import TextSpotting

if TYPE_CHECKING:  # annotations only: the config imports this registry, not the other way round
    from curation.config import Config

# In this order `curate stats` and `curate report` list the columns.
STAGES: dict[str, type[Stage]] = {
    cls.name: cls
    for cls in (
        CaptionComplexity,
        CaptionAction,
        Download,
        TextSpotting,
        ClipScore,
        CaptionLength,
        CaptionLanguage,
        ImageSize,
        Phash,
        Concepts,
    )
}

__all__ = [
    "STAGES",
    "Resources",
    "Stage",
    "StageContext",
    "apply_stage",
    "build_stages",
    "manifest_bins",
    "manifest_columns",
    "model_fingerprints",
    "param_problems_of",
]


def manifest_columns() -> dict[str, pa.DataType]:
    """Every column the registered stages, and the inputs that bring their images, may add to a manifest,
    with its type: what `curate query`, `stats` and `report` look up. Stages that share a column
    declare one type for it (tested)."""
    columns: dict[str, pa.DataType] = {}
    for cls in STAGES.values():
        columns.update(cls.columns)
    return {**columns, **IMAGE_COLUMNS, **READ_COLUMNS}


def manifest_bins() -> dict[str, tuple[float, float, float]]:
    """The fixed histogram bins (lo, hi, step) of every numeric column the registered stages declare:
    what the per-shard summaries count (`curation.stats`). Stages that share a column share its bins."""
    bins: dict[str, tuple[float, float, float]] = {}
    for cls in STAGES.values():
        bins.update(cls.bins)
    return bins


def param_problems_of(config: Config) -> list[tuple[tuple, str]]:
    """(key path, problem) for every stage param outside its declared range."""
    return [
        ((*spec.key_path, name), msg) for spec in config.stages for name, msg in param_problems(spec.params)
    ]


def build_stages(config: Config, *, checked: bool = True) -> list[Stage]:
    """The config's stages. Raises ConfigError for params outside their declared ranges, so a config
    built in code (not read from YAML) is held to the same declarations; `checked=False` is for
    `curation.validation`, which reports them with every other problem."""
    problems = param_problems_of(config) if checked else []
    if problems:
        raise ConfigError([config.problem(k, m) for k, m in problems], config.source)
    output = config.output if is_url(config.output) else Path(config.output)
    context = StageContext(output_dir=output, storage_options=config.storage_options)
    return [STAGES[spec.name](spec.params, context) for spec in config.stages]


def model_fingerprints(stages: list[Stage]) -> dict[str, dict]:
    """{stage: Stage.fingerprint()} of the stages that load model files, for the run's config hash.

    Only those stages add a key, so the hash of every other run stays what it always was.
    """
    return {stage.name: fp for stage in stages if (fp := stage.fingerprint())}
