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
from curation.stages.blocklist import HashBlocklist
from curation.stages.caption import CaptionAction, CaptionComplexity
from curation.stages.caption_language import CaptionLanguage
from curation.stages.caption_length import CaptionLength
from curation.stages.clip_score import EMBEDDING_COLUMN, ClipScore, ClipScoreParams, ClipScorer
from curation.stages.concepts import Concepts
from curation.stages.download import Download
from curation.stages.faces import Faces, blur_faces
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
        HashBlocklist,
        Faces,
    )
}

__all__ = [  # besides the registry: what curation modules use of a stage (the rule of tests/test_imports.py)
    "EMBEDDING_COLUMN",
    "STAGES",
    "ClipScoreParams",
    "ClipScorer",
    "Resources",
    "Stage",
    "StageContext",
    "apply_stage",
    "blur_faces",
    "build_stages",
    "manifest_bins",
    "manifest_columns",
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
    stages = [STAGES[spec.name](spec.params, context) for spec in config.stages]
    _screen_downloads(stages, config)
    return stages


def _screen_downloads(stages: list[Stage], config: Config) -> None:
    """A hash_blocklist stage screens the bytes the download stage fetches, before they are written
    (curation/stages/blocklist.py); so it must come first, where its URL lists also spare the fetch."""
    names = [s.name for s in stages]
    blocklist = next((s for s in stages if isinstance(s, HashBlocklist)), None)
    byte_lists = blocklist is not None and any(
        getattr(blocklist.params, k) for k in ("md5", "sha1", "sha256", "pdq")
    )
    if byte_lists and config.input.format == "parquet" and Download.name not in names:
        at = names.index(HashBlocklist.name)
        raise ConfigError(
            [
                config.problem(
                    config.stages[at].key_path,
                    "its md5/sha1/sha256/pdq lists match image bytes, and this pipeline has none: "
                    "add a download stage after it",
                )
            ],
            config.source,
        )
    if HashBlocklist.name in names and Download.name in names:
        if names.index(HashBlocklist.name) > names.index(Download.name):
            at = names.index(HashBlocklist.name)
            raise ConfigError(
                [
                    config.problem(
                        config.stages[at].key_path,
                        "hash_blocklist must come before download, "
                        "which it screens before any image is written",
                    )
                ],
                config.source,
            )
        screen = stages[names.index(HashBlocklist.name)]
        for stage in stages:
            if isinstance(stage, Download):
                stage.screen = screen
