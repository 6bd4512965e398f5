"""One UNet of the cascade: a UNet trained and sampled by Gaussian diffusion.

UNet 1 generates the try-on at ``base_image_size``. Each later UNet super-resolves the one before it: UNet
2 (a Parallel-UNet) to ``sr_image_size``, UNet 3 (an Efficient-UNet) to ``unet3.image_size``. Its low-res
input is, in training, the ground truth downsampled to the previous UNet's size, at inference that UNet's
output, upsampled bilinearly either way; so no UNet needs another's checkpoint to train. A UNet trained on
crops (``unetN.crop_size``) sees a random crop of its target and the matching crop of its upsampled low-res
input, and samples the whole image.

What a UNet is conditioned on is the UNet's to say (tryon_ds/model/): ``cond_keys`` it reads,
``noisy_inputs`` it is told the noise levels of, ``guided`` what classifier-free guidance drops (nothing,
for UNet 3: it then samples at guidance 1).

Noise-conditioning augmentation (the paper's): every noisy input (the ca image and the garment, a
super-resolution UNet's low-res try-on) is noised with this UNet's own schedule to a level of its own,
drawn from U[0, ``cond_noise.train_max``] in training and fixed per input at sampling
(``diffusion.cond_noise``); the UNet is told each level. Real parsing and poses are noisy: the model must not
trust the conditioning pixels blindly.

``forward(batch)`` is the training loss, so a DeepSpeed engine wraps the whole ``CascadeUNet``.

Compilation (``unetN.compile``) compiles the UNet alone, in place: the diffusion arithmetic around it is a few
elementwise ops, and ``sample()``'s loop has host-side control flow by design. The whole UNet is one graph
(the Parallel-UNet compiles without a graph break); compiling each repeated block type on its own instead compiled in
half the time but kept 0.94x of eager step time where the whole graph reached 0.72x (BENCHMARKS.md). Shapes
are static: each distinct input shape (the training micro-batch, a validation batch, the doubled batch of
guided sampling) and grad mode compiles once and is cached, rather than one dynamic-shape graph that would
serve them all more slowly. ``Module.compile`` keeps the module's state-dict keys, so checkpoints
and bundles of compiled and eager runs are interchangeable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .diffusion import SAMPLERS, GaussianDiffusion, noise
from .model import build_unet


class CascadeUNet(nn.Module):
    def __init__(self, config: Config, unet_number: int):
        super().__init__()
        self.unet_number = unet_number
        self.image_size = tuple(config.image_size(unet_number))
        self.super_resolves = unet_number > 1  # every UNet after the first takes the one before it as input
        self.crop_size = config.crop_size(unet_number)
        self.dcfg = config.diffusion
        self.unet = build_unet(config, unet_number)
        cfg = config.unet(unet_number)
        self.compile_mode = cfg.compile_mode if cfg.compile else None
        self.compile_backend = cfg.compile_backend
        self.diffusion = GaussianDiffusion(config.timesteps[unet_number - 1], self.dcfg.schedule, self.dcfg.objective)
        # A super-resolution UNet that samples from sr_start (SDEdit) is never asked about a later timestep.
        # (the same first timestep as GaussianDiffusion.sample's start)
        last = self.diffusion.timesteps - 1
        self.train_timesteps = round(self.dcfg.sr_start * last) + 1 if self.super_resolves else last + 1

    def compile_unet(self) -> None:
        """torch.compile the UNet's forward in place, if its config says so (the graph is built at its first
        call). The forward, not the module: hooks on the module (ZeRO-3's gathering and releasing of its
        weights) run eager around the graph instead of breaking it. Not in ``__init__``: under ZeRO-3 the
        model is built inside ``deepspeed.zero.Init``, whose patched tensor constructors make torch._dynamo's
        first import fail; the caller compiles once that is over."""
        if self.compile_mode is not None:
            inductor = {"mode": self.compile_mode} if self.compile_backend == "inductor" else {}
            self.unet.forward = torch.compile(self.unet.forward, backend=self.compile_backend, dynamic=False,
                                              **inductor)

    def upsample(self, lowres: torch.Tensor, crops: torch.Tensor | None = None) -> torch.Tensor:
        """The low-res try-on at this UNet's size, as it sees it (before noise augmentation); with ``crops``
        ((B, 2) top, left of each sample's training crop), the matching crops of it."""
        up = F.interpolate(lowres, size=self.image_size, mode="bilinear", align_corners=False)
        if crops is None:
            return up
        # Per-sample windows by indexing on the device: the offsets never travel to the host.
        h, w = self.crop_size
        rows = crops[:, :1] + torch.arange(h, device=crops.device)  # B, h
        cols = crops[:, 1:] + torch.arange(w, device=crops.device)  # B, w
        batch = torch.arange(len(crops), device=crops.device)[:, None, None]
        return up[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # B, h, w, C -> B, C, h, w

    def conditioning(self, cond: dict, lowres: torch.Tensor | None, levels: dict[str, torch.Tensor],
                     generator=None, crops: torch.Tensor | None = None) -> dict:
        """What the UNet reads (its ``cond_keys``; ``lowres`` upsampled to this UNet's size, or cropped), each
        noisy input noised to its level in ``levels`` ((B,) fractions of the timesteps; 0 leaves it as is)."""
        out = {k: cond[k] for k in self.unet.cond_keys if k != "lowres"}
        if self.super_resolves:
            if lowres is None:
                raise ValueError(f"UNet {self.unet_number} super-resolves a low-resolution try-on: pass lowres")
            out["lowres"] = self.upsample(lowres, crops)
        for name, level in levels.items():
            image = out[name]
            t = (level * (self.diffusion.timesteps - 1)).round().long()
            noised = self.diffusion.q_sample(image, t, noise(image.shape, generator, image.device, image.dtype))
            out[name] = torch.where((level > 0).view(-1, 1, 1, 1), noised, image)
        return out

    def forward(self, batch: dict, per_sample: bool = False) -> torch.Tensor:
        """The diffusion loss of the batch: the mean, or with ``per_sample`` each sample's, (B,)."""
        x0 = batch["person"]
        b = x0.shape[0]
        t = torch.randint(0, self.train_timesteps, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        drop = torch.rand(b, device=x0.device) < self.dcfg.cond_drop_prob if self.unet.guided else None
        levels = {name: torch.rand(b, device=x0.device) * self.dcfg.cond_noise.train_max
                  for name in self.unet.noisy_inputs}
        cond = self.conditioning(batch, batch.get("lowres"), levels, crops=batch.get("crop"))
        # Diffusion arithmetic in fp32; the UNet runs in its own (possibly bf16/fp16) dtype.
        dtype = next(self.unet.parameters()).dtype
        cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
        x_t = self.diffusion.q_sample(x0, t, noise).to(dtype)
        out = self.unet(x_t, t, cond, levels, drop_cond=drop)
        target = self.diffusion.target(x0, t, noise).float()
        if per_sample:
            return F.mse_loss(out.float(), target, reduction="none").flatten(1).mean(1)
        return F.mse_loss(out.float(), target)

    @torch.no_grad()
    def sample(self, cond: dict, lowres: torch.Tensor | None = None, steps: int | None = None,
               sampler: str | None = None, guidance: float | None = None,
               generator=None) -> torch.Tensor:
        """Try-on images in [-1, 1] at this UNet's whole size, with classifier-free guidance:
        out = uncond + guidance * (cond - uncond); guidance 1 is plain conditional sampling, and what a UNet
        with nothing to drop (``guided`` empty) always does. Everything the steps share (the conditioning,
        noised once; its doubled, dropped copy for guidance) is built here, once."""
        d = self.dcfg
        steps = steps or d.sample_steps[self.unet_number - 1]
        sampler = sampler or d.sampler
        guidance = d.guidance if guidance is None else guidance
        if not self.unet.guided:
            guidance = 1.0
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
        ref = lowres if self.super_resolves else cond[self.unet.cond_keys[0]]
        b = ref.shape[0]
        levels = {name: torch.full((b,), getattr(d.cond_noise, name), device=ref.device)
                  for name in self.unet.noisy_inputs}
        cond = self.conditioning(cond, lowres, levels, generator)

        if guidance == 1.0:
            def denoise(x, t):
                return self.unet(x, t, cond, levels)
        else:
            drop = torch.arange(2 * b, device=ref.device) >= b  # the second half unconditional
            doubled = self.unet.drop_conditioning({k: torch.cat([v, v]) for k, v in cond.items()}, drop)
            doubled_levels = {k: torch.cat([v, v]) for k, v in levels.items()}

            def denoise(x, t):
                out_c, out_u = self.unet(torch.cat([x, x]), torch.cat([t, t]), doubled, doubled_levels).chunk(2)
                return out_u + guidance * (out_c - out_u)

        shape = (b, ref.shape[1]) + self.image_size
        # A super-resolution UNet may start from its clean upsampled input (not the noise-augmented copy).
        start = (self.upsample(lowres), d.sr_start) if self.super_resolves else None
        return self.diffusion.sample(denoise, shape, steps, sampler, generator=generator,
                                     threshold=d.dynamic_threshold_percentile if d.dynamic_threshold else None,
                                     device=ref.device, dtype=ref.dtype, start=start)


def random_batch(config, unet_number: int, batch_size: int, generator: torch.Generator | None = None) -> dict:
    """A training batch of UNet ``unet_number``'s layout filled with noise: the target (a crop of it for a
    UNet trained on crops), the inputs the UNet reads, images in [-1, 1], poses in [0, 1]."""
    k = config.num_keypoints
    crop = config.crop_size(unet_number)

    def image(size):
        return torch.rand(batch_size, config.channels, *size, generator=generator) * 2 - 1

    size = crop or config.image_size(unet_number)
    batch = {"person": image(size)}
    for name in config.unet(unet_number).INPUTS:
        if name.endswith("_pose"):
            batch[name] = torch.rand(batch_size, k, 2, generator=generator)
            batch[f"{name}_valid"] = torch.rand(batch_size, k, generator=generator) > 0.1
        else:
            batch[name] = image(size)
    if unet_number > 1:
        batch["lowres"] = image(tuple(config.image_size(unet_number - 1)))
    if crop:
        h, w = config.image_size(unet_number)
        batch["crop"] = torch.stack([torch.randint(0, h - crop[0] + 1, (batch_size,), generator=generator),
                                     torch.randint(0, w - crop[1] + 1, (batch_size,), generator=generator)], dim=1)
    return batch
