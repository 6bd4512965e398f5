"""A mapping of keys (a file, overrides) made into the typed tree of tryon_ds/config/schema.py: every value
checked against its field's type and bounds, only lossless conversions made, an unknown key answered with
the closest known one. Each error names the key, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

from ..errors import ConfigError
from ..model import UNetSpec
from ..model.presets import EFFICIENT_PRESETS, PRESETS
from .schema import Config, preset

_PLURAL = {int: "integers", float: "numbers", bool: "booleans (true/false)", str: "strings"}


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        items = _PLURAL.get(args[0], _type_name(args[0]))
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {items}"
        return f"a list of {items}"
    if origin is dict:
        return f"a mapping of names to {_PLURAL.get(typing.get_args(tp)[1], 'values')}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(tp, str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value, tp):
    """Return ``value`` as type ``tp`` or raise _Mismatch. Only lossless conversions are made."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        for choice in typing.get_args(tp):
            if value == choice and type(value) is type(choice):
                return value
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return {k: _coerce(v, typing.get_args(tp)[1]) for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        if origin is tuple and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        items = [_coerce(v, args[0]) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        # YAML 1.1 reads "1e-4" as a string; accept numeric strings for float keys. NaN and infinity pass
        # every range check, so they are refused here.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _Mismatch
        try:
            number = float(value)
        except ValueError:
            raise _Mismatch from None
        if not math.isfinite(number):
            raise _Mismatch
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config type {tp}")


def _check_range(key, value, meta) -> None:
    if value is None:
        return
    values = value if isinstance(value, (tuple, list)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        bad = ((meta.get("ge") is not None and v < meta["ge"]) or (meta.get("gt") is not None and v <= meta["gt"])
               or (meta.get("le") is not None and v > meta["le"]))
        if bad:
            parts = [f">= {meta['ge']}" if meta.get("ge") is not None else None,
                     f"> {meta['gt']}" if meta.get("gt") is not None else None,
                     f"<= {meta['le']}" if meta.get("le") is not None else None]
            raise ConfigError(f"config key '{key}': got {value!r}, expected a value "
                              + " and ".join(p for p in parts if p))


def unknown_key(key: str, valid: list[str]) -> ConfigError:
    name = key.rpartition(".")[2]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{key.rpartition('.')[0] + '.' if '.' in key else ''}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint} (valid keys here: {', '.join(sorted(valid))})")


def build(cls, data: Any, prefix: str = ""):
    """An instance of dataclass ``cls`` from ``data``, a mapping of its keys; ``prefix`` names it in messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix or '<top level>'}': got {data!r}, expected a mapping of keys")
    data = dict(data)
    if cls is UNetSpec:  # the preset decides the entry's architecture
        name = data.pop("preset", "tiny")
        if not isinstance(name, str) or (name not in PRESETS and name not in EFFICIENT_PRESETS):
            raise ConfigError(f"config key '{prefix}.preset': got {name!r}, expected one of "
                              f"{sorted(PRESETS) + sorted(EFFICIENT_PRESETS)}")
        base = preset(name)
        cls = type(base)
    else:
        base = cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise unknown_key(path, list(fields))
        tp = hints[key]
        if cls is Config and key == "unets":
            values[key] = tuple(build(UNetSpec, entry, f"unets.{i}") for i, entry in enumerate(value))
            continue
        if dataclasses.is_dataclass(tp):
            values[key] = build(tp, value, path)
            continue
        try:
            coerced = _coerce(value, tp)
        except _Mismatch:
            raise ConfigError(f"config key '{path}': got {value!r} ({type(value).__name__}), "
                              f"expected {_type_name(tp)}") from None
        _check_range(path, coerced, fields[key].metadata)
        values[key] = coerced
    return dataclasses.replace(base, **values)
