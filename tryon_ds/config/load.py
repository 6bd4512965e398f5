"""A config from what the user gives: a file (YAML or JSON, ``extends:`` another), the training guide's flags
and ``--set KEY=VALUE`` overrides, merged, the older keys upgraded, built and validated once; an error found
anywhere on the way names the key as the user wrote it.
"""
from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

import yaml

from ..errors import ConfigError
from .legacy import cascade_from_sections, renamed
from .schema import Config
from .typed import build


def build_config(data: dict) -> Config:
    """Build and validate a Config from a (possibly nested) mapping of keys, the cascade as a list or in the
    older keys (tryon_ds/config/legacy.py)."""
    data, aliases = cascade_from_sections(data)
    try:
        config = build(Config, data)
        config.validate()
    except ConfigError as err:
        raise renamed(err, aliases) from None
    return config


# Where the shipped configs/ and ds_configs/ are: beside the package in a source checkout (also an editable
# install), or under the environment's data folder after a regular install (setup.cfg's data_files).
SHIPPED_ROOTS = (Path(__file__).resolve().parents[2], Path(sysconfig.get_path("data")) / "share" / "tryon-ds")


def find_config_file(path: str | Path, what: str = "config file") -> Path:
    """A path the user gives is read relative to the current folder; one naming a shipped file
    (``ds_configs/zero2_bf16.json``, ``configs/tiny.yaml``) is found from any folder."""
    path = Path(path)
    if path.is_file() or path.is_absolute():
        if not path.is_file():
            raise ConfigError(f"{what} {str(path)!r} does not exist")
        return path
    for root in SHIPPED_ROOTS:
        if (root / path).is_file() and path.parts[0] in ("configs", "ds_configs"):
            return root / path
    raise ConfigError(f"{what} {str(path)!r} does not exist (in the current folder {Path.cwd()}"
                      + (", nor among the shipped ones)" if path.parts[0] in ("configs", "ds_configs") else ")"))


def read_config_file(path: str | Path) -> dict:
    path = find_config_file(path)
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'YAML'}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of keys at the top, got {type(data).__name__}")
    # A config may name another to start from (``extends: tiny.yaml``), resolved relative to itself.
    parent = data.pop("extends", None)
    if parent is not None:
        return deep_merge(read_config_file(path.parent / parent), data)
    return data


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            # A new preset replaces the old section rather than mixing two presets' keys.
            out[key] = dict(value) if "preset" in value else deep_merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), list) and all(str(k).isdigit() for k in value):
            out[key] = _merge_by_index(key, out[key], value)  # --set unets.1.dim=64
        else:
            out[key] = value
    return out


def _merge_by_index(key: str, items: list, update: dict) -> list:
    items = list(items)
    for index, value in sorted(update.items(), key=lambda kv: int(kv[0])):
        i = int(index)
        if i > len(items):
            raise ConfigError(f"config key '{key}.{i}': the list has {len(items)} entries; add them in order")
        if i == len(items):
            items.append(value)
        elif isinstance(value, dict) and isinstance(items[i], dict):
            items[i] = deep_merge({"unused": items[i]}, {"unused": value})["unused"]
        else:
            items[i] = value
    return items


def parse_override(text: str) -> dict:
    """``a.b=value`` -> {"a": {"b": value}}; the value is read as YAML (``64``, ``true``, ``[1, 2]``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. --set unet1.dim=64")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


# The original training guide's command-line flags, mapped to config keys.
GUIDE_FLAGS = {"train_unet": ("train_unet_number", int), "batch_size": ("batch_size", int),
              "learning_rate": ("learning_rate", float), "num_epochs": ("num_epochs", int),
              "max_steps": ("max_steps", int)}
FLAG_HELP = {"train_unet": " (1 = base, 2 = super-resolution, 3 = the 1024 px stage when unet3 is defined)",
             "batch_size": " (per GPU: the micro-batch; a step sees batch_size x accumulation x ranks)"}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or JSON config file (a training guide's config.json works as it is)")
    for flag, (key, tp) in GUIDE_FLAGS.items():
        parser.add_argument(f"--{flag}", type=str, default=None, metavar=tp.__name__.upper(),
                            help=f"override config key '{key}'" + FLAG_HELP.get(flag, ""))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, dotted for sections: --set unet1.dim=64")


def with_overrides(config: Config, overrides: list[str]) -> Config:
    """``config`` with ``--set KEY=VALUE`` texts applied over it, built and checked again."""
    data = json.loads(json.dumps(config.to_dict()))  # as its file reads: lists, which --set unets.N... indexes
    for text in overrides:
        data = deep_merge(data, parse_override(text))
    return build_config(data)


def config_from_args(args: argparse.Namespace) -> Config:
    data = read_config_file(args.config) if args.config else {}
    for flag, (key, _) in GUIDE_FLAGS.items():
        raw = getattr(args, flag, None)
        if raw is not None:
            data = deep_merge(data, parse_override(f"{key}={raw}"))
    for text in args.set:
        data = deep_merge(data, parse_override(text))
    return build_config(data)

