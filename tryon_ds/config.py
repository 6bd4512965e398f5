"""One typed configuration tree for the whole trainer.

The cascade is the list ``unets``: each entry one UNet, its preset and any architecture key overriding it
(the preset's family decides the architecture: a Parallel-UNet or an Efficient-UNet, tryon_ds/model/), its
``image_size``, ``timesteps``, ``sample_steps``, ``cond_noise`` levels and how it runs. UNet 1 makes the
try-on, each later one super-resolves the one before it; what each is conditioned on is its family's to say.

Files written before the list, and the original TryOnDiffusion training guide's ``config.json``, load as they
are: their keys (``base_image_size``, ``sr_image_size``, ``timesteps``, ``diffusion.sample_steps``,
``diffusion.cond_noise.<input>``, the sections ``unet1``, ``unet2``, ``unet3``, ...) are mapped onto the list
once, when the file is read (``cascade_from_sections``), and errors still name the key the file used. Command
lines may use either: ``--set unet2.dim=64`` or ``--set unets.1.dim=64``. A config is built once from a file
plus command-line overrides and validated before anything runs; every user error is a :class:`ConfigError`
whose message names the key, the value and what is allowed.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
import sysconfig
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError
from .model import Conditioning, SpecError, UNetSpec, preset as model_preset, super_resolves
from .model.presets import EFFICIENT_PRESETS, PRESETS
from .model.spec import bounds


def preset(name: str) -> UNetSpec:
    """The spec of a named preset (tryon_ds/model/presets.py)."""
    try:
        return model_preset(name)
    except SpecError as err:
        raise ConfigError(str(err)) from None


@dataclass
class CondNoiseConfig:
    """Noise-conditioning augmentation: every noisy input of a UNet (the ca image and the garment; a
    super-resolving UNet's low-res try-on) is noised to its own level, drawn from U[0, train_max] in training
    (the paper: U[0, 1]); at sampling each UNet's ``cond_noise`` mapping fixes it. Levels are fractions of the
    UNet's timesteps; the UNet is told each level."""
    train_max: float = field(default=1.0, metadata=bounds(ge=0.0, le=1.0))


@dataclass
class DiffusionConfig:
    schedule: Literal["cosine", "linear"] = "cosine"
    objective: Literal["eps", "v"] = "v"
    cond_drop_prob: float = field(default=0.1, metadata=bounds(ge=0.0, le=1.0))
    guidance: float = field(default=2.0, metadata=bounds(ge=0.0))
    sampler: Literal["ddpm", "ddim", "dpmpp"] = "ddpm"
    dynamic_threshold: bool = True
    dynamic_threshold_percentile: float = field(default=0.95, metadata=bounds(gt=0.0, le=1.0))
    cond_noise: CondNoiseConfig = field(default_factory=CondNoiseConfig)
    # A super-resolution UNet's sampling starts at this fraction of its timesteps from the upsampled low-res
    # try-on noised there (SDEdit) rather than from pure noise (1.0, the paper's); the steps are spread over
    # what is left.
    sr_start: float = field(default=1.0, metadata=bounds(gt=0.0, le=1.0))


@dataclass
class DataConfig:
    # Shard specs: brace patterns, lists or ``pipe:`` commands. Empty means ``{data_dir}/train-*.tar``.
    train_shards: list[str] = field(default_factory=list)
    val_shards: list[str] = field(default_factory=list)
    num_workers: int = field(default=2, metadata=bounds(ge=0))
    # Batches each loader worker keeps ready; more hides a store's latency (BENCHMARKS.md, "Shards from a store").
    prefetch_factor: int = field(default=2, metadata=bounds(ge=1))
    # Shards from a store (http(s)://, pipe:; tryon_ds/data/remote.py): a read that brings no byte for this
    # long fails; a failed shard is read again this many times (doubling waits from shard_retry_wait_s), going
    # on after the samples already delivered, then skipped and counted.
    shard_timeout_s: float = field(default=60.0, metadata=bounds(gt=0.0))
    shard_retries: int = field(default=3, metadata=bounds(ge=0))
    shard_retry_wait_s: float = field(default=1.0, metadata=bounds(ge=0.0))
    shuffle_buffer: int = field(default=1000, metadata=bounds(ge=1))
    # Training streams restart their shard draw and shuffle buffer every this many batches, which bounds
    # what a resumed run must skip to see the same batches (tryon_ds/data/pipeline.py).
    segment_batches: int = field(default=200, metadata=bounds(ge=1))
    # Virtual data streams; 0 = ranks x workers. Fix it to make the data order independent of the world
    # size (e.g. to compare a 1-rank run with gradient accumulation against a multi-rank run).
    streams: int = field(default=0, metadata=bounds(ge=0))
    seed: int = 0
    hflip_prob: float = field(default=0.5, metadata=bounds(ge=0.0, le=1.0))
    rotation_degrees: float = field(default=5.0, metadata=bounds(ge=0.0, le=180.0))
    color_jitter: float = field(default=0.1, metadata=bounds(ge=0.0, le=1.0))


@dataclass
class LoggingConfig:
    wandb: Literal["online", "offline", "disabled"] = "offline"
    wandb_project: str = "tryon-ds"
    tensorboard: bool = True
    progress_bar: bool = True
    keep_checkpoints: int = field(default=3, metadata=bounds(ge=1))
    sample_count: int = field(default=4, metadata=bounds(ge=1))
    # Sample grids during training use this many DDIM steps (every other rank waits meanwhile).
    preview_steps: int = field(default=25, metadata=bounds(ge=1))
    # An online wandb that cannot reach its server gives up after this long and the run logs to TensorBoard.
    wandb_init_timeout_s: float = field(default=30.0, metadata=bounds(gt=0.0))


# The training guide's two UNets (preset, image size, sampling steps): the default cascade, and what a file
# written before ``unets`` (or the guide's config.json) starts from.
GUIDE_CASCADE = (("base", (128, 128), 256), ("sr", (256, 256), 128))


def default_cascade() -> tuple[UNetSpec, ...]:
    return tuple(dataclasses.replace(preset(name), image_size=size, sample_steps=steps)
                 for name, size, steps in GUIDE_CASCADE)


@dataclass
class Config:
    # The original training guide's config.json keys (configs/config.json), but those of its two UNets,
    # which become entries of ``unets``.
    data_dir: str = "./data"
    output_dir: str = "./outputs"
    checkpoint_dir: str = "./checkpoints"
    log_dir: str = "./logs"
    channels: int = field(default=3, metadata=bounds(ge=1))
    # Per GPU (per rank): the micro-batch; a step sees batch_size x gradient_accumulation_steps x ranks.
    batch_size: int = field(default=4, metadata=bounds(ge=1))
    learning_rate: float = field(default=1e-4, metadata=bounds(gt=0.0))
    num_epochs: int = field(default=100, metadata=bounds(ge=1))
    gradient_accumulation_steps: int = field(default=1, metadata=bounds(ge=1))
    max_grad_norm: float = field(default=1.0, metadata=bounds(ge=0.0))
    warmup_steps: int = field(default=1000, metadata=bounds(ge=0))
    cosine_decay_max_steps: int = field(default=50000, metadata=bounds(ge=1))
    # After warm-up: cosine decay to min_lr_ratio over cosine_decay_max_steps, or constant (the paper).
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    validation_freq: int = field(default=1000, metadata=bounds(ge=0))  # 0: no validation
    checkpoint_freq: int = field(default=5000, metadata=bounds(ge=1))
    log_freq: int = field(default=100, metadata=bounds(ge=1))
    sample_freq: int = field(default=2000, metadata=bounds(ge=0))  # 0: no preview (a model copy on rank 0)
    train_unet_number: int = field(default=1, metadata=bounds(ge=1))
    use_ema: bool = True
    # true picks bf16 where the DeepSpeed config does not say; "fp16"/"bf16"/"no" are explicit.
    mixed_precision: bool | Literal["no", "fp16", "bf16"] = True

    # Beyond the guide's keys.
    ema_decay: float = field(default=0.9999, metadata=bounds(ge=0.0, le=1.0))
    weight_decay: float = field(default=0.01, metadata=bounds(ge=0.0))
    min_lr_ratio: float = field(default=0.1, metadata=bounds(ge=0.0, le=1.0))
    max_steps: Optional[int] = field(default=None, metadata=bounds(ge=1))
    # Stop after this many optimizer steps in a row were discarded for a non-finite loss or gradients.
    max_bad_steps: int = field(default=20, metadata=bounds(ge=1))
    # A collective that waits longer than this (a rank died or hangs) fails the run instead of hanging it.
    dist_timeout_s: float = field(default=1800.0, metadata=bounds(gt=0.0))
    seed: int = 0
    unets: tuple[UNetSpec, ...] = field(default_factory=default_cascade)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # How the file named each entry's keys (legacy sections, the guide's size keys), for messages.
    aliases: dict = field(default_factory=dict, repr=False, compare=False, metadata={"internal": True})

    @property
    def unet_numbers(self) -> list[int]:
        """The UNets of the cascade, 1 .. N."""
        return list(range(1, len(self.unets) + 1))

    def unet(self, unet_number: int) -> UNetSpec:
        if unet_number not in self.unet_numbers:
            raise ConfigError(f"UNet {unet_number} is not defined: the cascade has {len(self.unets)} UNet(s) "
                              f"({', '.join(u.preset for u in self.unets)}); add an entry to 'unets', e.g. "
                              "{preset: sr1024, image_size: [1024, 1024]} as configs/cascade1024.yaml does")
        return self.unets[unet_number - 1]

    def conditioning(self, unet_number: int) -> Conditioning:
        """What UNet ``unet_number`` reads: its family's answer for its place (every UNet after the first
        super-resolves the one before it)."""
        return self.unet(unet_number).conditioning(super_resolves(unet_number))

    def key(self, unet_number: int, name: str = "") -> str:
        """The config key of UNet ``unet_number`` (or of its key ``name``) as the file spelled it."""
        path = f"unets.{unet_number - 1}" + (f".{name}" if name else "")
        return _alias(path, self.aliases)

    def image_size(self, unet_number: int) -> tuple[int, int]:
        """[H, W] of UNet ``unet_number``'s output (and of its training images, crops aside)."""
        return self.unet(unet_number).image_size

    def size_key(self, unet_number: int) -> str:
        return self.key(unet_number, "image_size")

    @property
    def num_keypoints(self) -> int:
        """Keypoints per pose, which every UNet that reads poses agrees on (validated)."""
        return next((u.num_keypoints for u in self.unets if hasattr(u, "num_keypoints")), 18)

    def crop_size(self, unet_number: int) -> tuple[int, int] | None:
        """[H, W] of the random crops UNet ``unet_number`` trains on, or None (whole images)."""
        return self.unet(unet_number).crop_size

    def validate(self) -> None:
        if not self.unets:
            raise ConfigError("config key 'unets': the cascade has no UNet; give at least one")
        if not (0 < self.train_unet_number <= len(self.unets)):
            n = self.train_unet_number
            raise ConfigError(f"config key 'train_unet_number': got {n}, but the config defines no 'unet{n}' section "
                              f"(its cascade is {', '.join(self.key(m) for m in self.unet_numbers)}); add one, or "
                              "an entry to 'unets', e.g. unet3: {preset: sr1024} as configs/cascade1024.yaml does")
        for number in self.unet_numbers:
            self._validate_unet(number)
        poses = {self.key(n, "num_keypoints"): u.num_keypoints for n, u in zip(self.unet_numbers, self.unets)
                 if hasattr(u, "num_keypoints")}
        if len(set(poses.values())) > 1:
            raise ConfigError(f"config keys {', '.join(poses)} differ ({', '.join(map(str, poses.values()))}); "
                              "all read the same pose arrays")
        if self.channels != 3:
            raise ConfigError(f"config key 'channels': got {self.channels}, only RGB (3) is supported")

    def _validate_unet(self, number: int) -> None:
        key, unet = self.key(number), self.unet(number)
        try:
            unet.conditioning(super_resolves(number))
        except SpecError:
            raise ConfigError(f"config key '{key}.preset': {unet.preset!r} is conditioned on a low-resolution image "
                              "alone, so it can only super-resolve (UNet 2 or later); UNet 1 needs a Parallel-UNet"
                              ) from None
        try:
            unet.validate(key, super_resolves(number))
        except SpecError as err:
            raise ConfigError(str(err)) from None
        size, size_key = self.image_size(number), self.size_key(number)
        if size is None:
            raise ConfigError(f"config key '{size_key}': UNet {number} needs its [H, W] output size, e.g. [1024, 768]")
        if any(s < 1 for s in size):
            raise ConfigError(f"config key '{size_key}': got {list(size)}, expected positive integers")
        factor = unet.size_factor
        if any(s % factor for s in size):
            raise ConfigError(f"config key '{size_key}': {list(size)} is not divisible by {factor}, which "
                              f"{key}'s {len(unet.dim_mults)} levels need")
        crop = self.crop_size(number)
        if crop is not None:
            if any(c % factor for c in crop) or any(c < 1 or c > s for c, s in zip(crop, size)):
                raise ConfigError(f"config key '{key}.crop_size': {list(crop)} must be divisible by {factor} and "
                                  f"within the image ({size_key} {list(size)})")
        if number > 1:
            low, low_key = self.image_size(number - 1), self.size_key(number - 1)
            if any(s % b for s, b in zip(size, low)) or size[0] * low[1] != size[1] * low[0]:
                raise ConfigError(f"config key '{size_key}': {list(size)} must be a multiple of '{low_key}' "
                                  f"{list(low)} with the same aspect ratio: UNet {number} super-resolves UNet "
                                  f"{number - 1}'s output")

    def to_dict(self) -> dict:
        """The config as a file of this release writes it (bundles, trainer_state.json): the cascade as a list."""
        whole = dataclasses.asdict(self)
        return {f.name: whole[f.name] for f in dataclasses.fields(self) if not f.metadata.get("internal")}

    def with_unet(self, number: int, unet: UNetSpec, size: tuple[int, int] | None = None) -> "Config":
        """This config with UNet ``number`` replaced by ``unet`` (a cascade grown to it if need be: each new
        entry repeats the last one), at ``size`` [H, W] if given, each lower UNet at half the size of the one
        above; for the planner and the benchmarks, which name a preset rather than a cascade."""
        unets = list(self.unets)
        while len(unets) < number:
            unets.append(unets[-1])
        unets[number - 1] = unet
        if size is not None:
            for k in range(number, 0, -1):
                unets[k - 1] = dataclasses.replace(unets[k - 1], image_size=(size[0] >> (number - k),
                                                                             size[1] >> (number - k)))
        config = dataclasses.replace(self, unets=tuple(unets))
        config.validate()
        return config


# --------------------------------------------------------------------------- the cascade from older keys
# Keys of files written before ``unets`` (and of the guide's config.json), each with where it goes.
SIZE_KEYS = ("base_image_size", "sr_image_size")  # the sizes of UNets 1 and 2
PER_UNET_LISTS = {"timesteps": "timesteps", "diffusion.sample_steps": "sample_steps"}
SECTION = re.compile(r"^unet(\d+)$")


def _alias(path: str, aliases: dict) -> str:
    """``path`` (``unets.1.dim``) as the file named it (``unet2.dim``), by its longest aliased prefix."""
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in aliases:
            return ".".join([aliases[head], *parts[n:]])
    return path


def cascade_from_sections(data: dict) -> dict:
    """``data`` with every older cascade key mapped onto the list ``unets`` (made from the sections when the
    file has no list: the guide's two UNets by default), and the aliases that let messages name the keys
    the file used (under the key ``aliases``)."""
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
            names = ", ".join(_alias(f"unets.{i}", aliases) for i in range(len(entries)))
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
                    raise _unknown_key(f"diffusion.cond_noise.{name}", ["train_max", *sorted(set().union(*noisy))])
            for i, entry in enumerate(entries):
                mine = {k: v for k, v in levels.items() if k in noisy[i]}
                own = entry.get("cond_noise") or {} if isinstance(entry, dict) else None
                if mine and isinstance(own, dict):  # an entry's own levels win; a wrong type is reported by the build
                    entries[i] = {**entry, "cond_noise": {**mine, **own}}
                    aliases.update({f"unets.{i}.cond_noise.{k}": f"diffusion.cond_noise.{k}" for k in mine})
        data["diffusion"] = diffusion
    data["unets"] = entries
    return {**data, "aliases": aliases}


def _noisy_inputs(entry: dict, sr: bool) -> tuple[str, ...]:
    """The noisy inputs of a not-yet-built entry, by its preset's family (nothing, if it names no known one)."""
    name = entry.get("preset", "tiny")
    if not isinstance(name, str) or (name not in PRESETS and name not in EFFICIENT_PRESETS):
        return ()
    try:
        return preset(name).conditioning(sr).noisy
    except SpecError:
        return ()


# --------------------------------------------------------------------------- typed building
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


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    name = key.rpartition(".")[2]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{key.rpartition('.')[0] + '.' if '.' in key else ''}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint} (valid keys here: {', '.join(sorted(valid))})")


