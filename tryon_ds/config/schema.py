"""The configuration's schema: one typed tree, its defaults and bounds, and the checks that span keys.

The cascade is the list ``unets``: each entry one UNet, its preset and any architecture key overriding it
(the preset's family decides the architecture: a Parallel-UNet or an Efficient-UNet, tryon_ds/model/), its
``image_size``, ``timesteps``, ``sample_steps``, ``cond_noise`` levels and how it runs. UNet 1 makes the
try-on, each later one super-resolves the one before it; what each is conditioned on is its family's to say.
Messages name a UNet's keys as ``unets.<index>``; a file that spelled them otherwise has them renamed back
at load (tryon_ds/config/legacy.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from ..errors import ConfigError
from ..model import Conditioning, SpecError, UNetSpec, preset as model_preset, super_resolves
from ..model.spec import bounds


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


# What a quality pass logs (training/quality.py), and which way is better: PSNR/SSIM (whole image and garment
# region, always), paired LPIPS, and FID/KID against the pass's own ground truth where their weights are given.
QUALITY_KEYS = {"quality/psnr": "max", "quality/ssim": "max", "quality/psnr_region": "max",
                "quality/ssim_region": "max", "quality/lpips": "min", "quality/fid": "min", "quality/kid_x1000": "min"}


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
    # The quality pass: the trained UNet samples the first quality_samples validation samples (each rank a
    # share, a model copy on every rank) and is measured as tools/evaluate.py measures; 0: no pass.
    quality_freq: int = field(default=0, metadata=bounds(ge=0))
    quality_samples: int = field(default=16, metadata=bounds(ge=1))
    # The checkpoint kept as the best: a logged key ("quality/psnr_region", "val/loss", ...) and whether
    # higher is better; "" picks quality/psnr_region when passes run, else val/loss; "none" keeps no best
    # (a new best saves a checkpoint at its step).
    best_metric: str = ""
    best_mode: Literal["auto", "max", "min"] = "auto"
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

    @staticmethod
    def key(unet_number: int, name: str = "") -> str:
        """The config key of UNet ``unet_number`` (or of its key ``name``)."""
        return f"unets.{unet_number - 1}" + (f".{name}" if name else "")

    def image_size(self, unet_number: int) -> tuple[int, int]:
        """[H, W] of UNet ``unet_number``'s output (and of its training images, crops aside)."""
        return self.unet(unet_number).image_size

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
                              f"(its cascade is {', '.join(map(repr, map(self.key, self.unet_numbers)))}); add one, or "
                              "an entry to 'unets', e.g. unet3: {preset: sr1024} as configs/cascade1024.yaml does")
        for number in self.unet_numbers:
            self._validate_unet(number)
        poses = {self.key(n, "num_keypoints"): u.num_keypoints for n, u in zip(self.unet_numbers, self.unets)
                 if hasattr(u, "num_keypoints")}
        if len(set(poses.values())) > 1:
            raise ConfigError(f"config keys {', '.join(map(repr, poses))} differ ({', '.join(map(str, poses.values()))}); "
                              "all read the same pose arrays")
        if self.channels != 3:
            raise ConfigError(f"config key 'channels': got {self.channels}, only RGB (3) is supported")
        self.best()  # its errors at start-up, not at the first pass

    def best(self) -> tuple[str, str] | None:
        """(logged key, "max" or "min") the best checkpoint is chosen by; None when the run keeps no best
        (``best_metric: none``) or measures nothing to choose by (no quality pass, no validation)."""
        if self.best_metric == "none":
            return None
        measured = {**(QUALITY_KEYS if self.quality_freq else {}),
                    **({"val/loss": "min"} if self.validation_freq else {})}
        key = self.best_metric or ("quality/psnr_region" if self.quality_freq else "val/loss")
        if key not in measured:
            if not self.best_metric:
                return None
            raise ConfigError(f"config key 'best_metric': {key!r} is not measured by this run; it measures "
                              f"{', '.join(sorted(measured)) or 'nothing (quality_freq and validation_freq are 0)'}")
        return key, measured[key] if self.best_mode == "auto" else self.best_mode

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
        size, size_key = self.image_size(number), self.key(number, "image_size")
        if size is None:
            raise ConfigError(f"config key '{size_key}': UNet {number} needs its [H, W] output size, e.g. [1024, 768]")
        if any(s < 1 for s in size):
            raise ConfigError(f"config key '{size_key}': got {list(size)}, expected positive integers")
        factor = unet.size_factor
        if any(s % factor for s in size):
            raise ConfigError(f"config key '{size_key}': {list(size)} is not divisible by {factor}, which "
                              f"{unet.size_factor_reason(key)} need")
        crop = self.crop_size(number)
        if crop is not None:
            if any(c % factor for c in crop) or any(c < 1 or c > s for c, s in zip(crop, size)):
                raise ConfigError(f"config key '{key}.crop_size': {list(crop)} must be divisible by {factor} and "
                                  f"within the image ('{size_key}' {list(size)})")
        if number > 1:
            low, low_key = self.image_size(number - 1), self.key(number - 1, "image_size")
            if any(s % b for s, b in zip(size, low)) or size[0] * low[1] != size[1] * low[0]:
                raise ConfigError(f"config key '{size_key}': {list(size)} must be a multiple of '{low_key}' "
                                  f"{list(low)} with the same aspect ratio: UNet {number} super-resolves UNet "
                                  f"{number - 1}'s output")

    def to_dict(self) -> dict:
        """The config as a file of this release writes it (bundles, trainer_state.json): the cascade as a list."""
        return dataclasses.asdict(self)

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


