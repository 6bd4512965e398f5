"""The building blocks both UNet families share (tryon_ds/model/parallel_unet.py, efficient_unet.py): the
timestep embedding, the FiLM-modulated residual block, zero-initialised output layers and the resampling
layers, so that each exists once."""
from __future__ import annotations

import math

import torch
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class Embedder(nn.Sequential):
    """Sinusoidal features of a timestep (or a noise level on the timestep scale), then an MLP. The features
    are computed in fp32 (sin and cos of arguments up to ~1000 rad keep no precision in bf16/fp16) and
    handed to the MLP in its own dtype."""

    def __init__(self, dim: int):
        super().__init__(SinusoidalEmbedding(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = self[0](t).to(self[1].weight.dtype)
        for layer in list(self)[1:]:
            x = layer(x)
        return x


class _ZeroInit:
    """Zero-initialised output layers: every residual branch starts as the identity. Zeroed in the layer's
    own reset_parameters, i.e. inside its __init__, because deepspeed.zero.Init partitions a layer's
    parameters as soon as its __init__ returns; zeroing them afterwards would touch empty placeholders."""

    def reset_parameters(self) -> None:
        super().reset_parameters()  # draw as a plain layer would, so the other layers' seeded values stay
        for p in self.parameters(recurse=False):
            nn.init.zeros_(p)


class ZeroConv2d(_ZeroInit, nn.Conv2d):
    pass


class ZeroLinear(_ZeroInit, nn.Linear):
    pass


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with FiLM (scale, shift) from the conditioning vector."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, groups: int, dropout: float):
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(groups, in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * out_ch))
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.block2 = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), ZeroConv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.block1(x)
        scale, shift = rearrange(self.film(cond), "b (two c) -> two b c 1 1", two=2)
        h = self.block2(self.norm2(h) * (1 + scale) + shift)
        return h + self.skip(x)


def downsample(ch: int, out_ch: int) -> nn.Module:
    """Space-to-depth then a 1x1 convolution (what imagen-pytorch uses: no information is thrown away)."""
    return nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (c p1 p2) h w", p1=2, p2=2), nn.Conv2d(4 * ch, out_ch, 1))


def upsample(ch: int, out_ch: int) -> nn.Module:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, out_ch, 3, padding=1))


def run_block(block: nn.Module, checkpointing: bool, *args):
    """``block(*args)``, under activation checkpointing when asked for and gradients are being taken."""
    if checkpointing and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
