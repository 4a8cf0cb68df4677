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

import importlib.util
import os
from pathlib import Path
from typing import Any

from curation.config import Config, ConfigError, KeyPath, Parsed, parse, read_config
from curation.core.storage import StorageError, is_url
from curation.rundir import RunDir
from curation.sources import check_input
from curation.stages import STAGES, Stage, build_stages, manifest_columns, param_problems_of

Problem = tuple[KeyPath, str]


def load_checked_config(
    path: str | os.PathLike, *, overrides: dict[str, Any] | None = None, limit: int | None = None
) -> Config:
    """Read, type-check and check a config file against the world. Raises ConfigError listing every problem.

    `limit` is the `curate run --limit` the config will run with (not part of the fingerprint: a
    larger limit later extends the run).
    """
    return _checked(read_config(path, stages=STAGES, overrides=overrides), limit)


def parse_checked_config(
    text: str, *, source: str = "<string>", overrides: dict[str, Any] | None = None, limit: int | None = None
) -> Config:
    """`load_checked_config` of a string."""
    return _checked(parse(text, stages=STAGES, source=source, overrides=overrides), limit)


def _checked(parsed: Parsed, limit: int | None) -> Config:
    errors = list(parsed.errors)
    cfg = parsed.config
    if cfg is not None:
        # A config that did not parse (a stage name typo) differs from the run's for that reason alone:
        # comparing it with the output's run would add a second, misleading error.
        found = check_config(cfg, limit=limit, compare_run=not errors)
        errors += [cfg.problem(key, msg) for key, msg in found]
    errors = list(dict.fromkeys(errors))  # a range problem is found by parsing and by check_config
    if errors:
        raise ConfigError(errors, parsed.source)
    assert cfg is not None
    return cfg


def check_config(config: Config, *, limit: int | None = None, compare_run: bool = True) -> list[Problem]:
    """Problems visible before any work starts: input, output, stage set-up, rules between stages."""
    problems: list[Problem] = list(check_input(config.input, manifest_columns()))
    problems += _check_shared_params(config)
    problems += _check_image_order(config)
    problems += param_problems_of(config)
    stages = build_stages(config, checked=False)
    if config.runner.type == "local":
        problems += _check_local_gpus(config, stages)
    else:  # a cluster nobody can join is found now, not after the run's first files are written
        from curation.core.cluster import address_problem

        if problem := address_problem(config.runner.address):
            problems.append((("runner", "address"), problem))
    stage_problems: list[Problem] = []
    for spec, stage in zip(config.stages, stages):
        missing = [m for m in stage.packages if importlib.util.find_spec(m) is None]
        if missing:  # check() may need them; find_spec, not import: validation stays instant
            hints = dict.fromkeys(stage.packages[m] for m in missing)
            stage_problems.append(
                (spec.key_path, f"{spec.name} needs {' and '.join(missing)}: {'; '.join(hints)}")
            )
            continue
        stage_problems += [(spec.key_path, msg) for msg in stage.check()]
    # The run's fingerprint hashes the stages' model files, which exist only when the stages check out.
    problems += _check_output(config, limit, None if stage_problems or not compare_run else stages)
    return problems + stage_problems


def _check_shared_params(config: Config) -> list[Problem]:
    """Stages writing the same columns compute them once, so their `shared_params` must agree."""
    problems: list[Problem] = []
    groups: dict[tuple[str, ...], list] = {}
    for spec in config.stages:
        cls = STAGES[spec.name]
        if cls.shared_params:
            groups.setdefault(tuple(cls.columns), []).append(spec)
    for specs in groups.values():
        keys = STAGES[specs[0].name].shared_params
        if len({tuple(getattr(s.params, k) for k in keys) for s in specs}) > 1:
            names = " and ".join(s.name for s in specs)
            problems.append(
                (specs[-1].key_path, f"{names} share one computation: set {', '.join(keys)} identically")
            )
    return problems


def _check_image_order(config: Config) -> list[Problem]:
    """URL input has no images until a stage provides them (download); image inputs bring their own."""
    if config.input.format != "parquet":
        return [
            (
                spec.key_path,
                f"{config.input.format} input already has its images: remove the {spec.name} stage",
            )
            for spec in config.stages
            if STAGES[spec.name].provides_images
        ]
    problems: list[Problem] = []
    have_images = False
    for spec in config.stages:
        cls = STAGES[spec.name]
        if cls.needs_images and not have_images:
            problems.append((spec.key_path, f"{spec.name} needs images: put it after the download stage"))
        have_images = have_images or cls.provides_images
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
        try:
            run = RunDir(output, config.storage_options)
            run.store.check()
        except StorageError as e:
            return [(("output",), str(e))]
        if stages is None:
            return []
        conflict = run.conflict(*config.run_fingerprint(stages))
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
    conflict = RunDir(output).conflict(*config.run_fingerprint(stages))
    return [(("output",), conflict)] if conflict else []
