"""Parallel-UNet (TryOnDiffusion, Zhu et al. 2023).

Two UNets run side by side:
- the person-UNet denoises ``z_t`` given the clothing-agnostic image (and, in UNet 2, the upsampled
  low-resolution try-on) concatenated on channels;
- the garment-UNet encodes the segmented garment. At the person-UNet's attending (low-resolution) levels,
  person features cross-attend to the garment features of the same level: the "implicit warping".

Both are conditioned on the diffusion time, the person and garment poses (and, in UNet 2, the
noise-augmentation level of the low-resolution input) through FiLM in every residual block; the two pose
embeddings are also appended to every attention's key/value sequence.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention
from .pose import PoseEncoder

if TYPE_CHECKING:  # the config imports the presets of this package
    from ..config import UNetConfig

COND_KEYS = ("ca", "garment", "person_pose", "person_pose_valid", "garment_pose", "garment_pose_valid")


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class _Embedder(nn.Sequential):
    """Sinusoidal features of a timestep, then an MLP. The features are computed in fp32 (sin and cos of
    arguments up to ~1000 rad keep no precision in bf16/fp16) and handed to the MLP in its own dtype."""

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


class Attention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (itself for self-attention) plus the pose tokens."""

    def __init__(self, dim: int, heads: int, dim_head: int, backend: str):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.backend = heads, backend
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = ZeroLinear(inner, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, pose_tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        context = h if context is None else context
        kv = torch.cat([context, pose_tokens], dim=1)
        q = rearrange(self.to_q(h), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.to_kv(kv), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        out = attention(q, k, v, self.backend)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention to the garment features of the same level, feed-forward."""

    def __init__(self, dim: int, cond_dim: int, cfg: UNetConfig):
        super().__init__()
        self.pose_proj = nn.Linear(cond_dim, dim)
        self.self_attn = Attention(dim, cfg.attn_heads, cfg.attn_dim_head, cfg.attention_backend)
        self.garment_norm = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, cfg.attn_heads, cfg.attn_dim_head, cfg.attention_backend)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * cfg.ff_mult), nn.GELU(),
                                ZeroLinear(dim * cfg.ff_mult, dim))

    def forward(self, x: torch.Tensor, garment: torch.Tensor, pose_tokens: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        x = rearrange(x, "b c h w -> b (h w) c")
        garment = self.garment_norm(rearrange(garment, "b c h w -> b (h w) c"))
        pose = self.pose_proj(pose_tokens)
        x = x + self.self_attn(x, None, pose)
        x = x + self.cross_attn(x, garment, pose)
        x = x + self.ff(x)
        return rearrange(x, "b (h w) c -> b c h w", h=height)


def downsample(ch: int) -> nn.Module:
    return nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (c p1 p2) h w", p1=2, p2=2), nn.Conv2d(4 * ch, ch, 1))


def upsample(ch: int) -> nn.Module:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1))


class _Level(nn.Module):
    """One resolution of a UNet path: residual blocks, optional transformer blocks, optional resampling."""

    def __init__(self, in_ch: int, ch: int, skip_ch: int, n_res: int, n_attn: int, resample: nn.Module | None,
                 cond_dim: int, cfg: UNetConfig):
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock((in_ch if i == 0 else ch) + skip_ch, ch, cond_dim, cfg.groups, cfg.dropout) for i in range(n_res))
        self.attn = nn.ModuleList(TransformerBlock(ch, cond_dim, cfg) for _ in range(n_attn))
        self.resample = resample


class ParallelUNet(nn.Module):
    def __init__(self, cfg: UNetConfig, lowres_cond: bool = False, channels: int = 3):
        super().__init__()
        self.cfg, self.lowres_cond = cfg, lowres_cond
        self.checkpointing = cfg.checkpointing
        cond_dim = cfg.cond_dim
        widths = [cfg.dim * m for m in cfg.dim_mults]
        n_levels = len(widths)
        attn = list(cfg.attn_levels)
        depth = [cfg.attn_depth if a else 0 for a in attn]
        top_attn = attn.index(True)  # highest-resolution attending level; the garment decoder stops there

        self.time_embed = _Embedder(cond_dim)
        self.noise_aug_embed = _Embedder(cond_dim) if lowres_cond else None
        self.person_pose = PoseEncoder(cfg.num_keypoints, cfg.pose_hidden, cond_dim)
        self.garment_pose = PoseEncoder(cfg.num_keypoints, cfg.pose_hidden, cond_dim)

        in_ch = channels * (3 if lowres_cond else 2)  # z_t, ca image (, upsampled low-res try-on)
        self.person_in = nn.Conv2d(in_ch, cfg.dim, 7, padding=3)
        self.garment_in = nn.Conv2d(channels, cfg.dim, 7, padding=3)

        def encoder(with_attn: bool) -> nn.ModuleList:
            prev, levels = cfg.dim, []
            for i, w in enumerate(widths):
                levels.append(_Level(prev, w, 0, cfg.num_res_blocks[i], depth[i] if with_attn else 0,
                                     downsample(w) if i < n_levels - 1 else None, cond_dim, cfg))
                prev = w
            return nn.ModuleList(levels)

        def decoder(with_attn: bool, stop: int) -> nn.ModuleList:
            levels = []
            for i in reversed(range(stop, n_levels)):
                in_w = widths[min(i + 1, n_levels - 1)]
                levels.append(_Level(in_w, widths[i], widths[i], cfg.num_res_blocks[i],
                                     depth[i] if with_attn else 0, upsample(widths[i]) if i > stop else None,
                                     cond_dim, cfg))
            return nn.ModuleList(levels)

        mid = widths[-1]
        self.person_down = encoder(with_attn=True)
        self.person_mid = _Level(mid, mid, 0, 2, cfg.mid_attn_depth, None, cond_dim, cfg)
        self.person_up = decoder(with_attn=True, stop=0)
        self.person_out = nn.Sequential(nn.GroupNorm(cfg.groups, cfg.dim), nn.SiLU(),
                                        ZeroConv2d(cfg.dim, channels, 3, padding=1))
        # The garment-UNet has no output image: only its features at the attending levels are used.
        self.garment_down = encoder(with_attn=False)
        self.garment_mid = _Level(mid, mid, 0, 1, 0, None, cond_dim, cfg)
        self.garment_up = decoder(with_attn=False, stop=top_attn)

    # ------------------------------------------------------------------ helpers
    def _call(self, block: nn.Module, *args):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _conditioning(self, t, cond, lowres_noise_level):
        emb_p = self.person_pose(cond["person_pose"], cond["person_pose_valid"])
        emb_g = self.garment_pose(cond["garment_pose"], cond["garment_pose_valid"])
        c = self.time_embed(t) + emb_p + emb_g
        if self.lowres_cond:
            c = c + self.noise_aug_embed(lowres_noise_level)
        return c, torch.stack([emb_p, emb_g], dim=1)

    def _walk(self, down: nn.ModuleList, mid: "_Level", up: nn.ModuleList, x: torch.Tensor, c: torch.Tensor,
              visit: Callable[[tuple, "_Level", torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One UNet path, the same for the person and the garment: each level's residual blocks (the up
        path's take the matching down block's output as a skip), then ``visit(place, level, x)``, which may
        replace x, then the level's resampling. Places are ("down", level), ("mid",), ("up", level); the
        middle level calls it after its first block. A decoder cut short (the garment's) ends early."""
        skips = []
        for i, level in enumerate(down):
            for block in level.res:
                x = self._call(block, x, c)
                skips.append(x)
            x = visit(("down", i), level, x)
            if level.resample is not None:
                x = level.resample(x)
        for j, block in enumerate(mid.res):
            x = self._call(block, x, c)
            if j == 0:
                x = visit(("mid",), mid, x)
        for j, level in enumerate(up):
            for block in level.res:
                x = self._call(block, torch.cat([x, skips.pop()], dim=1), c)
            x = visit(("up", len(down) - 1 - j), level, x)
            if level.resample is not None:
                x = level.resample(x)
        return x

    # ------------------------------------------------------------------ forward
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict, lowres_noise_level: torch.Tensor | None = None,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        """x_t: (B, C, H, W) noisy image; t: (B,) integer timesteps; cond: the tensors named in COND_KEYS
        (and ``lowres`` for UNet 2); drop_cond: (B,) bool, True where the try-on conditioning is replaced by
        its null value (classifier-free guidance)."""
        if drop_cond is not None:
            cond = drop_conditioning(cond, drop_cond)
        if self.cfg.channels_last:  # the convolutions propagate the layout from their inputs
            x_t = x_t.contiguous(memory_format=torch.channels_last)
            cond = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in cond.items()}
        c, pose_tokens = self._conditioning(t, cond, lowres_noise_level)

        garment_feats = {}

        def keep(place, level, x):  # the garment features the person stream attends to
            garment_feats[place] = x
            return x

        def attend(place, level, x):  # the implicit warping: attend to the garment at the same place
            for block in level.attn:
                x = self._call(block, x, garment_feats[place], pose_tokens)
            return x

        self._walk(self.garment_down, self.garment_mid, self.garment_up, self.garment_in(cond["garment"]), c, keep)
        inputs = [x_t, cond["ca"]] + ([cond["lowres"]] if self.lowres_cond else [])
        x = self._walk(self.person_down, self.person_mid, self.person_up, self.person_in(torch.cat(inputs, dim=1)),
                       c, attend)
        return self.person_out(x)


def drop_conditioning(cond: dict, drop: torch.Tensor) -> dict:
    """Null the try-on conditioning (ca image, garment, both poses) where ``drop`` is True. UNet 2's
    low-resolution input is kept: it is the image being super-resolved, not a guidance signal."""
    keep = ~drop
    out = dict(cond)
    for key in ("ca", "garment", "person_pose", "garment_pose"):
        out[key] = cond[key] * keep.view(-1, *[1] * (cond[key].dim() - 1)).to(cond[key].dtype)
    for key in ("person_pose_valid", "garment_pose_valid"):
        out[key] = cond[key] & keep[:, None]
    return out
