"""One typed configuration tree for the whole trainer.

The top level holds the ``config.json`` keys of the original TryOnDiffusion training guide verbatim, so
such a file loads as it is (``configs/config.json``); the sections below it (``unet1``, ``unet2``, an
optional ``unet3``, ``diffusion``, ``data``, ``logging``) hold the rest. The cascade is as long as its UNet
sections: UNet 1 makes the try-on, each later UNet super-resolves the one before it, and each section's
preset decides its architecture (a Parallel-UNet or an Efficient-UNet). A config is built once from a file plus command-line
overrides and validated before anything runs; every user error is a :class:`ConfigError` whose message
names the key, the value and what is allowed.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import sysconfig
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml

from .errors import ConfigError
from .model.presets import EFFICIENT_PRESETS, PRESETS


def _range(ge=None, gt=None, le=None):
    return {"ge": ge, "gt": gt, "le": le}


@dataclass
class UNetRuntime:
    """How a UNet runs, whatever its architecture (the keys of every unetN section beside its shape)."""
    checkpointing: bool = False
    # Run the convolutions on channels-last (NHWC) activations; tools/gpu_check.sh measures whether it pays.
    channels_last: bool = False
    # torch.compile the UNet (one graph; training, validation and inference), with torch.compile's mode.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # aot_eager: the same captured graphs, forward and backward, run by eager kernels with no code generated
    # (compile_mode is inductor's and is not used): tells a compiled run's departure from eager that comes from
    # the capture apart from one that comes from inductor's kernels, and compiles in seconds.
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"


@dataclass
class UNetConfig(UNetRuntime):
    """Architecture of one Parallel-UNet. ``preset`` names the starting point (``model/presets.py``);
    any other key given beside it overrides that preset's value."""

    ARCH: ClassVar[str] = "parallel"  # the model it builds (tryon_ds/model/__init__.py)
    # What a sample must hold for this UNet beside its target (and a later UNet's low-res image).
    INPUTS: ClassVar[tuple[str, ...]] = ("ca", "garment", "person_pose", "garment_pose")

    preset: str = "tiny"
    # [H, W] of a third or later UNet; UNets 1 and 2 take the guide's base_image_size / sr_image_size.
    image_size: Optional[tuple[int, int]] = None
    dim: int = field(default=32, metadata=_range(ge=8))
    dim_mults: tuple[int, ...] = (1, 2, 2)
    # Residual blocks per level of the person-UNet; the garment-UNet uses the same counts.
    num_res_blocks: tuple[int, ...] = (1, 1, 1)
    # Per level: whether every person-UNet block there is followed by self-attention (with the pose tokens)
    # and cross-attention to the garment (the paper: the two lowest resolutions of UNet 1, the lowest of
    # UNet 2). The garment-UNet is built only as far as the attending blocks need.
    attn_levels: tuple[bool, ...] = (False, True, True)
    attn_heads: int = field(default=4, metadata=_range(ge=1))
    attn_dim_head: int = field(default=16, metadata=_range(ge=4))
    # Width of the FiLM conditioning vector and of the pose tokens (one per keypoint).
    cond_dim: int = field(default=128, metadata=_range(ge=8))
    pose_dim: int = field(default=64, metadata=_range(ge=8))
    num_keypoints: int = field(default=18, metadata=_range(ge=1))
    groups: int = field(default=8, metadata=_range(ge=1))
    dropout: float = field(default=0.0, metadata=_range(ge=0.0, le=1.0))
    attention_backend: Literal["sdpa", "xformers", "math"] = "sdpa"

    @property
    def size_factor(self) -> int:
        """What the image's sides must be divisible by: one halving between consecutive levels."""
        return 2 ** (len(self.dim_mults) - 1)

    def validate(self, key: str) -> None:
        n = len(self.dim_mults)
        for name in ("num_res_blocks", "attn_levels"):
            if len(getattr(self, name)) != n:
                raise ConfigError(
                    f"config key '{key}.{name}': has {len(getattr(self, name))} entries, expected one per "
                    f"level of '{key}.dim_mults' ({n})")
        if not any(self.attn_levels):
            raise ConfigError(f"config key '{key}.attn_levels': at least one level must attend, "
                              "or the garment never reaches the person stream")
        for i, m in enumerate(self.dim_mults):
            if m < 1:
                raise ConfigError(f"config key '{key}.dim_mults[{i}]': got {m}, expected an integer >= 1")
            if (self.dim * m) % self.groups:
                raise ConfigError(f"config key '{key}.groups': {self.groups} does not divide the level-{i} "
                                  f"width {self.dim * m} (dim x dim_mults[{i}])")
        if self.pose_dim % self.attn_heads:
            raise ConfigError(f"config key '{key}.pose_dim': {self.pose_dim} is not divisible by "
                              f"'{key}.attn_heads' ({self.attn_heads}), which the pose pooling needs")


