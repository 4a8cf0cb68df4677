"""Typed parameters declared once, and the one YAML reader of every curate config.

A config section is a dataclass; each field's type says what it holds and, when a value has a range,
`param(default, ge=..., gt=..., le=..., lt=...)` says it on the field itself. `build` turns a YAML
mapping into the dataclass and enforces both: types, finiteness (no float is ever NaN or infinite)
and ranges, each problem worded with its key path and YAML line. `param_problems` applies the same
declarations to an instance built in code, so a library caller cannot skip them.

`read_yaml_mapping` is the reader of pipeline, training and mining configs. It accepts numbers as users
type them (`1e-3`, which YAML 1.1 reads as a string) and refuses aliases (`*name`): expanding them costs
time and memory exponential in a few hundred bytes of text ("billion laughs"), and a recursive anchor
never ends. This module imports no stage: reading a config is cheap.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

KeyPath = tuple[str | int, ...]
Report = Callable[[KeyPath, str], None]

__all__ = [
    "ConfigError",
    "KeyPath",
    "YamlMapping",
    "build",
    "describe",
    "param",
    "param_problems",
    "parse_value",
    "read_yaml_mapping",
]


class ConfigError(Exception):
    """One or more problems with a config; `errors` holds one message each."""

    def __init__(self, errors: list[str], source: str | None = None) -> None:
        self.errors = errors
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + f"{len(errors)} problem(s):\n" + "\n".join(f"  - {e}" for e in errors))


# --------------------------------------------------------------------------- declarations

Bound = float | str  # a number, or the name of a sibling field ("min_words")


@dataclass(frozen=True)
class Range:
    """The range of one parameter; a str bound names another field of the same section."""

    ge: Bound | None = None
    gt: Bound | None = None
    le: Bound | None = None
    lt: Bound | None = None
    # Appended to the message: what the value means ("1 = no shuffling").
    hint: str | None = None


def param(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    ge: Bound | None = None,
    gt: Bound | None = None,
    le: Bound | None = None,
    lt: Bound | None = None,
    hint: str | None = None,
) -> Any:
    """A dataclass field with its range: `lr: float = param(5e-4, gt=0)`. None is never range-checked."""
    metadata = {"range": Range(ge, gt, le, lt, hint)}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


_OPS: tuple[tuple[str, str, Callable[[float, float], bool]], ...] = (
    ("ge", ">=", lambda v, b: v >= b),
    ("gt", ">", lambda v, b: v > b),
    ("le", "<=", lambda v, b: v <= b),
    ("lt", "<", lambda v, b: v < b),
)


def param_problems(obj: Any) -> list[tuple[str, str]]:
    """(field, problem) for every value of dataclass instance `obj` outside its declared range, or not finite."""
    found = {}
    for f in dataclasses.fields(obj):
        problem = _value_problem(obj, f, getattr(obj, f.name))
        if problem:
            found[f.name] = (problem, _sibling_bounds(f))
    # A value judged against a sibling that is itself wrong says nothing new: report the sibling only.
    return [(name, problem) for name, (problem, siblings) in found.items() if not siblings & found.keys()]


def _sibling_bounds(f: dataclasses.Field) -> set[str]:
    rng: Range | None = f.metadata.get("range")
    return {b for b in (rng.ge, rng.gt, rng.le, rng.lt) if isinstance(b, str)} if rng else set()


def _value_problem(obj: Any, f: dataclasses.Field, value: Any) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
        return "every item must be a finite number"
    rng: Range | None = f.metadata.get("range")
    if rng is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low = [b for b in (("ge", rng.ge), ("gt", rng.gt)) if b[1] is not None]
    high = [b for b in (("le", rng.le), ("lt", rng.lt)) if b[1] is not None]
    failed = False
    for name, bound in (*low, *high):
        limit = getattr(obj, bound) if isinstance(bound, str) else bound
        if limit is None or not isinstance(limit, (int, float)):
            continue
        check = next(c for n, _, c in _OPS if n == name)
        failed = failed or not check(value, limit)
    if not failed:
        return None
    parts = []
    for name, bound in (*low, *high):
        sym = next(s for n, s, _ in _OPS if n == name)
        shown = f"{bound} ({getattr(obj, bound)})" if isinstance(bound, str) else _num(bound)
        parts.append(f"{sym} {shown}")
    hint = f" ({rng.hint})" if rng.hint else ""
    return f"must be {' and '.join(parts)}, got {_num(value)}{hint}"


def _num(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() and abs(x) < 1e15 else str(x)


# --------------------------------------------------------------------------- building


def build(cls: type, raw: Any, key: KeyPath, err: Report) -> Any:
    """Dataclass `cls` from a mapping, reporting unknown, missing, mistyped and out-of-range keys;
    None when a key is missing or mistyped."""
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
    if not ok:
        return None
    obj = cls(**kwargs)
    # Reported, yet the section is returned: its types are right, so checks of the world still run
    # and every problem comes in one pass (a config with errors is never handed out).
    for name, problem in param_problems(obj):
        err((*key, name), problem)
    return obj


def _coerce(value: Any, tp: Any) -> tuple[Any, str | None]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            v, p = _coerce(value, arm)
            if p is None:
                return v, None
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
            try:
                return float(value), None
            except OverflowError:
                return None, f"must be a finite number, got {value}"
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


# --------------------------------------------------------------------------- YAML


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a number and refuses aliases."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"aliases (*{event.anchor}) are not accepted in curate configs: write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


# YAML 1.1 wants a dot and a signed exponent (`1.0e-3`); Python, JSON and YAML 1.2 do not (`1e-3`, `2.0e3`).
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load(text: str) -> tuple[Any, yaml.Node | None]:
    """(data, node) of a YAML document, parsed once; YAMLError on bad text, aliases included."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    finally:
        loader.dispose()


def parse_value(text: str) -> Any:
    """A `--set KEY=VALUE` value, read as the config files are (`1e-3` is a number)."""
    try:
        return _load(text)[0]
    except RecursionError:
        raise ConfigError([f"--set value nested too deeply: {text[:40]!r}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"--set value is not YAML: {getattr(e, 'problem', None) or e}"]) from None


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
        data, node = _load(text)
    except RecursionError:
        raise ConfigError(["malformed YAML: nested too deeply"], source) from None
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


def _line_index(node: yaml.Node | None) -> dict[KeyPath, int]:
    """YAML line of each key path; linear in the text, since aliases are refused."""
    out: dict[KeyPath, int] = {}
    stack: list[tuple[yaml.Node, KeyPath]] = [(node, ())] if node is not None else []
    while stack:
        n, key = stack.pop()
        out.setdefault(key, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                kk = (*key, k.value if isinstance(k, yaml.ScalarNode) else str(k.start_mark))
                out[kk] = k.start_mark.line + 1
                stack.append((v, kk))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend((v, (*key, i)) for i, v in enumerate(n.value))
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
