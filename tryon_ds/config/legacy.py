"""The keys of files written before the list ``unets`` (and of the original training guide's config.json), as
one dict-to-dict step at load: ``base_image_size``, ``sr_image_size``, ``timesteps``,
``diffusion.sample_steps``, ``diffusion.cond_noise.<input>`` and the sections ``unet1``, ``unet2``, ``unet3``,
... become entries of the list. The step also returns how the file named each key it moved, so that an error
found later in the load names the key the user wrote (``unet2.dim``, not ``unets.1.dim``); the config built
from it carries no trace of them.
"""
from __future__ import annotations

import re

from ..errors import ConfigError
from ..model import SpecError, super_resolves
from ..model.presets import EFFICIENT_PRESETS, PRESETS
from .schema import GUIDE_CASCADE, preset
from .typed import unknown_key

# Keys of files written before ``unets`` (and of the guide's config.json), each with where it goes.
SIZE_KEYS = ("base_image_size", "sr_image_size")  # the sizes of UNets 1 and 2
PER_UNET_LISTS = {"timesteps": "timesteps", "diffusion.sample_steps": "sample_steps"}
SECTION = re.compile(r"^unet(\d+)$")


def as_named(path: str, aliases: dict) -> str:
    """``path`` (``unets.1.dim``) as the file named it (``unet2.dim``), by its longest aliased prefix."""
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in aliases:
            return ".".join([aliases[head], *parts[n:]])
    return path


def cascade_from_sections(data: dict) -> tuple[dict, dict[str, str]]:
    """``data`` with every older cascade key mapped onto the list ``unets`` (made from the sections when the
    file has no list: the guide's two UNets by default), and the aliases that let messages name the keys
    the file used (``{"unets.1": "unet2", "unets.0.image_size": "base_image_size", ...}``)."""
    data = dict(data)
    aliases: dict[str, str] = {}
    sections = {int(SECTION.match(k).group(1)): data.pop(k) for k in list(data) if SECTION.match(k)}
    if "unets" in data:
        entries = data.pop("unets")
        if isinstance(entries, dict):  # overrides by index with no list to apply them to
            raise ConfigError("config key 'unets': got a mapping by index, but the config has no list of UNets "
                              "to apply it to; give the whole list")
        if not isinstance(entries, (list, tuple)):
            raise ConfigError(f"config key 'unets': got {entries!r}, expected a list of UNets")
        entries, legacy = [e for e in entries], False
    else:
        entries, legacy = [{"preset": name} for name, _, _ in GUIDE_CASCADE], True
    for n in sorted(sections):
        section, key = sections[n], f"unet{n}"
        if section is None and n > 2 and n > len(entries):
            continue  # "unet3: null", an older file's way of saying the cascade has two UNets
        if not isinstance(section, dict):
            raise ConfigError(f"config key '{key}': got {section!r}, expected a mapping of keys")
        if n > len(entries) + 1:
            raise ConfigError(f"config sections {', '.join(f'unet{m}' for m in sorted(sections))}: a cascade's "
                              "UNets are numbered from 1 without a gap")
        if n <= len(SIZE_KEYS) and legacy:
            if section.get("image_size") is not None:
                raise ConfigError(f"config key '{key}.image_size': UNet {n} takes its size from "
                                  f"'{SIZE_KEYS[n - 1]}'; leave it out")
            section = {k: v for k, v in section.items() if k != "image_size"}  # null, as older files wrote it
        if n == len(entries) + 1:
            entries.append(dict(section))
        elif "preset" in section or not isinstance(entries[n - 1], dict):
            entries[n - 1] = dict(section)  # a new preset replaces the entry rather than mixing two presets' keys
        else:
            entries[n - 1] = {**entries[n - 1], **section}
        aliases[f"unets.{n - 1}"] = key
    if legacy:
        for n in range(1, len(entries) + 1):
            aliases.setdefault(f"unets.{n - 1}", f"unet{n}")
    for i, size_key in enumerate(SIZE_KEYS):
        if i < len(entries) and isinstance(entries[i], dict) and (size_key in data or legacy):
            entries[i] = {**entries[i], "image_size": data.pop(size_key, GUIDE_CASCADE[i][1])}
            aliases[f"unets.{i}.image_size"] = size_key
        data.pop(size_key, None)
    lists = {"timesteps": data.pop("timesteps", None)}
    diffusion = dict(data.get("diffusion") or {}) if isinstance(data.get("diffusion"), dict) else None
    if diffusion is not None:
        lists["diffusion.sample_steps"] = diffusion.pop("sample_steps", None)
    if legacy and lists.get("diffusion.sample_steps") is None and len(entries) == len(GUIDE_CASCADE):
        lists["diffusion.sample_steps"] = [steps for _, _, steps in GUIDE_CASCADE]
    for list_key, values in lists.items():
        if values is None:
            continue
        if not isinstance(values, (list, tuple)) or len(values) != len(entries):
            names = ", ".join(as_named(f"unets.{i}", aliases) for i in range(len(entries)))
            raise ConfigError(f"config key '{list_key}': got {values!r}, expected one entry per UNet of the "
                              f"cascade ({len(entries)}: {names})")
        field_name = PER_UNET_LISTS[list_key]
        for i, value in enumerate(values):
            if isinstance(entries[i], dict):
                entries[i] = {**entries[i], field_name: value}
                aliases[f"unets.{i}.{field_name}"] = f"{list_key}[{i}]"
    if diffusion is not None:
        noise = diffusion.get("cond_noise")
        if isinstance(noise, dict):
            levels = {k: v for k, v in noise.items() if k != "train_max"}
            diffusion["cond_noise"] = {k: v for k, v in noise.items() if k == "train_max"}
            noisy = [_noisy_inputs(e, super_resolves(i + 1)) if isinstance(e, dict) else () for i, e in enumerate(entries)]
            for name in levels:
                if not any(name in n for n in noisy):
                    raise unknown_key(f"diffusion.cond_noise.{name}", ["train_max", *sorted(set().union(*noisy))])
            for i, entry in enumerate(entries):
                mine = {k: v for k, v in levels.items() if k in noisy[i]}
                own = entry.get("cond_noise") or {} if isinstance(entry, dict) else None
                if mine and isinstance(own, dict):  # an entry's own levels win; a wrong type is reported by the build
                    entries[i] = {**entry, "cond_noise": {**mine, **own}}
                    aliases.update({f"unets.{i}.cond_noise.{k}": f"diffusion.cond_noise.{k}" for k in mine})
        data["diffusion"] = diffusion
    data["unets"] = entries
    return data, aliases


def _noisy_inputs(entry: dict, sr: bool) -> tuple[str, ...]:
    """The noisy inputs of a not-yet-built entry, by its preset's family (nothing, if it names no known one)."""
    name = entry.get("preset", "tiny")
    if not isinstance(name, str) or (name not in PRESETS and name not in EFFICIENT_PRESETS):
        return ()
    try:
        return preset(name).conditioning(sr).noisy
    except SpecError:
        return ()




QUOTED_KEY = re.compile(r"'(unets\.\d+(?:\.[A-Za-z_0-9]+)*)'")


def renamed(err: ConfigError, aliases: dict) -> ConfigError:
    """``err`` with every quoted key of the list (``'unets.1.dim'``) as the file named it (``'unet2.dim'``)."""
    return ConfigError(QUOTED_KEY.sub(lambda m: f"'{as_named(m.group(1), aliases)}'", str(err)))
