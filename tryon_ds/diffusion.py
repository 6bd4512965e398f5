"""Gaussian diffusion: noise schedules, the training target, and sampling with DDPM, DDIM or DPM-Solver++(2M).

Timesteps are discrete, ``0 .. T-1``. Sampling with fewer steps than ``T`` walks a subsequence of the
timesteps; DDPM and DDIM are the two ends of one update (eta = 1 is DDPM's ancestral step on the
respaced schedule, eta = 0 is deterministic DDIM), so both share one loop. DPM-Solver++(2M) (Lu et al.
2022, "DPM-Solver++", Algorithm 2; k-diffusion's ``sample_dpmpp_2m``) is a second-order multistep solver of
the same probability-flow ODE in log-SNR time, on the model's x0 predictions: good samples in 10-25 steps.
Every sampler works on x0 predictions, so classifier-free guidance (on the model's output) and dynamic
thresholding (on x0) apply alike to all three, for either objective (v or eps).

Random draws take a generator, or a list of them, one per sample (``noise``): then each sample's noise is
its own, whatever batch it is drawn in.
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


SAMPLERS = ("ddpm", "ddim", "dpmpp")


def noise(shape: tuple, generator, device, dtype) -> torch.Tensor:
    """Standard normal noise of ``shape``; with a list of generators, sample i drawn from generator i alone."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


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
               sampler: str = "ddim", generator=None, threshold: float | None = 0.95,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               start: tuple[torch.Tensor, float] | None = None,
               on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """denoise(x_t, t) -> model output. sampler: ddpm, ddim or dpmpp. threshold: dynamic-thresholding
        percentile, or None for a static clip to [-1, 1]. start: (a guess of x0, a fraction f) to begin at
        timestep f*(T-1) from the guess noised there (SDEdit) instead of from pure noise at T-1. The per-step
        coefficients are computed once, on the host, before the loop: a step does no host work. ``on_step(i, n)``
        is called after step i of n (a progress bar's hook: it waits for nothing on the device)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
        x = noise(shape, generator, device, dtype)
        first = None
        if start is not None and start[1] < 1.0:
            first = round(start[1] * (self.timesteps - 1))
            x = self.q_sample(start[0].to(dtype), torch.full((shape[0],), first, device=device), x)
        ts = self.sample_timesteps(steps, first)
        t_dev = torch.tensor(ts, device=device, dtype=torch.long)
        # alpha_bar of each step and of the next one (1.0 after the last: x0 itself), as Python floats.
        ac = self.alphas_cumprod[ts].double().tolist()
        ac_next = ac[1:] + [1.0]
        previous_x0 = None
        for i in range(len(ts)):
            t = t_dev[i].expand(shape[0])
            x0, _ = self.x0_and_eps(x, t, denoise(x, t))
            x0 = dynamic_threshold(x0, threshold) if threshold is not None else x0.clamp(-1, 1)
            if sampler == "dpmpp":
                x, previous_x0 = self._dpmpp_2m_step(x, x0, previous_x0, ac, i), x0
            else:
                eta = 1.0 if sampler == "ddpm" else 0.0
                eps = (x - math.sqrt(ac[i]) * x0) / math.sqrt(1 - ac[i])
                sigma = eta * math.sqrt((1 - ac_next[i]) / (1 - ac[i]) * (1 - ac[i] / ac_next[i]))
                x = math.sqrt(ac_next[i]) * x0 + math.sqrt(max(1 - ac_next[i] - sigma ** 2, 0.0)) * eps
                if sigma > 0:
                    x = x + sigma * noise(shape, generator, device, dtype)
            x = x.to(dtype)
            if on_step is not None:
                on_step(i + 1, len(ts))
        return x

    @staticmethod
    def _dpmpp_2m_step(x: torch.Tensor, x0: torch.Tensor, previous_x0: torch.Tensor | None, ac: list[float],
                       i: int) -> torch.Tensor:
        """One DPM-Solver++(2M) step from step i's timestep to the next (x0 after the last), VP form:
        x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) D, h = lambda_next - lambda, lambda = log(alpha /
        sigma), D = x0 on the first and the last step, else (1 + 1/2r) x0 - 1/2r x0_prev, r = h_prev / h."""
        if i + 1 == len(ac):  # to sigma = 0: the data prediction itself
            return x0
        alpha, sigma = math.sqrt(ac[i]), math.sqrt(1 - ac[i])
        alpha_n, sigma_n = math.sqrt(ac[i + 1]), math.sqrt(1 - ac[i + 1])
        h = math.log(alpha_n / sigma_n) - math.log(alpha / sigma)
        d = x0
        if previous_x0 is not None:
            h_prev = math.log(alpha / sigma) - math.log(math.sqrt(ac[i - 1]) / math.sqrt(1 - ac[i - 1]))
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
        return (sigma_n / sigma) * x - alpha_n * math.expm1(-h) * d
