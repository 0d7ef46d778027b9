"""Building typed dataclasses from plain data (YAML files, ``--set`` overrides), with errors that name the key.

Every value is checked against the dataclass field's type; unknown keys are rejected with the nearest valid key, and
errors name the file and the line of the offending key when the value came from a YAML file. Used by the run config
(``tunelab.config``), the method configs, task YAMLs, suites, LR searches and sweep specs.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from tunelab.errors import ConfigError, suggest

# --------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks and helpful errors
# --------------------------------------------------------------------------------------------------------------


class Lines:
    """Maps dotted keys to 'file:line' for messages, from the YAML node tree."""

    def __init__(self, source: str = "", lines: dict[str, int] | None = None) -> None:
        self.source = source
        self.lines = lines or {}

    def where(self, key: str) -> str:
        if key in self.lines:
            return f"{self.source}:{self.lines[key]}: "
        return f"{self.source}: " if self.source else ""


def _yaml_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            out.update(_yaml_lines(value_node, key + "."))
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, lines: Lines) -> Any:
    """Check/convert ``value`` to type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, key, lines)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{lines.where(key)}'{key}' got {value!r}; valid values: {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{lines.where(key)}'{key}' got {value!r}, expected a list")
        return [_convert(v, args[0] if args else Any, f"{key}[{i}]", lines) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{lines.where(key)}'{key}' got {value!r}, expected a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, lines)
    return _convert_scalar(value, tp, key, lines)


def _convert_union(value: Any, tp: Any, key: str, lines: Lines) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1 and dataclasses.is_dataclass(options[0]):  # an optional section: keep its own messages
        return build(options[0], value, key, lines)
    for arg in (a for a in args if a is not type(None)):
        try:
            return _convert(value, arg, key, lines)
        except ConfigError:
            continue
    raise ConfigError(f"{lines.where(key)}'{key}' got {value!r}, expected {_type_name(tp)}")


def _convert_scalar(value: Any, tp: Any, key: str, lines: Lines) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{lines.where(key)}'{key}' got {value!r}, expected {_type_name(tp)}")


def build(cls: type, data: Any, prefix: str = "", lines: Lines | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are errors with the nearest valid key."""
    lines = lines or Lines()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{lines.where(prefix)}'{prefix or 'config'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            where = f"section '{prefix}'" if prefix else "the top level"
            raise ConfigError(f"{lines.where(full)}unknown key '{key}' in {where}.{suggest(str(key), names)}")
        kwargs[key] = _convert(value, hints[key], full, lines)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{lines.where(prefix)}{e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{lines.where(prefix)}invalid '{prefix or 'config'}': {e}") from None


# --------------------------------------------------------------------------------------------------------------
# YAML and overrides
# --------------------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 1e-4); the value is parsed as YAML (safely)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (e.g. train.lr=1e-4), got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a nested mapping (returns the same mapping)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], Lines]:
    """Load a YAML mapping safely, with the line of every key for error messages."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, method, data, train)")
    return data, Lines(str(path), _yaml_lines(node) if node is not None else {})
