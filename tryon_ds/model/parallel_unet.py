"""Parallel-UNet (TryOnDiffusion, Zhu et al. 2023, Sec. 3 and Appendix A).

Two UNets run side by side:
- the person-UNet denoises ``z_t`` given the clothing-agnostic image (and, in UNet 2, the upsampled
  low-resolution try-on) concatenated on channels;
- the garment-UNet encodes the segmented garment. At the attending resolutions (``attn_levels``: 32 and 16
  px in the paper's 128 px UNet, 16 px in its 256 px one) **every** residual block of the person-UNet is
  followed by self-attention, whose keys and values also hold one token per pose keypoint, then
  cross-attention to the features of the matching block of the garment-UNet: the "implicit warping". The
  garment-UNet stops after the last block whose features the person-UNet reads.

Both UNets are conditioned through FiLM in every residual block on one vector: the diffusion time, the noise
level of each noise-augmented conditioning image (the ca image and the garment; in UNet 2 also the low-res
try-on), and each pose pooled by attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from einops import rearrange
from torch import nn

from ..batch import CA, GARMENT, GARMENT_POSE, PERSON_POSE
from .attention import attention
from .blocks import Embedder, ResBlock, ZeroConv2d, ZeroLinear, downsample, run_block, upsample
from .pose import AttentionPool, PoseTokens
from .spec import LOWRES, Conditioning, SpecError, UNetSpec, bounds


@dataclass
class ParallelUNetConfig(UNetSpec):
    """A Parallel-UNet: the try-on UNets of the paper (1 and 2), and any later one conditioned like them."""

    ARCH = "parallel"

    preset: str = "tiny"
    dim: int = field(default=32, metadata=bounds(ge=8))
    dim_mults: tuple[int, ...] = (1, 2, 2)
    # Residual blocks per level of the person-UNet; the garment-UNet uses the same counts.
    num_res_blocks: tuple[int, ...] = (1, 1, 1)
    # Per level: whether every person-UNet block there is followed by self-attention (with the pose tokens)
    # and cross-attention to the garment (the paper: the two lowest resolutions of UNet 1, the lowest of
    # UNet 2). The garment-UNet is built only as far as the attending blocks need.
    attn_levels: tuple[bool, ...] = (False, True, True)
    # Side of the square patches the highest attending level attends on: 1 attends on every pixel (the paper);
    # 2 on 2x2 patches, one token of 4x the width each (fashn-AI/tryondiffusion's choice at 32 px): 16x fewer
    # attention scores there. BENCHMARKS.md, "Patch attention", has what it buys and what it costs.
    attn_patch: int = field(default=1, metadata=bounds(ge=1))
    attn_heads: int = field(default=4, metadata=bounds(ge=1))
    attn_dim_head: int = field(default=16, metadata=bounds(ge=4))
    # Width of the FiLM conditioning vector and of the pose tokens (one per keypoint).
    cond_dim: int = field(default=128, metadata=bounds(ge=8))
    pose_dim: int = field(default=64, metadata=bounds(ge=8))
    num_keypoints: int = field(default=18, metadata=bounds(ge=1))
    groups: int = field(default=8, metadata=bounds(ge=1))
    dropout: float = field(default=0.0, metadata=bounds(ge=0.0, le=1.0))
    attention_backend: Literal["sdpa", "xformers", "math"] = "sdpa"

    def conditioning(self, super_resolves: bool) -> Conditioning:
        """The clothing-agnostic person, the garment and both poses, all dropped together for guidance; a
        super-resolving one also the upsampled low-res try-on, never dropped: it is the image being
        super-resolved. The images are noise-augmented, the poses are not."""
        lowres = (LOWRES,) if super_resolves else ()
        return Conditioning(images=(CA, GARMENT) + lowres, poses=(PERSON_POSE, GARMENT_POSE),
                            noisy=(CA, GARMENT) + lowres, guided=(CA, GARMENT, PERSON_POSE, GARMENT_POSE),
                            preview=(CA, GARMENT))

    @property
    def top_attending_level(self) -> int:
        return list(self.attn_levels).index(True)

    @property
    def size_factor(self) -> int:
        # One halving between consecutive levels; the patches tile the highest attending level.
        return math.lcm(2 ** (len(self.dim_mults) - 1), 2 ** self.top_attending_level * self.attn_patch)

    def size_factor_reason(self, key: str) -> str:
        reason = super().size_factor_reason(key)
        if self.attn_patch == 1:
            return reason
        return f"{reason} and its {self.attn_patch}x{self.attn_patch} patches ('{key}.attn_patch') at level " \
               f"{self.top_attending_level}"

    def validate(self, key: str, super_resolves: bool) -> None:
        super().validate(key, super_resolves)
        n = len(self.dim_mults)
        for name in ("num_res_blocks", "attn_levels"):
            if len(getattr(self, name)) != n:
                raise SpecError(
                    f"config key '{key}.{name}': has {len(getattr(self, name))} entries, expected one per "
                    f"level of '{key}.dim_mults' ({n})")
        if not any(self.attn_levels):
            raise SpecError(f"config key '{key}.attn_levels': at least one level must attend, "
                            "or the garment never reaches the person stream")
        for i, m in enumerate(self.dim_mults):
            if m < 1:
                raise SpecError(f"config key '{key}.dim_mults[{i}]': got {m}, expected an integer >= 1")
            if (self.dim * m) % self.groups:
                raise SpecError(f"config key '{key}.groups': {self.groups} does not divide the level-{i} "
                                f"width {self.dim * m} (dim x dim_mults[{i}])")
        if self.pose_dim % self.attn_heads:
            raise SpecError(f"config key '{key}.pose_dim': {self.pose_dim} is not divisible by "
                            f"'{key}.attn_heads' ({self.attn_heads}), which the pose pooling needs")


class Attention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (default: ``x`` itself) and optional extra tokens."""

    def __init__(self, dim: int, heads: int, dim_head: int, backend: str):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.backend = heads, backend
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = ZeroLinear(inner, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                extra: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x)
        kv = h if context is None else context
        if extra is not None:
            kv = torch.cat([kv, extra], dim=1)
        q = rearrange(self.to_q(h), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.to_kv(kv), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        out = attention(q, k, v, self.backend)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class WarpBlock(nn.Module):
    """What follows a person-UNet residual block at an attending resolution: self-attention over the person
    features and the pose tokens, then cross-attention to the matching garment-UNet block's features. A token
    is a pixel, or a ``patch`` x ``patch`` square of them with their features side by side."""

    def __init__(self, dim: int, cfg: ParallelUNetConfig, patch: int = 1):
        super().__init__()
        width = dim * patch * patch
        self.patch = patch
        self.pose_proj = nn.Linear(cfg.pose_dim, width)
        self.self_attn = Attention(width, cfg.attn_heads, cfg.attn_dim_head, cfg.attention_backend)
        self.garment_norm = nn.LayerNorm(width)
        self.cross_attn = Attention(width, cfg.attn_heads, cfg.attn_dim_head, cfg.attention_backend)

    def forward(self, x: torch.Tensor, garment: torch.Tensor, pose_tokens: torch.Tensor) -> torch.Tensor:
        p = self.patch
        height = x.shape[2] // p
        to_tokens = "b c (h p1) (w p2) -> b (h w) (c p1 p2)"
        x = rearrange(x, to_tokens, p1=p, p2=p)
        x = x + self.self_attn(x, extra=self.pose_proj(pose_tokens))
        x = x + self.cross_attn(x, self.garment_norm(rearrange(garment, to_tokens, p1=p, p2=p)))
        return rearrange(x, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=height, p1=p, p2=p)


class _Level(nn.Module):
    """One resolution of a UNet path: residual blocks (each followed by a WarpBlock where the level
    attends), then an optional resampling to the next level's width."""

    def __init__(self, ch: int, skip_ch: int, n_res: int, attends: bool, resample: nn.Module | None,
                 cond_dim: int, cfg: ParallelUNetConfig, patch: int = 1):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(ch + skip_ch, ch, cond_dim, cfg.groups, cfg.dropout) for _ in range(n_res))
        self.attn = nn.ModuleList(WarpBlock(ch, cfg, patch) for _ in range(n_res)) if attends else None
        self.resample = resample


