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

from typing import TYPE_CHECKING

import torch
from torch import nn

from .blocks import Embedder, ResBlock, ZeroConv2d, downsample, run_block, upsample

if TYPE_CHECKING:  # the config imports the presets of this package
    from ..config import EfficientUNetConfig

SKIP_SCALE = 2 ** -0.5


class _Level(nn.Module):
    def __init__(self, blocks: list[ResBlock], resample: nn.Module):
        super().__init__()
        self.res = nn.ModuleList(blocks)
        self.resample = resample


class EfficientUNet(nn.Module):
    # What the cascade asks of every UNet (tryon_ds/cascade.py): the conditioning it reads, which of its
    # inputs are noise-augmented, which classifier-free guidance drops, and what a preview shows beside it.
    cond_keys = ("lowres",)
    noisy_inputs = ("lowres",)
    guided: tuple[str, ...] = ()
    preview = ("lowres",)

    def __init__(self, cfg: EfficientUNetConfig, lowres_cond: bool = True, channels: int = 3):
        super().__init__()
        if not lowres_cond:
            raise ValueError("an Efficient U-Net is conditioned on a low-resolution image only: it cannot be UNet 1")
        self.cfg = cfg
        widths = [cfg.dim * m for m in cfg.dim_mults]

        def block(in_ch, out_ch):
            return ResBlock(in_ch, out_ch, cfg.cond_dim, cfg.groups, cfg.dropout)

        self.time_embed = Embedder(cfg.cond_dim)
        self.noise_level_embed = nn.ModuleDict({"lowres": Embedder(cfg.cond_dim)})
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
        lowres = cond["lowres"]
        if self.cfg.channels_last:
            x_t, lowres = (v.contiguous(memory_format=torch.channels_last) for v in (x_t, lowres))
        # Levels are fractions in [0, 1]; the embedding's sinusoids want the timestep scale.
        c = self.time_embed(t) + self.noise_level_embed["lowres"](noise_levels["lowres"] * 1000)
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
