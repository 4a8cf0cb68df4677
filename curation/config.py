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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from curation.core.params import ConfigError, KeyPath, build, describe, param, read_yaml_mapping

__all__ = [
    "Config",
    "ConfigError",
    "FingerprintedStage",
    "InputConfig",
    "KeyPath",
    "Parsed",
    "RunnerConfig",
    "StageRegistry",
    "StageSpec",
    "load_config",
    "parse",
    "parse_config",
    "read_config",
]


class FingerprintedStage(Protocol):
    """What a run's fingerprint needs of a built stage (`curation.stages.Stage`)."""

    name: str
    model_file_params: tuple[str, ...]

    def fingerprint(self) -> dict[str, Any]: ...


# Stage name -> its class (`curation.stages.STAGES`), of which config reading needs `Params`. Passed
# in rather than imported: reading a config (or any reader of InputConfig) loads no stage module.
StageRegistry = Mapping[str, Any]


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

    def run_fingerprint(self, stages: Sequence[FingerprintedStage]) -> tuple[dict[str, Any], str]:
        """(fingerprint, hash) stored in run.json: a run with another hash would write other results.

        Everything that changes what a run writes (not how fast or where). `stages` (the built
        stages of this config) add what the params cannot show: the contents of the model files a
        stage loads (`Stage.fingerprint()`, which replaces those params; only stages that load model
        files add a key, so the hash of every other run stays what it always was). `--limit` is not
        part of it: it says how many rows to do, not what a row's result is, so a trial run can be
        extended.
        """
        inp = dataclasses.asdict(self.input)
        inp.pop("path")  # the shard plan pins the files themselves
        model_params = {stage.name: stage.model_file_params for stage in stages}
        fingerprint: dict[str, Any] = {"input": inp, "stages": []}
        for s in self.stages:
            params = dataclasses.asdict(s.params)
            for key in model_params.get(s.name, ()):  # their contents are in the stage's fingerprint
                params.pop(key, None)
            fingerprint["stages"].append({s.name: params})
        stage_fingerprints = {stage.name: fp for stage in stages if (fp := stage.fingerprint())}
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


def load_config(
    path: str | os.PathLike, *, stages: StageRegistry, overrides: dict[str, Any] | None = None
) -> Config:
    """Read and type-check a config file. Raises ConfigError listing every problem.

    Relative paths inside the config are relative to the working directory, as
    with any command-line tool. `stages` is the registry (`curation.stages.STAGES`); `overrides`
    maps dotted keys ("runner.type") to values.
    Use `curation.validation.load_checked_config` to also check it against the world.
    """
    return _raise_if_errors(read_config(path, stages=stages, overrides=overrides))


def parse_config(
    text: str,
    *,
    stages: StageRegistry,
    source: str = "<string>",
    overrides: dict[str, Any] | None = None,
) -> Config:
    """`load_config` of a string."""
    return _raise_if_errors(parse(text, stages=stages, source=source, overrides=overrides))


def read_config(
    path: str | os.PathLike, *, stages: StageRegistry, overrides: dict[str, Any] | None = None
) -> Parsed:
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError([f"cannot read config: {e.strerror}"], source) from None
    return parse(text, stages=stages, source=source, overrides=overrides)


def _raise_if_errors(parsed: Parsed) -> Config:
    if parsed.errors:
        raise ConfigError(parsed.errors, parsed.source)
    assert parsed.config is not None
    return parsed.config


def parse(
    text: str, *, stages: StageRegistry, source: str = "<string>", overrides: dict[str, Any] | None = None
) -> Parsed:
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
    specs = _build_stages(data.get("stages"), stages, err)
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
            stages=specs,
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


def _build_stages(raw: Any, registry: StageRegistry, err) -> list[StageSpec]:
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
        if name not in registry:
            err(key, f"unknown stage {name!r}; known stages: {', '.join(sorted(registry))}")
            continue
        built = build(registry[name].Params, params or {}, (*key, name), err)
        if built is not None:
            specs.append(StageSpec(name=name, params=built, key_path=(*key, name)))
    return specs
