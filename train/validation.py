"""Training and mining configs checked against the world, before any step.

`train.config` and `train.mining.config` read the text (keys, types, ranges, rules
between keys). This module checks what needs the machine, as `curation.validation`
does for pipelines: the files a config names (model JSONs, weights, vocabulary,
hard pairs, teachers), installed packages, and for training a dry run of what
`curate train` would stop on before its first step (the shards and their sample
counts, the model name, the pretrained weights read weights-only). Problems come
in one pass with the text's, each with its key path and YAML line.

`curate validate` and `curate train` call `load_checked_train_config`; `curate mine`
calls `parse_checked_mine_config`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from curation.core.params import ConfigError, KeyPath, describe
from curation.core.storage import is_url
from curation.models.encoders import MINILM
from curation.models.files import open_clip_config_problem
from train.config import TrainConfig, load_train_config, parse_train_config
from train.mining.config import MineConfig, parse_mine_config

Problem = tuple[KeyPath, str]


def load_checked_train_config(
    path: str | os.PathLike, *, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Read, type-check and check a training config against the world; ConfigError lists every problem."""
    return _dry_run(load_train_config(path, overrides=overrides, checks=train_file_problems))


def parse_checked_train_config(
    text: str, *, source: str = "<string>", overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """`load_checked_train_config` of a string."""
    return _dry_run(parse_train_config(text, source=source, overrides=overrides, checks=train_file_problems))


def parse_checked_mine_config(
    text: str, *, source: str = "<string>", overrides: dict[str, Any] | None = None
) -> MineConfig:
    """Read, type-check and check a mining config against the world; ConfigError lists every problem."""
    return parse_mine_config(text, source=source, overrides=overrides, checks=mine_problems)


def train_file_problems(sections: dict[str, Any]) -> list[Problem]:
    """The files a training config names, for the sections that type-checked (name -> section)."""
    problems: list[Problem] = []
    model, hard, dist = sections.get("model"), sections.get("hard_pairs"), sections.get("distill")
    # A URL is checked when the trainer reads it (before any step).
    if hard is not None and not is_url(hard.path) and not Path(hard.path).is_file():
        problems.append((("hard_pairs", "path"), f"not a file: {hard.path!r} (write it with `curate mine`)"))
    if model is not None and (refused := open_clip_config_problem(model.name)):
        problems.append((("model", "name"), refused))
    if model is not None and model.pretrained is not None and not Path(model.pretrained).is_file():
        problems.append(
            (("model", "pretrained"), f"not a local file: {model.pretrained!r} (nothing is downloaded)")
        )
    if dist is not None and dist.vocabulary is not None and not Path(dist.vocabulary).is_file():
        problems.append((("distill", "vocabulary"), f"not a file: {dist.vocabulary!r}"))
    return problems


def train_problems(cfg: TrainConfig) -> list[Problem]:
    """What `curate train` would stop on before its first step, found without training: every source's
    shards and sample counts, the model name, the pretrained weights (read weights-only)."""
    from curation.models.clip import checkpoint_problems, resolve_model_name
    from train.data import count_source_samples, data_sources

    problems: list[Problem] = []
    key: KeyPath = ("data", "shards") if cfg.data.sources is None else ("data", "sources")
    try:
        sources = data_sources(cfg.data)
    except (FileNotFoundError, ValueError) as e:
        problems.append((key, str(e)))
    else:
        try:
            counted = count_source_samples(sources)
        except (FileNotFoundError, ValueError) as e:
            problems.append((("data", "sizes") if cfg.data.sources is None else key, str(e)))
        else:
            if cfg.train.epochs is not None and counted is None:
                problems.append(
                    (("train", "epochs"), "needs sample counts: put sizes.json beside the shards")
                )
    try:
        resolve_model_name(cfg.model.name)
    except (ValueError, FileNotFoundError) as e:
        problems.append((("model", "name"), str(e).split(". Known:")[0]))
        return problems
    if cfg.model.pretrained is not None:
        found = checkpoint_problems(cfg.model.pretrained, cfg.model.name)
        problems += [(("model", "pretrained"), p) for p in found]
    r = cfg.train
    if r.micro_batch is not None and r.micro_batch < r.batch_size:  # the model's layers say (built on CPU)
        from curation.models.clip import build_model
        from train.model import micro_batch_problem

        try:
            model = build_model(cfg.model.name, device="cpu", lock_image=cfg.model.lock_image).model
        except ValueError as e:
            return [*problems, (("model", "lock_image"), str(e))]
        if problem := micro_batch_problem(model, r.micro_batch, r.batch_size):
            problems.append((("train", "micro_batch"), problem))
    return problems


def mine_problems(cfg: MineConfig) -> list[Problem]:
    """The files and packages a mining config names."""
    e, problems = cfg.encoders, []
    if e.checkpoint is not None and not is_url(e.checkpoint) and not Path(e.checkpoint).is_file():
        # A URL (a `curate train` output_dir on s3://) is read through the storage layer when mining starts.
        problems.append(
            (("encoders", "checkpoint"), f"not a file: {e.checkpoint!r} (nothing is downloaded from a hub)")
        )
    if refused := open_clip_config_problem(e.model):
        problems.append((("encoders", "model"), refused))
    if e.text_model is not None and e.text_model != MINILM and not Path(e.text_model).is_dir():
        problems.append(
            (
                ("encoders", "text_model"),
                f"expected a sentence-transformers folder or {MINILM!r}, got {e.text_model!r}",
            )
        )
    if e.image_teacher is not None:
        from curation.models.teachers import check_teacher

        problems += [
            (("encoders", "image_teacher"), p)
            for p in check_teacher(
                e.image_teacher, e.image_teacher_model, e.image_teacher_checkpoint, e.image_teacher_vocabulary
            )
        ]
    if cfg.mining.method == "faiss" and importlib.util.find_spec("faiss") is None:
        problems.append((("mining", "method"), "faiss is not installed (pip install faiss-cpu)"))
    return problems


def _dry_run(cfg: TrainConfig) -> TrainConfig:
    problems = train_problems(cfg)
    if problems:
        raise ConfigError([describe(cfg.lines, key, msg) for key, msg in problems], cfg.source)
    return cfg