@dataclass
class EfficientUNetConfig(UNetRuntime):
    """Architecture of one Efficient-UNet (Imagen's): a super-resolution UNet conditioned on the low-res
    image alone, the paper's UNet 3. ``preset`` as for the Parallel-UNet."""

    ARCH: ClassVar[str] = "efficient"
    INPUTS: ClassVar[tuple[str, ...]] = ()

    preset: str = "tiny-sr3"
    # [H, W] of its output, e.g. [1024, 768]; required for a third or later UNet (UNets 1 and 2 take the
    # guide's base_image_size / sr_image_size). Not in the presets: it is the data's size.
    image_size: Optional[tuple[int, int]] = None
    # Trained on random crops of this size ([H, W]) of the target and of its upsampled low-res image (Imagen:
    # 256 px crops of 1024 px images), sampled on the whole image; null trains on whole images.
    crop_size: Optional[tuple[int, int]] = None
    dim: int = field(default=32, metadata=_range(ge=8))
    dim_mults: tuple[int, ...] = (1, 2, 4)
    # Residual blocks per level, each level downsampling before its blocks: more at the low resolutions.
    num_res_blocks: tuple[int, ...] = (1, 2, 2)
    cond_dim: int = field(default=128, metadata=_range(ge=8))
    groups: int = field(default=8, metadata=_range(ge=1))
    dropout: float = field(default=0.0, metadata=_range(ge=0.0, le=1.0))

    @property
    def size_factor(self) -> int:
        return 2 ** len(self.dim_mults)  # every level downsamples, the first one included

    def validate(self, key: str) -> None:
        if len(self.num_res_blocks) != len(self.dim_mults):
            raise ConfigError(f"config key '{key}.num_res_blocks': has {len(self.num_res_blocks)} entries, expected "
                              f"one per level of '{key}.dim_mults' ({len(self.dim_mults)})")
        for i, (m, n) in enumerate(zip(self.dim_mults, self.num_res_blocks)):
            if m < 1 or n < 1:
                raise ConfigError(f"config key '{key}': level {i} has dim_mults {m} and num_res_blocks {n}, "
                                  "expected integers >= 1")
        for width in [self.dim] + [self.dim * m for m in self.dim_mults]:
            if width % self.groups:
                raise ConfigError(f"config key '{key}.groups': {self.groups} does not divide the width {width}")


UNET_SECTIONS = ("unet1", "unet2", "unet3")
UNetSection = Union[UNetConfig, EfficientUNetConfig]
# The guide's keys for the sizes of UNets 1 and 2; a later UNet names its own (``unetN.image_size``).
GUIDE_SIZE_KEYS = {1: "base_image_size", 2: "sr_image_size"}


@dataclass
class CondNoiseConfig:
    """Noise-conditioning augmentation: every conditioning image (the ca image and the garment; in a
    super-resolution UNet also the low-res try-on) is noised to its own level, drawn from U[0, train_max] in training (the paper:
    U[0, 1]) and fixed at sampling. Levels are fractions of the UNet's timesteps; the UNet is told each
    level. The sampling levels were chosen by a search on the demo (BENCHMARKS.md): clean inputs won."""
    train_max: float = field(default=1.0, metadata=_range(ge=0.0, le=1.0))
    ca: float = field(default=0.0, metadata=_range(ge=0.0, le=1.0))
    garment: float = field(default=0.0, metadata=_range(ge=0.0, le=1.0))
    lowres: float = field(default=0.0, metadata=_range(ge=0.0, le=1.0))


