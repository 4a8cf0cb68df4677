"""Stage registry: the names usable under `stages:` in a config.

Importing a stage module must stay cheap (models load in `Stage.setup`), so the
registry can be built by `curate validate` without loading spaCy or torch.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from curation.stages.base import Resources, Stage, StageContext, apply_stage
from curation.stages.caption import CaptionAction, CaptionComplexity
from curation.stages.concepts import Concepts
from curation.stages.download import Download
from curation.stages.text_spotting import TextSpotting

if TYPE_CHECKING:
    from curation.config import Config

STAGES: dict[str, type[Stage]] = {
    cls.name: cls for cls in (CaptionComplexity, CaptionAction, Download, TextSpotting, Concepts)
}

__all__ = ["STAGES", "Resources", "Stage", "StageContext", "apply_stage", "build_stages", "check_pipeline"]


def build_stages(config: Config) -> list[Stage]:
    from pathlib import Path

    context = StageContext(output_dir=Path(config.output))
    return [STAGES[spec.name](spec.params, context) for spec in config.stages]


def check_pipeline(config: Config) -> list[tuple[tuple, str]]:
    """Problems visible before any work starts: input files and columns, output, stage setup."""
    from curation.sources import check_input

    problems: list[tuple[tuple, str]] = list(check_input(config.input))
    problems += _check_output(config.output)

    caption_specs = [s for s in config.stages if STAGES[s.name].columns == CaptionComplexity.columns]
    shared = {(s.params.model, s.params.max_chars, s.params.batch_size) for s in caption_specs}
    if len(shared) > 1:
        problems.append(
            (
                caption_specs[-1].key_path,
                "caption stages share one parse: set model, max_chars and batch_size identically",
            )
        )
    if config.input.format != "parquet":
        for spec in config.stages:
            if spec.name == "download":
                problems.append(
                    (
                        spec.key_path,
                        f"{config.input.format} input already has its images: remove the download stage",
                    )
                )
    stages = build_stages(config)
    if config.runner.type == "local":
        problems += _check_local_gpus(config, stages)
    seen = set()
    for spec, stage in zip(config.stages, stages):
        if spec.name in seen:
            problems.append((spec.key_path, f"stage {spec.name!r} appears twice"))
        seen.add(spec.name)
        for msg in stage.check():
            problems.append((spec.key_path, msg))
        for f in dataclasses.fields(spec.params):
            v = getattr(spec.params, f.name)
            if f.name in ("batch_size", "max_chars") and isinstance(v, int) and v < 1:
                problems.append(((*spec.key_path, f.name), "must be >= 1"))
    return problems


def _check_local_gpus(config: Config, stages: list[Stage]) -> list[tuple[tuple, str]]:
    """The local runner runs every stage here, so a stage that needs a GPU needs one on this machine."""
    needy = [(spec, stage) for spec, stage in zip(config.stages, stages) if stage.resources.gpus > 0]
    if not needy:
        return []
    import torch  # only when a stage asks for a GPU

    if torch.cuda.is_available():
        return []
    return [
        (
            spec.key_path,
            "needs a CUDA GPU and this machine has none: use device: auto or cpu, "
            "or runner: {type: ray} on a cluster with GPU nodes",
        )
        for spec, _ in needy
    ]


def _check_output(output: str) -> list[tuple[tuple, str]]:
    import os
    from pathlib import Path

    if "://" in output:
        return [(("output",), "output must be a local directory (manifests are written with atomic renames)")]
    p = Path(output)
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return [(("output",), f"{p} exists and is not a directory")]
    if not os.access(p, os.W_OK | os.X_OK):
        return [(("output",), f"output directory is not writable: {p} (permission denied)")]
    return []
