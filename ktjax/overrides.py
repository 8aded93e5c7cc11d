"""Typed ``key=value`` overrides of nested dataclass configs (``--set train.steps=500``), and
dataclass <-> JSON for saving configs into run directories.

Keys are dotted paths through dataclass fields and dict entries (``train.groups.lora.lr_peak``).
Values are parsed by the field's type: int, float, bool (true/false/1/0/yes/no), str, tuple[str, ...]
(comma-separated), and rule lists tuple[tuple[str, str], ...] (``pattern=label`` comma-separated).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def flat_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every overridable dotted key of a config."""
    keys = []
    if dataclasses.is_dataclass(cfg):
        for f in dataclasses.fields(cfg):
            keys += flat_keys(getattr(cfg, f.name), f"{prefix}{f.name}.") or [prefix + f.name]
    elif isinstance(cfg, dict) and cfg and all(dataclasses.is_dataclass(v) for v in cfg.values()):
        for k, v in cfg.items():
            keys += flat_keys(v, f"{prefix}{k}.")
    return keys


def parse_value(text: str, typ: Any, key: str) -> Any:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if text.lower() == "none" and type(None) in args:
            return None
        return parse_value(text, non_none[0], key)
    try:
        if typ is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        if typ is str:
            return text
        if origin is tuple and args and typing.get_origin(args[0]) is tuple:  # rules: pattern=label,...
            pairs = [item.rsplit("=", 1) for item in text.split(",") if item]
            if any(len(p) != 2 for p in pairs):
                raise ValueError
            return tuple((p.strip(), lab.strip()) for p, lab in pairs)
        if origin is tuple:
            return tuple(item.strip() for item in text.split(",") if item.strip())
    except ValueError:
        pass
    else:
        raise ValueError(f"{key}: cannot override a field of type {typ}")
    raise ValueError(f"{key} expects {getattr(typ, '__name__', typ)}, got {text!r}")


def _set(cfg: Any, path: list[str], text: str, full_key: str) -> Any:
    name, rest = path[0], path[1:]
    if isinstance(cfg, dict):
        return {**cfg, name: _set(cfg[name], rest, text, full_key)}
    hints = typing.get_type_hints(type(cfg))
    value = (
        _set(getattr(cfg, name), rest, text, full_key) if rest else parse_value(text, hints[name], full_key)
    )
    return dataclasses.replace(cfg, **{name: value})


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """A copy of `cfg` with each ``key=value`` applied. Unknown keys and bad values raise ValueError
    (with the closest valid keys); dataclass validation of the result runs as usual."""
    keys = flat_keys(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see the config printed at start"
            raise ValueError(f"unknown config key {key!r}{hint}")
        cfg = _set(cfg, key.split("."), text.strip(), key)
    return cfg


def to_json(cfg: Any) -> Any:
    """Dataclasses (nested) -> JSON-ready dicts and lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_json(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_json(v) for k, v in cfg.items()}
    if isinstance(cfg, (tuple, list)):
        return [to_json(v) for v in cfg]
    return cfg


def from_json(cls: Any, data: Any) -> Any:
    """Inverse of to_json for a dataclass type `cls`."""
    origin, args = typing.get_origin(cls), typing.get_args(cls)
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return cls(**{k: from_json(hints[k], v) for k, v in data.items() if k in hints})
    if origin is dict:
        return {k: from_json(args[1], v) for k, v in data.items()}
    if origin is tuple:
        inner = args[0] if args else Any
        return tuple(from_json(inner, v) for v in data)
    if origin in (typing.Union, types.UnionType):
        return data
    return data