class ParallelUNet(nn.Module):
    def __init__(self, cfg: ParallelUNetConfig, super_resolves: bool = False, channels: int = 3):
        super().__init__()
        self.cfg, self.super_resolves = cfg, super_resolves
        self.conditioning = cfg.conditioning(super_resolves)
        self.checkpointing = cfg.checkpointing
        cond_dim = cfg.cond_dim
        widths = [cfg.dim * m for m in cfg.dim_mults]
        n_levels = len(widths)
        attends = list(cfg.attn_levels)
        top = cfg.top_attending_level  # the garment decoder ends there
        patch = [cfg.attn_patch if i == top else 1 for i in range(n_levels)]

        self.time_embed = Embedder(cond_dim)
        self.noise_level_embed = nn.ModuleDict({k: Embedder(cond_dim) for k in self.conditioning.noisy})
        self.pose_tokens = PoseTokens(cfg.num_keypoints, cfg.pose_dim)
        self.pose_pool = nn.ModuleList(AttentionPool(cfg.pose_dim, cfg.attn_heads, cond_dim, cfg.attention_backend)
                                       for _ in range(2))  # the person's pose, the garment wearer's

        in_ch = channels * (3 if super_resolves else 2)  # z_t, ca image (, upsampled low-res try-on)
        self.person_in = nn.Conv2d(in_ch, widths[0], 7, padding=3)
        self.garment_in = nn.Conv2d(channels, widths[0], 7, padding=3)

        def path(person: bool):
            """Levels down, the middle, levels up (the garment's cut after its top attending level)."""
            down = nn.ModuleList(
                _Level(w, 0, cfg.num_res_blocks[i], person and attends[i],
                       downsample(w, widths[i + 1]) if i < n_levels - 1 else None, cond_dim, cfg, patch[i])
                for i, w in enumerate(widths))
            mid = _Level(widths[-1], 0, 2, person and attends[-1], None, cond_dim, cfg, patch[-1])
            last = 0 if person else top
            up = nn.ModuleList(
                _Level(widths[i], widths[i], cfg.num_res_blocks[i], person and attends[i],
                       upsample(widths[i], widths[i - 1]) if i > last else None, cond_dim, cfg, patch[i])
                for i in reversed(range(last, n_levels)))
            return down, mid, up

        self.person_down, self.person_mid, self.person_up = path(person=True)
        self.person_out = nn.Sequential(nn.GroupNorm(cfg.groups, widths[0]), nn.SiLU(),
                                        ZeroConv2d(widths[0], channels, 3, padding=1))
        # The garment-UNet has no output image: only its features at the attending blocks are used.
        self.garment_down, self.garment_mid, self.garment_up = path(person=False)

    # ------------------------------------------------------------------ helpers
    def _call(self, block: nn.Module, *args):
        return run_block(block, self.checkpointing, *args)

    def _conditioning(self, t, cond, noise_levels):
        """The FiLM vector and the pose tokens."""
        tokens = self.pose_tokens(cond[PERSON_POSE], cond[f"{PERSON_POSE}_valid"], cond[GARMENT_POSE],
                                  cond[f"{GARMENT_POSE}_valid"])
        k = self.cfg.num_keypoints
        c = self.time_embed(t) + self.pose_pool[0](tokens[:, :k]) + self.pose_pool[1](tokens[:, k:])
        for name in self.conditioning.noisy:
            # Levels are fractions in [0, 1]; the embedding's sinusoids want the timestep scale.
            c = c + self.noise_level_embed[name](noise_levels[name] * 1000)
        return c, tokens

    def _walk(self, down: nn.ModuleList, mid: _Level, up: nn.ModuleList, x: torch.Tensor, c: torch.Tensor,
              visit: Callable[[tuple, _Level, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One UNet path, the same for the person and the garment: each level's residual blocks (the up
        path's take the matching down block's output as a skip), ``visit(place, level, j, x)`` after block j,
        which may replace x, then the level's resampling. Places are ("down", level), ("mid",), ("up", level).
        A decoder cut short (the garment's) ends early."""
        skips = []
        for i, level in enumerate(down):
            for j, block in enumerate(level.res):
                x = visit(("down", i), level, j, self._call(block, x, c))
                skips.append(x)
            if level.resample is not None:
                x = level.resample(x)
        for j, block in enumerate(mid.res):
            x = visit(("mid",), mid, j, self._call(block, x, c))
        for k, level in enumerate(up):
            i = len(down) - 1 - k
            for j, block in enumerate(level.res):
                x = visit(("up", i), level, j, self._call(block, torch.cat([x, skips.pop()], dim=1), c))
            if level.resample is not None:
                x = level.resample(x)
        return x

    # ------------------------------------------------------------------ forward
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict, noise_levels: dict[str, torch.Tensor],
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        """x_t: (B, C, H, W) noisy image; t: (B,) integer timesteps; cond: the tensors its conditioning's
        ``keys`` name, the images already noise-augmented to ``noise_levels`` ({name: (B,) fractions in [0, 1]}
        for each noisy input); drop_cond: (B,) bool, True where the try-on conditioning is replaced by its
        null value (classifier-free guidance)."""
        if drop_cond is not None:
            cond = self.conditioning.drop(cond, drop_cond)
        if self.cfg.channels_last:  # the convolutions propagate the layout from their inputs
            x_t = x_t.contiguous(memory_format=torch.channels_last)
            cond = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in cond.items()}
        c, pose_tokens = self._conditioning(t, cond, noise_levels)

        garment_feats = {}

        def keep(place, level, j, x):  # the garment features the person stream attends to
            garment_feats[place + (j,)] = x
            return x

        def attend(place, level, j, x):  # the implicit warping, after every block of an attending level
            if level.attn is None:
                return x
            return self._call(level.attn[j], x, garment_feats[place + (j,)], pose_tokens)

        self._walk(self.garment_down, self.garment_mid, self.garment_up, self.garment_in(cond[GARMENT]), c, keep)
        inputs = [x_t, cond[CA]] + ([cond[LOWRES]] if self.super_resolves else [])
        x = self._walk(self.person_down, self.person_mid, self.person_up, self.person_in(torch.cat(inputs, dim=1)),
                       c, attend)
        return self.person_out(x)