@dataclass
class DiffusionConfig:
    schedule: Literal["cosine", "linear"] = "cosine"
    objective: Literal["eps", "v"] = "v"
    cond_drop_prob: float = field(default=0.1, metadata=_range(ge=0.0, le=1.0))
    guidance: float = field(default=2.0, metadata=_range(ge=0.0))
    sampler: Literal["ddpm", "ddim", "dpmpp"] = "ddpm"
    sample_steps: tuple[int, ...] = (256, 128)  # one per UNet
    dynamic_threshold: bool = True
    dynamic_threshold_percentile: float = field(default=0.95, metadata=_range(gt=0.0, le=1.0))
    cond_noise: CondNoiseConfig = field(default_factory=CondNoiseConfig)
    # A super-resolution UNet's sampling starts at this fraction of its timesteps from the upsampled low-res
    # try-on noised there (SDEdit) rather than from pure noise (1.0, the paper's); the steps are spread over
    # what is left.
    sr_start: float = field(default=1.0, metadata=_range(gt=0.0, le=1.0))


@dataclass
class DataConfig:
    # Shard specs: brace patterns, lists or ``pipe:`` commands. Empty means ``{data_dir}/train-*.tar``.
    train_shards: list[str] = field(default_factory=list)
    val_shards: list[str] = field(default_factory=list)
    num_workers: int = field(default=2, metadata=_range(ge=0))
    # Batches each loader worker keeps ready; more hides a store's latency (BENCHMARKS.md, "Shards from a store").
    prefetch_factor: int = field(default=2, metadata=_range(ge=1))
    # Shards from a store (http(s)://, pipe:; tryon_ds/data/remote.py): a read that brings no byte for this
    # long fails; a failed shard is read again this many times (doubling waits from shard_retry_wait_s), going
    # on after the samples already delivered, then skipped and counted.
    shard_timeout_s: float = field(default=60.0, metadata=_range(gt=0.0))
    shard_retries: int = field(default=3, metadata=_range(ge=0))
    shard_retry_wait_s: float = field(default=1.0, metadata=_range(ge=0.0))
    shuffle_buffer: int = field(default=1000, metadata=_range(ge=1))
    # Training streams restart their shard draw and shuffle buffer every this many batches, which bounds
    # what a resumed run must skip to see the same batches (tryon_ds/data/pipeline.py).
    segment_batches: int = field(default=200, metadata=_range(ge=1))
    # Virtual data streams; 0 = ranks x workers. Fix it to make the data order independent of the world
    # size (e.g. to compare a 1-rank run with gradient accumulation against a multi-rank run).
    streams: int = field(default=0, metadata=_range(ge=0))
    seed: int = 0
    hflip_prob: float = field(default=0.5, metadata=_range(ge=0.0, le=1.0))
    rotation_degrees: float = field(default=5.0, metadata=_range(ge=0.0, le=180.0))
    color_jitter: float = field(default=0.1, metadata=_range(ge=0.0, le=1.0))


@dataclass
class LoggingConfig:
    wandb: Literal["online", "offline", "disabled"] = "offline"
    wandb_project: str = "tryon-ds"
    tensorboard: bool = True
    progress_bar: bool = True
    keep_checkpoints: int = field(default=3, metadata=_range(ge=1))
    sample_count: int = field(default=4, metadata=_range(ge=1))
    # Sample grids during training use this many DDIM steps (every other rank waits meanwhile).
    preview_steps: int = field(default=25, metadata=_range(ge=1))
    # An online wandb that cannot reach its server gives up after this long and the run logs to TensorBoard.
    wandb_init_timeout_s: float = field(default=30.0, metadata=_range(gt=0.0))