def _build(cls, data: Any, prefix: str, aliases: dict):
    named = _alias(prefix, aliases)
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{named or '<top level>'}': got {data!r}, expected a mapping of keys")
    data = dict(data)
    if cls is UNetSpec:  # the preset decides the entry's architecture
        name = data.pop("preset", "tiny")
        if not isinstance(name, str) or (name not in PRESETS and name not in EFFICIENT_PRESETS):
            raise ConfigError(f"config key '{named}.preset': got {name!r}, expected one of "
                              f"{sorted(PRESETS) + sorted(EFFICIENT_PRESETS)}")
        base = preset(name)
        cls = type(base)
    else:
        base = cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        full = _alias(path, aliases)
        if key not in fields:
            raise _unknown_key(full, list(fields))
        tp = hints[key]
        if cls is Config and key == "unets":
            values[key] = tuple(_build(UNetSpec, entry, f"unets.{i}", aliases) for i, entry in enumerate(value))
            continue
        if dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value, path, aliases)
            continue
        try:
            coerced = _coerce(value, tp)
        except _Mismatch:
            raise ConfigError(f"config key '{full}': got {value!r} ({type(value).__name__}), "
                              f"expected {_type_name(tp)}") from None
        _check_range(full, coerced, fields[key].metadata)
        values[key] = coerced
    return dataclasses.replace(base, **values)


def build_config(data: dict) -> Config:
    """Build and validate a Config from a (possibly nested) mapping of keys, the cascade as a list or in the
    older keys (``cascade_from_sections``)."""
    data = cascade_from_sections(data)
    aliases = data.pop("aliases")
    config = _build(Config, data, "", aliases)
    config.aliases = aliases
    config.validate()
    return config


# Where the shipped configs/ and ds_configs/ are: beside the package in a source checkout (also an editable
# install), or under the environment's data folder after a regular install (setup.cfg's data_files).
SHIPPED_ROOTS = (Path(__file__).resolve().parents[1], Path(sysconfig.get_path("data")) / "share" / "tryon-ds")


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


def config_from_args(args: argparse.Namespace) -> Config:
    data = read_config_file(args.config) if args.config else {}
    for flag, (key, _) in GUIDE_FLAGS.items():
        raw = getattr(args, flag, None)
        if raw is not None:
            data = deep_merge(data, parse_override(f"{key}={raw}"))
    for text in args.set:
        data = deep_merge(data, parse_override(text))
    return build_config(data)

