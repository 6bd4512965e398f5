"""Gaussian diffusion: noise schedules, the training target, and DDPM/DDIM sampling.

Timesteps are discrete, ``0 .. T-1``. Sampling with fewer steps than ``T`` walks a subsequence of the
timesteps; DDPM and DDIM are the two ends of one update (eta = 1 is DDPM's ancestral step on the
respaced schedule, eta = 0 is deterministic DDIM), so both share one loop.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def make_betas(schedule: str, timesteps: int) -> torch.Tensor:
    if schedule == "linear":
        scale = 1000 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    if schedule == "cosine":  # Nichol & Dhariwal 2021
        s = 0.008
        x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
        f = torch.cos((x / timesteps + s) / (1 + s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, 0.999)
    raise ValueError(f"unknown noise schedule {schedule!r}; expected 'cosine' or 'linear'")


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped to broadcast over ``like``; ``values`` already lives on t's device (no host sync)."""
    return values[t].to(like.dtype).view(-1, *[1] * (like.dim() - 1))


def dynamic_threshold(x0: torch.Tensor, percentile: float) -> torch.Tensor:
    """Imagen's dynamic thresholding: clip to the per-sample percentile of |x0| (at least 1) and rescale."""
    s = torch.quantile(x0.flatten(1).abs().float(), percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.view(-1, *[1] * (x0.dim() - 1))
    return x0.clamp(-s, s) / s


class GaussianDiffusion:
    """The schedule's tables are plain fp32 tensors, not module buffers: DeepSpeed casts a module's buffers
    to fp16/bf16, where 1 - alpha_bar near t=0 would round to zero. A copy per device is kept, so indexing
    them by a batch's timesteps never waits for the device."""

    def __init__(self, timesteps: int, schedule: str = "cosine", objective: str = "v"):
        if objective not in ("eps", "v"):
            raise ValueError(f"unknown objective {objective!r}; expected 'eps' or 'v'")
        self.timesteps, self.objective = timesteps, objective
        alphas_cumprod = torch.cumprod(1 - make_betas(schedule, timesteps), dim=0)
        self.alphas_cumprod = alphas_cumprod.float()
        self.sqrt_ac = alphas_cumprod.sqrt().float()
        self.sqrt_1m_ac = (1 - alphas_cumprod).sqrt().float()
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) on ``device``."""
        if device not in self._tables:
            self._tables[device] = (self.sqrt_ac.to(device), self.sqrt_1m_ac.to(device))
        return self._tables[device]

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sqrt_ac, sqrt_1m_ac = self._on(t.device)
        return _gather(sqrt_ac, t, like), _gather(sqrt_1m_ac, t, like)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a, b = self._coefficients(t, x0)
        return a * x0 + b * noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.objective == "eps":
            return noise
        a, b = self._coefficients(t, x0)
        return a * noise - b * x0

    def x0_and_eps(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self._coefficients(t, x_t)
        if self.objective == "eps":
            return (x_t - b * out) / a, out
        return a * x_t - b * out, b * x_t + a * out

    def sample_timesteps(self, steps: int, first: int | None = None) -> list[int]:
        """``steps`` timesteps from ``first`` (default T-1) down to 0, evenly spaced (fewer if there are
        fewer timesteps)."""
        first = self.timesteps - 1 if first is None else first
        ts = torch.linspace(first, 0, min(steps, first + 1)).round().long()
        return list(dict.fromkeys(ts.tolist()))

    @torch.no_grad()
    def sample(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple, steps: int,
               eta: float, generator: torch.Generator | None = None, threshold: float | None = 0.95,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               start: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """denoise(x_t, t) -> model output. eta=1: DDPM, eta=0: DDIM. threshold: dynamic-thresholding
        percentile, or None for a static clip to [-1, 1]. start: (a guess of x0, a fraction f) to begin
        at timestep f*(T-1) from the guess noised there (SDEdit) instead of from pure noise at T-1."""
        x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        first = None
        if start is not None and start[1] < 1.0:
            first = round(start[1] * (self.timesteps - 1))
            x = self.q_sample(start[0].to(dtype), torch.full((shape[0],), first, device=device), x)
        ts = self.sample_timesteps(steps, first)
        for i, t_now in enumerate(ts):
            t = torch.full((shape[0],), t_now, device=device, dtype=torch.long)
            x0, _ = self.x0_and_eps(x, t, denoise(x, t))
            x0 = dynamic_threshold(x0, threshold) if threshold is not None else x0.clamp(-1, 1)
            ac = self.alphas_cumprod[t_now].double()
            ac_prev = self.alphas_cumprod[ts[i + 1]].double() if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
            eps = (x - ac.sqrt() * x0) / (1 - ac).sqrt()
            sigma = eta * ((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)).sqrt()
            noise = torch.randn(shape, generator=generator, device=device, dtype=dtype) if i + 1 < len(ts) else 0
            x = ac_prev.sqrt() * x0 + (1 - ac_prev - sigma ** 2).clamp(min=0).sqrt() * eps + sigma * noise
            x = x.to(dtype)
        return x