@dataclass
class Config:
    # The original training guide's config.json keys (configs/config.json).
    data_dir: str = "./data"
    output_dir: str = "./outputs"
    checkpoint_dir: str = "./checkpoints"
    log_dir: str = "./logs"
    base_image_size: tuple[int, int] = (128, 128)
    sr_image_size: tuple[int, int] = (256, 256)
    timesteps: tuple[int, ...] = (1000, 1000)  # one per UNet
    channels: int = field(default=3, metadata=_range(ge=1))
    # Per GPU (per rank): the micro-batch; a step sees batch_size x gradient_accumulation_steps x ranks.
    batch_size: int = field(default=4, metadata=_range(ge=1))
    learning_rate: float = field(default=1e-4, metadata=_range(gt=0.0))
    num_epochs: int = field(default=100, metadata=_range(ge=1))
    gradient_accumulation_steps: int = field(default=1, metadata=_range(ge=1))
    max_grad_norm: float = field(default=1.0, metadata=_range(ge=0.0))
    warmup_steps: int = field(default=1000, metadata=_range(ge=0))
    cosine_decay_max_steps: int = field(default=50000, metadata=_range(ge=1))
    # After warm-up: cosine decay to min_lr_ratio over cosine_decay_max_steps, or constant (the paper).
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    validation_freq: int = field(default=1000, metadata=_range(ge=1))
    checkpoint_freq: int = field(default=5000, metadata=_range(ge=1))
    log_freq: int = field(default=100, metadata=_range(ge=1))
    sample_freq: int = field(default=2000, metadata=_range(ge=1))
    train_unet_number: int = field(default=1, metadata=_range(ge=1))
    use_ema: bool = True
    # true picks bf16 where the DeepSpeed config does not say; "fp16"/"bf16"/"no" are explicit.
    mixed_precision: bool | Literal["no", "fp16", "bf16"] = True

    # Beyond the guide's keys.
    ema_decay: float = field(default=0.9999, metadata=_range(ge=0.0, le=1.0))
    weight_decay: float = field(default=0.01, metadata=_range(ge=0.0))
    min_lr_ratio: float = field(default=0.1, metadata=_range(ge=0.0, le=1.0))
    max_steps: Optional[int] = field(default=None, metadata=_range(ge=1))
    # Stop after this many optimizer steps in a row were discarded for a non-finite loss or gradients.
    max_bad_steps: int = field(default=20, metadata=_range(ge=1))
    # A collective that waits longer than this (a rank died or hangs) fails the run instead of hanging it.
    dist_timeout_s: float = field(default=1800.0, metadata=_range(gt=0.0))
    seed: int = 0
    unet1: UNetSection = field(default_factory=lambda: preset("base"))
    unet2: UNetSection = field(default_factory=lambda: preset("sr"))
    unet3: Optional[UNetSection] = None  # the paper's 256 -> 1024 px stage (configs/cascade1024.yaml)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def unets(self) -> list[int]:
        """The UNets of the cascade, 1 .. N: as many as there are sections, with no gap."""
        return [n for n, key in enumerate(UNET_SECTIONS, 1) if getattr(self, key) is not None]

    def unet(self, unet_number: int) -> UNetSection:
        if unet_number not in self.unets:
            raise ConfigError(f"UNet {unet_number} is not defined: the config has no 'unet{unet_number}' section "
                              f"(its cascade is {', '.join(f'unet{n}' for n in self.unets)}); add one, e.g. "
                              "unet3: {preset: sr1024} as configs/cascade1024.yaml does")
        return getattr(self, f"unet{unet_number}")

    def image_size(self, unet_number: int) -> tuple[int, int]:
        """[H, W] of UNet ``unet_number``'s output (and of its training images, crops aside)."""
        if unet_number in GUIDE_SIZE_KEYS:
            return getattr(self, GUIDE_SIZE_KEYS[unet_number])
        return self.unet(unet_number).image_size

    def size_key(self, unet_number: int) -> str:
        return GUIDE_SIZE_KEYS.get(unet_number, f"unet{unet_number}.image_size")

    @property
    def num_keypoints(self) -> int:
        """Keypoints per pose, which every UNet that reads poses agrees on (validated)."""
        return next((self.unet(n).num_keypoints for n in self.unets if hasattr(self.unet(n), "num_keypoints")), 18)

    def crop_size(self, unet_number: int) -> tuple[int, int] | None:
        """[H, W] of the random crops UNet ``unet_number`` trains on, or None (whole images)."""
        return getattr(self.unet(unet_number), "crop_size", None)

    def validate(self) -> None:
        defined = [key for key in UNET_SECTIONS if getattr(self, key) is not None]
        if defined != list(UNET_SECTIONS[:len(defined)]):
            raise ConfigError(f"config sections {', '.join(defined)}: a cascade's UNets are numbered from 1 "
                              "without a gap")
        unets = self.unets
        for key in ("timesteps", "diffusion.sample_steps"):
            section, _, name = key.rpartition(".")
            values = getattr(getattr(self, section) if section else self, name)
            if len(values) != len(unets):
                raise ConfigError(f"config key '{key}': got {list(values)}, expected one entry per UNet of the "
                                  f"cascade ({len(unets)}: {', '.join(f'unet{n}' for n in unets)})")
        for key in ("base_image_size", "sr_image_size", "timesteps", "diffusion.sample_steps"):
            section, _, name = key.rpartition(".")
            values = getattr(getattr(self, section) if section else self, name)
            if any(v < 1 for v in values):
                raise ConfigError(f"config key '{key}': got {list(values)}, expected positive integers")
        if not (0 < self.train_unet_number <= len(unets)):
            raise ConfigError(f"config key 'train_unet_number': got {self.train_unet_number}, but the config "
                              f"defines no 'unet{self.train_unet_number}' section (its cascade is "
                              f"{', '.join(f'unet{n}' for n in unets)}); add one, e.g. unet3: {{preset: sr1024}} "
                              "as configs/cascade1024.yaml does")
        for number in unets:
            self._validate_unet(number)
        poses = {f"unet{n}.num_keypoints": self.unet(n).num_keypoints for n in unets if hasattr(self.unet(n), "num_keypoints")}
        if len(set(poses.values())) > 1:
            raise ConfigError(f"config keys {', '.join(poses)} differ ({', '.join(map(str, poses.values()))}); "
                              "all read the same pose arrays")
        if self.channels != 3:
            raise ConfigError(f"config key 'channels': got {self.channels}, only RGB (3) is supported")

    def _validate_unet(self, number: int) -> None:
        key, unet = f"unet{number}", self.unet(number)
        unet.validate(key)
        if number == 1 and not unet.INPUTS:
            raise ConfigError(f"config key 'unet1.preset': {unet.preset!r} is conditioned on a low-resolution image "
                              "alone, so it can only super-resolve (UNet 2 or later); UNet 1 needs a Parallel-UNet")
        if number in GUIDE_SIZE_KEYS and unet.image_size is not None:
            raise ConfigError(f"config key '{key}.image_size': UNet {number} takes its size from "
                              f"'{GUIDE_SIZE_KEYS[number]}'; leave it out")
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
        return dataclasses.asdict(self)

    def with_unet(self, number: int, unet: UNetSection, size: tuple[int, int] | None = None) -> "Config":
        """This config with UNet ``number`` replaced by ``unet`` (a cascade grown to it if need be: timesteps and
        sample steps repeat their last entry), at ``size`` [H, W] if given, each lower UNet at half the size of
        the one above; for the planner and the benchmarks, which name a preset rather than a cascade."""
        changes: dict[str, Any] = {}
        if size is not None:
            for k in range(number, 0, -1):
                scaled = (size[0] >> (number - k), size[1] >> (number - k))
                if k in GUIDE_SIZE_KEYS:
                    changes[GUIDE_SIZE_KEYS[k]] = scaled
                elif k == number:
                    unet = dataclasses.replace(unet, image_size=scaled)
                else:
                    changes[f"unet{k}"] = dataclasses.replace(self.unet(k), image_size=scaled)
        changes[f"unet{number}"] = unet
        grown = max(len(self.unets), number)

        def extend(values):
            return tuple(values[:grown]) + (values[-1],) * (grown - len(values))
        config = dataclasses.replace(self, **changes, timesteps=extend(self.timesteps),
                                     diffusion=dataclasses.replace(self.diffusion,
                                                                   sample_steps=extend(self.diffusion.sample_steps)))
        config.validate()
        return config


def preset(name: str) -> UNetSection:
    """The UNet config of a named preset: a Parallel-UNet or an Efficient-UNet by the preset's family."""
    for cls, presets in ((UNetConfig, PRESETS), (EfficientUNetConfig, EFFICIENT_PRESETS)):
        if name in presets:
            return cls(preset=name, **presets[name])
    raise ConfigError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS) + sorted(EFFICIENT_PRESETS)}")


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


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix or '<top level>'}': got {data!r}, expected a mapping of keys")
    data = dict(data)
    if cls is UNetSection:  # the preset decides the section's architecture
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
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise _unknown_key(full, list(fields))
        tp = hints[key]
        if key in UNET_SECTIONS and cls is Config:
            values[key] = None if value is None and key not in UNET_SECTIONS[:2] else _build(UNetSection, value, full)
            continue
        if dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value, full)
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
    """Build and validate a Config from a (possibly nested) mapping of keys."""
    config = _build(Config, data, "")
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
        else:
            out[key] = value
    return out


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

