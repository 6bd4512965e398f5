"""Imagen's Efficient U-Net (Saharia et al. 2022, Appendix B): the paper's third UNet, which super-resolves
the 256 px try-on to 1024 px conditioned on that try-on alone (no garment, no pose).

What makes it efficient, as Imagen describes it and imagen-pytorch (``memory_efficient=True``) builds it:
- each down level downsamples *before* its residual blocks and each up level upsamples *after* them, so
  the blocks of the first level already run at half the image's resolution; at full resolution there are
  only the input convolution, one residual block on the way in and one on the way out, joined by a skip;
- more residual blocks at the low resolutions (2/4/8/8 in the 1024 px model), where they are cheap;
- skip connections scaled by 1/sqrt(2);
- no attention: Imagen's 1024 px model attends only to text, which try-on has none of.
Every residual block is FiLM-modulated by the diffusion time and the low-res image's noise level (noise
conditioning augmentation), and the output convolution also sees the low-res image itself, as in
imagen-pytorch. The network is fully convolutional: trained on crops, it samples the whole image.

Its conditioning is the upsampled low-resolution image alone, which is never dropped: classifier-free
guidance has nothing to drop here, so this UNet samples at guidance 1 whatever the config's guidance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .blocks import Embedder, ResBlock, ZeroConv2d, downsample, run_block, upsample
from .spec import LOWRES, Conditioning, SpecError, UNetSpec, bounds

SKIP_SCALE = 2 ** -0.5


@dataclass
class EfficientUNetConfig(UNetSpec):
    """An Efficient-UNet (Imagen's): a super-resolution UNet conditioned on the low-res image alone, the
    paper's UNet 3."""

    ARCH = "efficient"

    preset: str = "tiny-sr3"
    # Trained on random crops of this size ([H, W]) of the target and of its upsampled low-res image (Imagen:
    # 256 px crops of 1024 px images), sampled on the whole image; null trains on whole images.
    crop_size: Optional[tuple[int, int]] = None
    dim: int = field(default=32, metadata=bounds(ge=8))
    dim_mults: tuple[int, ...] = (1, 2, 4)
    # Residual blocks per level, each level downsampling before its blocks: more at the low resolutions.
    num_res_blocks: tuple[int, ...] = (1, 2, 2)
    cond_dim: int = field(default=128, metadata=bounds(ge=8))
    groups: int = field(default=8, metadata=bounds(ge=1))
    dropout: float = field(default=0.0, metadata=bounds(ge=0.0, le=1.0))

    def conditioning(self, super_resolves: bool) -> Conditioning:
        """The upsampled low-res image alone, noise-augmented and never dropped: guidance has nothing to drop,
        so this UNet samples at guidance 1."""
        if not super_resolves:
            raise SpecError(f"preset {self.preset!r} is an Efficient-UNet, conditioned on a low-resolution image "
                            "alone: it can only super-resolve (UNet 2 or later), not start a cascade")
        return Conditioning(images=(LOWRES,), poses=(), noisy=(LOWRES,), guided=(), preview=(LOWRES,))

    @property
    def size_factor(self) -> int:
        return 2 ** len(self.dim_mults)  # every level downsamples, the first one included

    def validate(self, key: str, super_resolves: bool) -> None:
        super().validate(key, super_resolves)
        if len(self.num_res_blocks) != len(self.dim_mults):
            raise SpecError(f"config key '{key}.num_res_blocks': has {len(self.num_res_blocks)} entries, expected "
                            f"one per level of '{key}.dim_mults' ({len(self.dim_mults)})")
        for i, (m, n) in enumerate(zip(self.dim_mults, self.num_res_blocks)):
            if m < 1 or n < 1:
                raise SpecError(f"config key '{key}': level {i} has dim_mults {m} and num_res_blocks {n}, "
                                "expected integers >= 1")
        for width in [self.dim] + [self.dim * m for m in self.dim_mults]:
            if width % self.groups:
                raise SpecError(f"config key '{key}.groups': {self.groups} does not divide the width {width}")


class _Level(nn.Module):
    def __init__(self, blocks: list[ResBlock], resample: nn.Module):
        super().__init__()
        self.res = nn.ModuleList(blocks)
        self.resample = resample


class EfficientUNet(nn.Module):
    def __init__(self, cfg: EfficientUNetConfig, super_resolves: bool = True, channels: int = 3):
        super().__init__()
        self.conditioning = cfg.conditioning(super_resolves)
        self.cfg = cfg
        widths = [cfg.dim * m for m in cfg.dim_mults]

        def block(in_ch, out_ch):
            return ResBlock(in_ch, out_ch, cfg.cond_dim, cfg.groups, cfg.dropout)

        self.time_embed = Embedder(cfg.cond_dim)
        self.noise_level_embed = nn.ModuleDict({LOWRES: Embedder(cfg.cond_dim)})
        self.conv_in = nn.Conv2d(2 * channels, cfg.dim, 7, padding=3)  # z_t and the upsampled low-res image
        self.block_in = block(cfg.dim, cfg.dim)
        outer = [cfg.dim, *widths[:-1]]  # each level's width above it
        self.down = nn.ModuleList(_Level([block(w, w) for _ in range(n)], downsample(prev, w))
                                  for prev, w, n in zip(outer, widths, cfg.num_res_blocks))
        self.mid = nn.ModuleList([block(widths[-1], widths[-1]) for _ in range(2)])
        self.up = nn.ModuleList(_Level([block(2 * w, w) for _ in range(n)], upsample(w, prev))
                                for prev, w, n in reversed(list(zip(outer, widths, cfg.num_res_blocks))))
        # The full-resolution features skip to the output block (imagen-pytorch's
        # init_conv_to_final_conv_residual): every other path to the output passes through a 2x downsampling,
        # and the per-pixel noise a denoiser must name lives at full resolution.
        self.block_out = block(2 * cfg.dim, cfg.dim)
        self.norm_out = nn.Sequential(nn.GroupNorm(cfg.groups, cfg.dim), nn.SiLU())
        self.conv_out = ZeroConv2d(cfg.dim + channels, channels, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict, noise_levels: dict[str, torch.Tensor],
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        """x_t: (B, C, H, W) noisy image; t: (B,) integer timesteps; cond["lowres"]: the low-res image upsampled
        to x_t's size and noise-augmented to ``noise_levels["lowres"]`` ((B,) fractions in [0, 1])."""
        if drop_cond is not None:
            raise ValueError("the Efficient U-Net has no conditioning that classifier-free guidance drops")
        lowres = cond[LOWRES]
        if self.cfg.channels_last:
            x_t, lowres = (v.contiguous(memory_format=torch.channels_last) for v in (x_t, lowres))
        # Levels are fractions in [0, 1]; the embedding's sinusoids want the timestep scale.
        c = self.time_embed(t) + self.noise_level_embed[LOWRES](noise_levels[LOWRES] * 1000)
        ckpt = self.cfg.checkpointing
        x = top = run_block(self.block_in, ckpt, self.conv_in(torch.cat([x_t, lowres], dim=1)), c)
        skips = []
        for level in self.down:
            x = level.resample(x)
            for blk in level.res:
                x = run_block(blk, ckpt, x, c)
                skips.append(x)
        for blk in self.mid:
            x = run_block(blk, ckpt, x, c)
        for level in self.up:
            for blk in level.res:
                x = run_block(blk, ckpt, torch.cat([x, skips.pop() * SKIP_SCALE], dim=1), c)
            x = level.resample(x)
        x = run_block(self.block_out, ckpt, torch.cat([x, top * SKIP_SCALE], dim=1), c)
        return self.conv_out(torch.cat([self.norm_out(x), lowres], dim=1))
