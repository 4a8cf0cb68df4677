"""Stage registry: the names usable under `stages:` in a config.

Importing a stage module must stay cheap (models load in `Stage.setup`), so the
registry can be built by `curate validate` without loading spaCy or torch.
Stage modules never import the config: `curation.config` reads each stage's
`Params` from here, and `curation.validation` calls each stage's `check()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from curation.stages.base import Resources, Stage, StageContext, apply_stage
from curation.stages.caption import CaptionAction, CaptionComplexity
from curation.stages.caption_language import CaptionLanguage
from curation.stages.caption_length import CaptionLength
from curation.stages.clip_score import ClipScore
from curation.stages.download import Download
from curation.stages.image_size import ImageSize
from curation.stages.phash import Phash
from curation.stages.text_spotting import TextSpotting

if TYPE_CHECKING:  # annotations only: the config imports this registry, not the other way round
    from curation.config import Config

STAGES: dict[str, type[Stage]] = {
    cls.name: cls
    for cls in (
        CaptionComplexity,
        CaptionAction,
        Download,
        TextSpotting,
        CaptionLength,
        CaptionLanguage,
        ImageSize,
        Phash,
        ClipScore,
    )
}

__all__ = ["STAGES", "Resources", "Stage", "StageContext", "apply_stage", "build_stages"]


def build_stages(config: Config) -> list[Stage]:
    context = StageContext(output_dir=Path(config.output))
    return [STAGES[spec.name](spec.params, context) for spec in config.stages]
