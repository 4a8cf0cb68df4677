"""A typed config checked against the world, before any work starts.

`curation.config` reads the text (keys, types, ranges). This module checks what
needs the machine: the input files and their columns, the output directory
(writable, and not holding a run made with another config), GPUs for the local
runner, each stage's own `check()` (installed models, packages), and the rules
between stages. Every problem, from either module, is reported in one pass,
each with its key path and YAML line.

The CLI calls `load_checked_config`; the engine trusts the config it is given
(and still refuses, under its lock, an output that holds another run).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from curation.config import Config, ConfigError, KeyPath, Parsed, parse, read_config
from curation.core.storage import StorageError, is_url
from curation.manifest import RunDir
from curation.sources import check_input
from curation.stages import STAGES, Stage, build_stages, model_fingerprints
from curation.stages.caption import CAPTION_COLUMNS

Problem = tuple[KeyPath, str]


def load_checked_config(
    path: str | os.PathLike, *, overrides: dict[str, Any] | None = None, limit: int | None = None
) -> Config:
    """Read, type-check and check a config file against the world. Raises ConfigError listing every problem.

    `limit` is the `curate run --limit` the config will run with (it is part of the run record).
    """
    return _checked(read_config(path, overrides=overrides), limit)


def parse_checked_config(
    text: str, *, source: str = "<string>", overrides: dict[str, Any] | None = None, limit: int | None = None
) -> Config:
    """`load_checked_config` of a string."""
    return _checked(parse(text, source=source, overrides=overrides), limit)


def _checked(parsed: Parsed, limit: int | None) -> Config:
    errors = list(parsed.errors)
    cfg = parsed.config
    if cfg is not None:
        errors += [cfg.problem(key, msg) for key, msg in check_config(cfg, limit=limit)]
    if errors:
        raise ConfigError(errors, parsed.source)
    assert cfg is not None
    return cfg


def check_config(config: Config, *, limit: int | None = None) -> list[Problem]:
    """Problems visible before any work starts: input, output, stage set-up, rules between stages."""
    problems: list[Problem] = list(check_input(config.input))
    problems += _check_shared_parse(config)
    problems += _check_image_order(config)
    stages = build_stages(config)
    if config.runner.type == "local":
        problems += _check_local_gpus(config, stages)
    stage_problems: list[Problem] = []
    for spec, stage in zip(config.stages, stages):
        stage_problems += [(spec.key_path, msg) for msg in stage.check()]
        for f in dataclasses.fields(spec.params):
            v = getattr(spec.params, f.name)
            if f.name in ("batch_size", "max_chars") and isinstance(v, int) and v < 1:
                stage_problems.append(((*spec.key_path, f.name), "must be >= 1"))
    # The run's fingerprint hashes the stages' model files, which exist only when the stages check out.
    problems += _check_output(config, limit, None if stage_problems else stages)
    return problems + stage_problems


def _check_shared_parse(config: Config) -> list[Problem]:
    """Both caption stages use one spaCy parse, so they must ask for the same one."""
    specs = [s for s in config.stages if STAGES[s.name].columns == CAPTION_COLUMNS]
    shared = {(s.params.model, s.params.max_chars, s.params.batch_size) for s in specs}
    if len(shared) > 1:
        return [
            (
                specs[-1].key_path,
                "caption stages share one parse: set model, max_chars and batch_size identically",
            )
        ]
    return []


def _check_image_order(config: Config) -> list[Problem]:
    """URL input has no images until `download`; image inputs bring their own and need no download."""
    if config.input.format != "parquet":
        return [
            (spec.key_path, f"{config.input.format} input already has its images: remove the download stage")
            for spec in config.stages
            if spec.name == "download"
        ]
    problems: list[Problem] = []
    downloaded = False
    for spec in config.stages:
        downloaded = downloaded or spec.name == "download"
        if STAGES[spec.name].needs_images and not downloaded:
            problems.append((spec.key_path, f"{spec.name} needs images: put it after the download stage"))
    return problems


def _check_local_gpus(config: Config, stages: list[Stage]) -> list[Problem]:
    """The local runner runs every stage here, so a stage that needs a GPU needs one on this machine."""
    needy = [spec for spec, stage in zip(config.stages, stages) if stage.resources.gpus > 0]
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
        for spec in needy
    ]


def _check_output(config: Config, limit: int | None, stages: list[Stage] | None) -> list[Problem]:
    """A writable local directory or a usable store (credentials, bucket), holding no run made with
    another config (checked when `stages` is given: the fingerprint needs their model files)."""
    output = config.output
    if is_url(output):
        if any(spec.name == "download" for spec in config.stages):
            # Its image tars are written as local files beside the manifests (curation/stages/download.py).
            return [
                (("output",), "the download stage needs a local output directory for now (docs/storage.md)")
            ]
        try:
            run = RunDir(output, config.storage_options)
            run.store.check()
        except StorageError as e:
            return [(("output",), str(e))]
        if stages is None:
            return []
        conflict = run.conflict(*config.run_fingerprint(limit, model_fingerprints(stages)))
        return [(("output",), conflict)] if conflict else []
    p = Path(output)
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return [(("output",), f"{p} exists and is not a directory")]
    if not os.access(p, os.W_OK | os.X_OK):
        return [(("output",), f"output directory is not writable: {p} (permission denied)")]
    if stages is None:
        return []
    conflict = RunDir(output).conflict(*config.run_fingerprint(limit, model_fingerprints(stages)))
    return [(("output",), conflict)] if conflict else []
