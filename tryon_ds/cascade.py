"""One UNet of the cascade: a Parallel-UNet trained and sampled by Gaussian diffusion.

UNet 1 (base) generates the try-on at ``base_image_size``. UNet 2 (super-resolution) generates it at
``sr_image_size`` from a low-resolution try-on: in training the ground truth downsampled to the base size,
at inference UNet 1's output, upsampled bilinearly either way. So UNet 2 never needs UNet 1's checkpoint
to train.

Noise-conditioning augmentation (the paper's): every conditioning image (the ca image and the garment, and
UNet 2's low-res try-on) is noised to a level of its own, drawn from U[0, ``cond_noise.train_max``] in
training and fixed per input at sampling (``diffusion.cond_noise``); the UNet is told each level. Real
parsing and poses are noisy: the model must not trust the conditioning pixels blindly.

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

    def upsample(self, lowres: torch.Tensor) -> torch.Tensor:
        """UNet 2's low-res try-on at this UNet's size, as UNet 2 sees it (before noise augmentation)."""
        return F.interpolate(lowres, size=self.image_size, mode="bilinear", align_corners=False)

    def conditioning(self, cond: dict, lowres: torch.Tensor | None, levels: dict[str, torch.Tensor],
                     generator: torch.Generator | None = None) -> dict:
        """The UNet's conditioning: COND_KEYS (and UNet 2's ``lowres``, upsampled to this UNet's size), each
        noisy input noised to its level in ``levels`` ((B,) fractions of the timesteps; 0 leaves it as is)."""
        out = {k: cond[k] for k in COND_KEYS}
        if self.unet_number == 2:
            out["lowres"] = self.upsample(lowres)
        for name, level in levels.items():
            image = out[name]
            noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
            t = (level * (self.diffusion.timesteps - 1)).round().long()
            noised = self.diffusion.q_sample(image, t, noise)
            out[name] = torch.where((level > 0).view(-1, 1, 1, 1), noised, image)
        return out

    def forward(self, batch: dict) -> torch.Tensor:
        x0 = batch["person"]
        b = x0.shape[0]
        t = torch.randint(0, self.diffusion.timesteps, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        drop = torch.rand(b, device=x0.device) < self.dcfg.cond_drop_prob
        levels = {name: torch.rand(b, device=x0.device) * self.dcfg.cond_noise.train_max
                  for name in self.unet.noisy_inputs}
        cond = self.conditioning(batch, batch.get("lowres"), levels)
        # Diffusion arithmetic in fp32; the UNet runs in its own (possibly bf16/fp16) dtype.
        dtype = self.unet.person_in.weight.dtype
        cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
        x_t = self.diffusion.q_sample(x0, t, noise).to(dtype)
        out = self.unet(x_t, t, cond, levels, drop_cond=drop)
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
        if self.unet_number == 2 and lowres is None:
            raise ValueError("UNet 2 (super-resolution) samples from a low-resolution try-on: pass lowres")
        ref = cond["ca"]
        b = ref.shape[0]
        levels = {name: torch.full((b,), getattr(d.cond_noise, name), device=ref.device)
                  for name in self.unet.noisy_inputs}
        cond = self.conditioning(cond, lowres, levels, generator)

        def denoise(x, t):
            if guidance == 1.0:
                return self.unet(x, t, cond, levels)
            doubled = {k: torch.cat([v, v]) for k, v in cond.items()}
            drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(ref.device)
            out_c, out_u = self.unet(torch.cat([x, x]), torch.cat([t, t]), doubled,
                                     {k: torch.cat([v, v]) for k, v in levels.items()}, drop_cond=drop).chunk(2)
            return out_u + guidance * (out_c - out_u)

        shape = (b, ref.shape[1]) + self.image_size
        start = None
        if self.unet_number == 2:  # the clean upsampled low-res image, not its noise-augmented copy
            start = (self.upsample(lowres), d.sr_start)
        return self.diffusion.sample(denoise, shape, steps, eta=1.0 if sampler == "ddpm" else 0.0,
                                     generator=generator,
                                     threshold=d.dynamic_threshold_percentile if d.dynamic_threshold else None,
                                     device=ref.device, dtype=ref.dtype, start=start)
