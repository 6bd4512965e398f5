"""What every UNet of a cascade is configured with beside its architecture, and how a UNet family declares
what it is conditioned on. Each family (parallel_unet.py, efficient_unet.py) subclasses ``UNetSpec`` with its
architecture's keys and answers ``conditioning(super_resolves)``; everything that depends on the conditioning
(the batch layout, what guidance drops, which inputs are noise-augmented, a random batch, previews) is
derived from that answer, here and in tryon_ds/cascade.py.

This package imports nothing above it: a spec that is wrong raises ``SpecError`` (a ValueError) whose message
names the key; tryon_ds/config/ reports it as a configuration error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import torch

from ..batch import LOWRES  # noqa: F401  (the input a super-resolving UNet reads: the UNet before it's output)


def super_resolves(unet_number: int) -> bool:
    """Whether UNet ``unet_number`` of a cascade super-resolves: every UNet after the first takes the one
    before it as its input."""
    return unet_number > 1


class SpecError(ValueError):
    """A UNet spec that cannot be built; the message names the key, the value and what is allowed."""


def bounds(ge=None, gt=None, le=None) -> dict:
    """A field's allowed range, as field metadata: tryon_ds/config/typed.py checks it when a file is loaded."""
    return {"ge": ge, "gt": gt, "le": le}


@dataclass(frozen=True)
class Conditioning:
    """What a UNet reads beside its noisy image, at its place in the cascade."""
    images: tuple[str, ...]  # at the UNet's size; LOWRES at the size of the UNet before it
    poses: tuple[str, ...]  # (K, 2) keypoints in [0, 1], each with a (K,) ``{name}_valid`` mask
    noisy: tuple[str, ...]  # noise-augmented in training and at a fixed level when sampling; the UNet is told it
    guided: tuple[str, ...]  # what classifier-free guidance drops (a pose with its mask); never LOWRES
    preview: tuple[str, ...]  # what a sample grid shows beside the sample

    @property
    def inputs(self) -> tuple[str, ...]:
        """The batch keys beside the target."""
        return self.images + self.poses

    @property
    def keys(self) -> tuple[str, ...]:
        """Every tensor the UNet reads from its conditioning."""
        return self.images + self.poses + tuple(f"{p}_valid" for p in self.poses)

    @property
    def sample_inputs(self) -> tuple[str, ...]:
        """What a training sample must hold beside its target: LOWRES is made from the target."""
        return tuple(k for k in self.inputs if k != LOWRES)

    @property
    def super_resolves(self) -> bool:
        return LOWRES in self.images

    def drop(self, cond: dict, drop: torch.Tensor) -> dict:
        """``cond`` with what guidance drops nulled where ``drop`` ((B,) bool) is True."""
        keep = ~drop
        out = dict(cond)
        for key in self.guided:
            out[key] = cond[key] * keep.view(-1, *[1] * (cond[key].dim() - 1)).to(cond[key].dtype)
            if key in self.poses:
                out[f"{key}_valid"] = cond[f"{key}_valid"] & keep[:, None]
        return out


@dataclass
class UNetSpec:
    """One UNet of the cascade: which preset it starts from (any architecture key beside it overrides the
    preset's value), the size it makes, its diffusion and how it runs."""

    ARCH: ClassVar[str]  # the model it builds (tryon_ds/model/__init__.py)

    preset: str = ""
    # [H, W] of its output (and of its training images, crops aside); each UNet after the first is an integer
    # multiple of the one before, at the same aspect ratio.
    image_size: Optional[tuple[int, int]] = None
    timesteps: int = field(default=1000, metadata=bounds(ge=1))
    sample_steps: int = field(default=256, metadata=bounds(ge=1))
    # Sampling noise level of each noise-augmented input, a fraction of the timesteps (0: clean; the levels
    # chosen by a search on the demo, BENCHMARKS.md). Inputs not named stay clean.
    cond_noise: dict[str, float] = field(default_factory=dict)
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

    crop_size: ClassVar[Optional[tuple[int, int]]] = None  # a family that trains on crops makes it a field

    def conditioning(self, super_resolves: bool) -> Conditioning:
        raise NotImplementedError

    @property
    def size_factor(self) -> int:
        """What the image's sides must be divisible by."""
        raise NotImplementedError

    def size_factor_reason(self, key: str) -> str:
        """What needs ``size_factor``, for a message about ``key``."""
        return f"the {len(self.dim_mults)} levels of '{key}'"

    def validate(self, key: str, super_resolves: bool) -> None:
        """Raise SpecError naming ``key``'s sub-keys if this spec cannot be built at its place."""
        noisy = self.conditioning(super_resolves).noisy
        for name, level in self.cond_noise.items():
            if name not in noisy:
                raise SpecError(f"config key '{key}.cond_noise.{name}': this UNet noise-augments "
                                f"{', '.join(noisy) or 'nothing'}")
            if not 0.0 <= level <= 1.0:
                raise SpecError(f"config key '{key}.cond_noise.{name}': got {level}, expected a value >= 0 and <= 1")
