"""Frozen dataclass configs: dict/YAML/JSON in, typed CLI overrides, strict keys.

Every component (tokenizer, de-tokenizer, training run) describes itself with a
frozen dataclass. This module turns plain mappings into those dataclasses and
back, rejecting unknown keys (house rule: unknown config keys raise) and
coercing CLI strings like ``--model.unet.channels=32,64`` to the field's type.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONFIG_NAME = "config.json"


class ConfigError(ValueError):
    """A config mapping does not fit its dataclass (unknown key, bad type)."""


def _resolve_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(tp, value, where: str):
    """Convert ``value`` (from JSON/YAML/CLI) to type ``tp``."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: None given for non-optional field")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, _where=where)
    origin = typing.get_origin(tp)
    if origin in (tuple, list, Sequence):
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip() != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a sequence, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, where) for a, v in zip(args, value))
        inner = args[0] if args else Any
        return type(value)(_coerce(inner, v, where) for v in value) if origin is list else tuple(
            _coerce(inner, v, where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected a bool, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got a bool")
        try:
            out = tp(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from e
        if tp is int and isinstance(value, float) and out != value:
            raise ConfigError(f"{where}: expected an int, got {value!r}")
        return out
    if tp is str:
        return str(value)
    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    return value


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def from_dict(cls: type[T], data: Mapping[str, Any], _where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ConfigError."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{_where}." if _where else ""
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]} for {cls.__name__}; "
            f"valid keys: {sorted(fields)}")
    hints = _resolve_hints(cls)
    kwargs = {}
    for name, value in data.items():
        where = f"{_where}.{name}" if _where else name
        default = _field_default(fields[name])
        if isinstance(value, Mapping) and dataclasses.is_dataclass(default):
            # A partial mapping for a nested config keeps the field's other defaults.
            value = merge(to_dict(default), value)
        kwargs[name] = _coerce(hints[name], value, where)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from e


def to_dict(cfg) -> dict[str, Any]:
    """Dataclass → JSON-friendly dict (tuples become lists)."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``override`` wins."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=3", "c=x"]`` → ``{"a": {"b": "3"}, "c": "x"}`` (strings; typed later).

    Values are parsed as YAML scalars so ``lr=1e-4`` gives a float and
    ``flag=true`` a bool; the dataclass field's type has the last word.
    """
    out: dict[str, Any] = {}
    for item in items:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict,)):
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def replace(cfg: T, **changes) -> T:
    return dataclasses.replace(cfg, **changes)


def save_json(cfg, directory: str | os.PathLike, name: str = CONFIG_NAME, extra: Mapping | None = None):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = to_dict(cfg)
    if extra:
        data = {**extra, **data}
    tmp = directory / (name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, directory / name)


def load_json(cls: type[T], directory: str | os.PathLike, name: str = CONFIG_NAME,
              drop: Sequence[str] = ()) -> T:
    path = Path(directory) / name
    if not path.is_file():
        raise FileNotFoundError(f"no {name} in {directory}")
    data = json.loads(path.read_text())
    for k in drop:
        data.pop(k, None)
    return from_dict(cls, data)
