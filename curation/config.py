"""YAML -> typed config: keys, types and the ranges a value must have on its own.

Every problem is collected and reported together, each with its key path and,
where the YAML has it, the line in the file. What needs the world (input files
and their columns, the output directory, installed models, GPUs) is checked by
`curation.validation`, which reports its problems the same way and in the same
pass; this module only reads the text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from curation.core.params import ConfigError, KeyPath, build, describe, param, read_yaml_mapping

__all__ = [
    "Config",
    "ConfigError",
    "InputConfig",
    "KeyPath",
    "Parsed",
    "RunnerConfig",
    "StageSpec",
    "load_config",
    "parse",
    "parse_config",
    "read_config",
]


@dataclass
class InputConfig:
    """Where the pairs come from."""

    path: str | list[str]
    format: Literal["parquet", "webdataset", "image_folder"] = "parquet"
    url_column: str = "url"
    caption_column: str = "caption"
    rows_per_shard: int = param(100_000, ge=1)
    # Input columns to carry into the manifest; null carries all of them.
    columns: list[str] | None = None
    # webdataset and image_folder inputs: a tar member or file declaring more bytes is refused unread.
    max_member_bytes: int = param(64 * 2**20, ge=1)


@dataclass
class RunnerConfig:
    """How the work is executed. Does not change results, so it is not hashed."""

    type: Literal["local", "ray"] = "local"
    workers: int | Literal["auto"] = param("auto", ge=1)
    # Rows read from a shard and pushed through all stages at once; bounds memory.
    batch_rows: int = param(10_000, ge=1)
    progress: bool = True
    # Ray only: null starts a local instance; "auto" or "ray://host:10001" joins a cluster.
    address: str | None = None


@dataclass
class StageSpec:
    name: str
    params: Any
    key_path: KeyPath = ()


@dataclass
class Config:
    input: InputConfig
    output: str
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    stages: list[StageSpec] = field(default_factory=list)
    source: str | None = None
    # fsspec options for an `output` URL (endpoint_url, ...). Never part of a fingerprint or run.json:
    # it may hold credentials, and where a run is written does not change what it writes.
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # YAML line of each key path, so later checks (curation.validation) can name it too.
    lines: dict[KeyPath, int] = field(default_factory=dict, repr=False, compare=False)

    def result_fingerprint(self) -> dict[str, Any]:
        """Everything that changes what a run writes (not how fast or where)."""
        inp = dataclasses.asdict(self.input)
        inp.pop("path")  # the shard plan pins the files themselves
        from curation.stages import STAGES

        stages = []
        for s in self.stages:
            params = dataclasses.asdict(s.params)
            for key in STAGES[s.name].model_file_params:  # their contents are in the stage's fingerprint
                params.pop(key, None)
            stages.append({s.name: params})
        return {"input": inp, "stages": stages}

    def run_fingerprint(
        self, stage_fingerprints: dict[str, dict[str, Any]] | None = None
    ) -> tuple[dict[str, Any], str]:
        """(fingerprint, hash) stored in run.json: a run with another hash would write other results.

        `stage_fingerprints` ({stage: Stage.fingerprint()}, non-empty ones only) adds what the params
        cannot show: the contents of the model files a stage loads. `--limit` is not part of it: it
        says how many rows to do, not what a row's result is, so a trial run can be extended.
        """
        fingerprint = self.result_fingerprint()
        if stage_fingerprints:
            fingerprint["stage_fingerprints"] = stage_fingerprints
        blob = json.dumps(fingerprint, sort_keys=True, default=str).encode()
        return fingerprint, hashlib.sha256(blob).hexdigest()[:16]

    def problem(self, key: KeyPath, msg: str) -> str:
        """A problem at `key`, worded as every config error is: `input.path (line 3): msg`."""
        return describe(self.lines, key, msg)


# --------------------------------------------------------------------------- loading


@dataclass
class Parsed:
    """What reading a config gave: the config (None when too broken to check further) and its problems."""

    config: Config | None
    errors: list[str]
    source: str


def load_config(path: str | os.PathLike, *, overrides: dict[str, Any] | None = None) -> Config:
    """Read and type-check a config file. Raises ConfigError listing every problem.

    Relative paths inside the config are relative to the working directory, as
    with any command-line tool. `overrides` maps dotted keys ("runner.type") to values.
    Use `curation.validation.load_checked_config` to also check it against the world.
    """
    return _raise_if_errors(read_config(path, overrides=overrides))


def parse_config(
    text: str,
    *,
    source: str = "<string>",
    overrides: dict[str, Any] | None = None,
) -> Config:
    """`load_config` of a string."""
    return _raise_if_errors(parse(text, source=source, overrides=overrides))


def read_config(path: str | os.PathLike, *, overrides: dict[str, Any] | None = None) -> Parsed:
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError([f"cannot read config: {e.strerror}"], source) from None
    return parse(text, source=source, overrides=overrides)


def _raise_if_errors(parsed: Parsed) -> Config:
    if parsed.errors:
        raise ConfigError(parsed.errors, parsed.source)
    assert parsed.config is not None
    return parsed.config


def parse(text: str, *, source: str = "<string>", overrides: dict[str, Any] | None = None) -> Parsed:
    """Type-check a config, collecting every problem; raises ConfigError only for unreadable YAML."""
    doc = read_yaml_mapping(
        text, source, ("input", "output", "runner", "stages", "storage_options"), overrides
    )
    data, lines, errors, err = doc.data, doc.lines, doc.errors, doc.err
    if "input" not in data:
        err(("input",), "missing (where the pairs come from)")
    if "output" not in data:
        err(("output",), "missing (the run's output directory)")

    inp = build(InputConfig, data.get("input"), ("input",), err) if "input" in data else None
    runner = build(RunnerConfig, data.get("runner", {}) or {}, ("runner",), err)
    output = data.get("output")
    if output is not None and not isinstance(output, str):
        err(("output",), f"expected a path string, got {type(output).__name__}")
        output = None
    stages = _build_stages(data.get("stages"), err)
    storage_options = data.get("storage_options") or {}
    if not isinstance(storage_options, dict) or not all(isinstance(k, str) for k in storage_options):
        err(("storage_options",), "expected a mapping of fsspec options (endpoint_url: ..., ...)")
        storage_options = {}

    cfg = None
    if inp is not None and output is not None and runner is not None:
        cfg = Config(
            input=inp,
            output=output,
            runner=runner,
            stages=stages,
            source=source,
            lines=lines,
            storage_options=storage_options,
        )
        _stage_list_checks(cfg, err)
    return Parsed(cfg, errors, source)


def _stage_list_checks(cfg: Config, err) -> None:
    """A pipeline has stages, each once (ranges of single values are declared on the params)."""
    if not cfg.stages:
        err(("stages",), "no stages: add at least one, e.g. `- caption_complexity: {min: 2}`")
    seen = set()
    for spec in cfg.stages:
        if spec.name in seen:
            err(spec.key_path, f"stage {spec.name!r} appears twice")
        seen.add(spec.name)


def _build_stages(raw: Any, err) -> list[StageSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        err(("stages",), "expected a list of single-key maps, e.g. `- caption_complexity: {min: 2}`")
        return []
    specs = []
    for i, item in enumerate(raw):
        key: KeyPath = ("stages", i)
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            err(key, "each stage is a single-key map `name: {params}`")
            continue
        ((name, params),) = item.items()
        from curation.stages import STAGES  # only pipeline configs need the stage registry

        if name not in STAGES:
            err(key, f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
            continue
        built = build(STAGES[name].Params, params or {}, (*key, name), err)
        if built is not None:
            specs.append(StageSpec(name=name, params=built, key_path=(*key, name)))
    return specs
