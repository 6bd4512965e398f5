"""One UNet of the cascade: a Parallel-UNet trained and sampled by Gaussian diffusion.

UNet 1 (base) generates the try-on at ``base_image_size``. UNet 2 (super-resolution) generates it at
``sr_image_size`` from a low-resolution try-on: in training the ground truth downsampled to the base size,
at inference UNet 1's output. Either way the low-res image is upsampled and noised to a level the UNet is
told (noise-conditioning augmentation), so UNet 2 never needs UNet 1's checkpoint to train.

``forward(batch)`` is the training loss, so a DeepSpeed engine wraps the whole ``CascadeUNet``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .diffusion import GaussianDiffusion
from .model import COND_KEYS, ParallelUNet


class CascadeUNet(nn.Module):
    def __init__(self, config: Config, unet_number: int):
        super().__init__()
        self.unet_number = unet_number
        self.image_size = tuple(config.image_size(unet_number))
        self.dcfg = config.diffusion
        self.unet = ParallelUNet(config.unet(unet_number), lowres_cond=unet_number == 2, channels=config.channels)
        self.diffusion = GaussianDiffusion(config.timesteps[unet_number - 1], self.dcfg.schedule, self.dcfg.objective)

    def _lowres_input(self, lowres: torch.Tensor, level: torch.Tensor, noise: torch.Tensor | None = None):
        """Upsample the low-res try-on to this UNet's size and noise it to ``level`` (timesteps)."""
        up = F.interpolate(lowres, size=self.image_size, mode="bilinear", align_corners=False, antialias=False)
        noise = torch.randn_like(up) if noise is None else noise
        return self.diffusion.q_sample(up, level, noise)

    def forward(self, batch: dict) -> torch.Tensor:
        x0 = batch["person"]
        b = x0.shape[0]
        cond = {k: batch[k] for k in COND_KEYS}
        t = torch.randint(0, self.diffusion.timesteps, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        drop = torch.rand(b, device=x0.device) < self.dcfg.cond_drop_prob
        level = None
        if self.unet_number == 2:
            max_level = int(self.dcfg.noise_aug_max * self.diffusion.timesteps)
            level = torch.randint(0, max_level + 1, (b,), device=x0.device)
            cond["lowres"] = self._lowres_input(batch["lowres"], level)
        # Diffusion arithmetic in fp32; the UNet runs in its own (possibly bf16/fp16) dtype.
        dtype = self.unet.person_in.weight.dtype
        cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
        x_t = self.diffusion.q_sample(x0, t, noise).to(dtype)
        out = self.unet(x_t, t, cond, lowres_noise_level=level, drop_cond=drop)
        return F.mse_loss(out.float(), self.diffusion.target(x0, t, noise).float())

    @torch.no_grad()
    def sample(self, cond: dict, lowres: torch.Tensor | None = None, steps: int | None = None,
               sampler: str | None = None, guidance: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Try-on images in [-1, 1] at this UNet's size, with classifier-free guidance:
        out = uncond + guidance * (cond - uncond); guidance 1 is plain conditional sampling."""
        d = self.dcfg
        steps = steps or d.sample_steps[self.unet_number - 1]
        sampler = sampler or d.sampler
        guidance = d.guidance if guidance is None else guidance
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler {sampler!r}: expected 'ddpm' or 'ddim'")
        ref = cond["ca"]
        b = ref.shape[0]
        cond = {k: cond[k] for k in COND_KEYS}
        level = None
        if self.unet_number == 2:
            if lowres is None:
                raise ValueError("UNet 2 (super-resolution) samples from a low-resolution try-on: pass lowres")
            level = torch.full((b,), int(d.noise_aug_sample * self.diffusion.timesteps), device=ref.device)
            noise = torch.randn(lowres.shape[:2] + self.image_size, generator=generator, device=ref.device,
                                dtype=ref.dtype)
            cond["lowres"] = self._lowres_input(lowres, level, noise)

        def denoise(x, t):
            if guidance == 1.0:
                return self.unet(x, t, cond, lowres_noise_level=level)
            doubled = {k: torch.cat([v, v]) for k, v in cond.items()}
            drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(ref.device)
            lvl = None if level is None else torch.cat([level, level])
            out_c, out_u = self.unet(torch.cat([x, x]), torch.cat([t, t]), doubled, lowres_noise_level=lvl,
                                     drop_cond=drop).chunk(2)
            return out_u + guidance * (out_c - out_u)

        shape = (b, ref.shape[1]) + self.image_size
        return self.diffusion.sample(denoise, shape, steps, eta=1.0 if sampler == "ddpm" else 0.0,
                                     generator=generator,
                                     threshold=d.dynamic_threshold_percentile if d.dynamic_threshold else None,
                                     device=ref.device, dtype=ref.dtype)
