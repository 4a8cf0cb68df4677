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
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

KeyPath = tuple[str | int, ...]


class ConfigError(Exception):
    """One or more problems with a config; `errors` holds one message each."""

    def __init__(self, errors: list[str], source: str | None = None) -> None:
        self.errors = errors
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + f"{len(errors)} problem(s):\n" + "\n".join(f"  - {e}" for e in errors))


@dataclass
class InputConfig:
    """Where the pairs come from."""

    path: str | list[str]
    format: Literal["parquet", "webdataset", "image_folder"] = "parquet"
    url_column: str = "url"
    caption_column: str = "caption"
    rows_per_shard: int = 100_000
    # Input columns to carry into the manifest; null carries all of them.
    columns: list[str] | None = None
    # webdataset and image_folder inputs: a tar member or file declaring more bytes is refused unread.
    max_member_bytes: int = 64 * 2**20


@dataclass
class RunnerConfig:
    """How the work is executed. Does not change results, so it is not hashed."""

    type: Literal["local", "ray"] = "local"
    workers: int | Literal["auto"] = "auto"
    # Rows read from a shard and pushed through all stages at once; bounds memory.
    batch_rows: int = 10_000
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
        return {
            "input": inp,
            "stages": [{s.name: dataclasses.asdict(s.params)} for s in self.stages],
        }

    def run_fingerprint(
        self, limit: int | None, stage_fingerprints: dict[str, dict[str, Any]] | None = None
    ) -> tuple[dict[str, Any], str]:
        """(fingerprint, hash) stored in run.json: a run with another hash would write other results.

        `stage_fingerprints` ({stage: Stage.fingerprint()}, non-empty ones only) adds what the params
        cannot show: the contents of the model files a stage loads.
        """
        fingerprint = {**self.result_fingerprint(), "limit": limit}
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


@dataclass
class YamlMapping:
    """A config file's top-level mapping, the line of each key, and the problems found so far."""

    data: dict[str, Any]
    lines: dict[KeyPath, int]
    errors: list[str] = field(default_factory=list)

    def err(self, key: KeyPath, msg: str) -> None:
        self.errors.append(describe(self.lines, key, msg))


def read_yaml_mapping(
    text: str, source: str, keys: Sequence[str], overrides: dict[str, Any] | None = None
) -> YamlMapping:
    """YAML text -> its mapping with `overrides` (dotted keys) applied and unknown top-level keys
    reported; raises ConfigError for text that is not YAML or not a mapping. Every config of the
    project (pipeline, training, mining) is read by this, so their errors read alike."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"malformed YAML at {where}{problem}"], source) from None
    if not isinstance(data, dict):
        raise ConfigError([f"the config must be a YAML mapping with keys {', '.join(keys)}"], source)
    doc = YamlMapping(data, _line_index(node))
    for key, value in (overrides or {}).items():
        _set_path(data, key, value)
    for k in data:
        if k not in keys:
            doc.err((k,), f"unknown key; expected one of {sorted(keys)}")
    return doc


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

    inp = build_dataclass(InputConfig, data.get("input"), ("input",), err) if "input" in data else None
    runner = build_dataclass(RunnerConfig, data.get("runner", {}) or {}, ("runner",), err)
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
        _range_checks(cfg, err)
    return Parsed(cfg, errors, source)


def _range_checks(cfg: Config, err) -> None:
    """Values that are wrong on their own, whatever the machine."""
    if cfg.input.rows_per_shard < 1:
        err(("input", "rows_per_shard"), "must be >= 1")
    if cfg.input.max_member_bytes < 1:
        err(("input", "max_member_bytes"), "must be >= 1")
    if cfg.runner.batch_rows < 1:
        err(("runner", "batch_rows"), "must be >= 1")
    if isinstance(cfg.runner.workers, int) and cfg.runner.workers < 1:
        err(("runner", "workers"), "must be >= 1 or 'auto'")
    if not cfg.stages:
        err(("stages",), "no stages: add at least one, e.g. `- caption_complexity: {min: 2}`")
    seen = set()
    for spec in cfg.stages:
        if spec.name in seen:
            err(spec.key_path, f"stage {spec.name!r} appears twice")
        seen.add(spec.name)


def _build_stages(raw: Any, err) -> list[StageSpec]:
    # Imported here: reading a training or mining config must not import every stage module.
    from curation.stages import STAGES

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
        if name not in STAGES:
            err(key, f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
            continue
        built = build_dataclass(STAGES[name].Params, params or {}, (*key, name), err)
        if built is not None:
            specs.append(StageSpec(name=name, params=built, key_path=(*key, name)))
    return specs


# --------------------------------------------------------------------------- typing


def build_dataclass(cls: type, raw: Any, key: KeyPath, err) -> Any:
    """Instantiate dataclass `cls` from a mapping, reporting unknown/missing/mistyped keys."""
    if not isinstance(raw, dict):
        err(key, f"expected a mapping, got {type(raw).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    ok = True
    for k in raw:
        if k not in fields:
            err((*key, k), f"unknown key; expected one of {sorted(fields)}")
            ok = False
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            value, problem = _coerce(raw[name], hints[name])
            if problem:
                err((*key, name), problem)
                ok = False
            else:
                kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            err((*key, name), "missing required key")
            ok = False
    return cls(**kwargs) if ok else None


def _coerce(value: Any, tp: Any) -> tuple[Any, str | None]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        problems = []
        for arm in typing.get_args(tp):
            v, p = _coerce(value, arm)
            if p is None:
                return v, None
            problems.append(p)
        return None, f"expected {_type_name(tp)}, got {value!r}"
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value, None
        return None, f"expected one of {list(choices)}, got {value!r}"
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            return None, f"expected a list, got {type(value).__name__}"
        out = []
        for v in value:
            cv, p = _coerce(v, item_tp)
            if p:
                return None, f"list item: {p}"
            out.append(cv)
        return out, None
    if tp is type(None):
        return (None, None) if value is None else (None, "expected null")
    if tp is bool:
        return (value, None) if isinstance(value, bool) else (None, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        return None, f"expected an integer, got {value!r}"
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        return None, f"expected a number, got {value!r}"
    if tp is str:
        return (value, None) if isinstance(value, str) else (None, f"expected a string, got {value!r}")
    if tp is Any:
        return value, None
    return None, f"unsupported type {tp}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true/false",
        type(None): "null",
    }.get(tp, str(tp))


# --------------------------------------------------------------------------- helpers


def _line_index(node: yaml.Node | None) -> dict[KeyPath, int]:
    out: dict[KeyPath, int] = {}

    def walk(n: yaml.Node, key: KeyPath) -> None:
        out[key] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                kk = (*key, k.value)
                walk(v, kk)
                out[kk] = k.start_mark.line + 1
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, (*key, i))

    if node is not None:
        walk(node, ())
    return out


def describe(lines: dict[KeyPath, int], key: KeyPath, msg: str) -> str:
    """`input.path (line 3): msg`: how every config problem is worded."""
    line = _closest_line(lines, key)
    where = f" (line {line})" if line else ""
    return f"{_fmt(key) or '<top>'}{where}: {msg}"


def _closest_line(lines: dict[KeyPath, int], key: KeyPath) -> int | None:
    while key:
        if key in lines:
            return lines[key]
        key = key[:-1]
    return None


def _fmt(key: KeyPath) -> str:
    out = ""
    for k in key:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        data = data.setdefault(p, {}) if isinstance(data.get(p), dict) or p not in data else data[p]
    data[parts[-1]] = value
