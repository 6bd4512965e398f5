"""One UNet of the cascade: a UNet trained and sampled by Gaussian diffusion.

UNet 1 generates the try-on at its ``image_size``. Each later UNet super-resolves the one before it (the
paper's UNet 2, a Parallel-UNet, to 256 px; its UNet 3, an Efficient-UNet, to 1024 px). Its low-res input
(``lowres``) is, in training, the ground truth downsampled to the previous UNet's size, at inference that
UNet's output, upsampled bilinearly either way; so no UNet needs another's checkpoint to train. A UNet trained
on crops (its ``crop_size``) sees a random crop of its target and the matching crop of its upsampled low-res
input, and samples the whole image.

What a UNet is conditioned on is its family's to say (tryon_ds/model/spec.py, ``Conditioning``): the inputs
it reads, which are noise-augmented, what classifier-free guidance drops (nothing, for an Efficient-UNet: it
then samples at guidance 1).

Noise-conditioning augmentation (the paper's): every noisy input (the ca image and the garment, a
super-resolution UNet's low-res try-on) is noised with this UNet's own schedule to a level of its own,
drawn from U[0, ``diffusion.cond_noise.train_max``] in training and fixed per input at sampling (the UNet's
``cond_noise``); the UNet is told each level. Real parsing and poses are noisy: the model must not
trust the conditioning pixels blindly.

``forward(batch)`` is the training loss, so a DeepSpeed engine wraps the whole ``CascadeUNet``.

Compilation (a UNet's ``compile``) compiles the UNet alone, in place: the diffusion arithmetic around it is a few
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

from .batch import PERSON
from .config import Config
from .diffusion import SAMPLERS, GaussianDiffusion, noise
from .model import LOWRES, build_unet


class CascadeUNet(nn.Module):
    def __init__(self, config: Config, unet_number: int):
        super().__init__()
        self.unet_number = unet_number
        self.spec = spec = config.unet(unet_number)
        self.conditioning = config.conditioning(unet_number)
        self.image_size = tuple(spec.image_size)
        self.super_resolves = self.conditioning.super_resolves
        self.crop_size = spec.crop_size
        self.dcfg = config.diffusion
        self.unet = build_unet(spec, self.super_resolves, config.channels)
        self.compile_mode = spec.compile_mode if spec.compile else None
        self.compile_backend = spec.compile_backend
        self.diffusion = GaussianDiffusion(spec.timesteps, self.dcfg.schedule, self.dcfg.objective)
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

    def inputs(self, cond: dict, levels: dict[str, torch.Tensor], generator=None,
               crops: torch.Tensor | None = None) -> dict:
        """What the UNet reads (its conditioning's keys; the low-res input upsampled to this UNet's size, or
        cropped), each noisy input noised to its level in ``levels`` ((B,) fractions of the timesteps; 0 leaves
        it as is)."""
        missing = [k for k in self.conditioning.keys if k not in cond]
        if missing:
            raise ValueError(f"UNet {self.unet_number} reads {', '.join(missing)}: pass it")
        out = {k: cond[k] for k in self.conditioning.keys}
        if self.super_resolves:
            out[LOWRES] = self.upsample(cond[LOWRES], crops)
        for name, level in levels.items():
            image = out[name]
            t = (level * (self.diffusion.timesteps - 1)).round().long()
            noised = self.diffusion.q_sample(image, t, noise(image.shape, generator, image.device, image.dtype))
            out[name] = torch.where((level > 0).view(-1, 1, 1, 1), noised, image)
        return out

    def forward(self, batch: dict, per_sample: bool = False) -> torch.Tensor:
        """The diffusion loss of the batch: the mean, or with ``per_sample`` each sample's, (B,)."""
        x0 = batch[PERSON]
        b = x0.shape[0]
        t = torch.randint(0, self.train_timesteps, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        drop = torch.rand(b, device=x0.device) < self.dcfg.cond_drop_prob if self.conditioning.guided else None
        levels = {name: torch.rand(b, device=x0.device) * self.dcfg.cond_noise.train_max
                  for name in self.conditioning.noisy}
        cond = self.inputs(batch, levels, crops=batch.get("crop"))
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
    def sample(self, cond: dict, steps: int | None = None, sampler: str | None = None,
               guidance: float | None = None, generator=None, on_step=None) -> torch.Tensor:
        """Try-on images in [-1, 1] at this UNet's whole size from its conditioning ``cond`` (the batch keys
        its conditioning names; a super-resolving UNet's ``lowres`` at the previous UNet's size), with
        classifier-free guidance: out = uncond + guidance * (cond - uncond); guidance 1 is plain conditional
        sampling, and what a UNet with nothing to drop always does. Everything the steps share (the
        conditioning, noised once; its doubled, dropped copy for guidance) is built here, once. ``on_step(i, n)``
        after each step (Diffusion.sample)."""
        d = self.dcfg
        steps = steps or self.spec.sample_steps
        sampler = sampler or d.sampler
        guidance = d.guidance if guidance is None else guidance
        if not self.conditioning.guided:
            guidance = 1.0
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
        ref = cond[self.conditioning.images[0]]
        b = ref.shape[0]
        levels = {name: torch.full((b,), self.spec.cond_noise.get(name, 0.0), device=ref.device)
                  for name in self.conditioning.noisy}
        lowres = cond.get(LOWRES)
        cond = self.inputs(cond, levels, generator)

        if guidance == 1.0:
            def denoise(x, t):
                return self.unet(x, t, cond, levels)
        else:
            drop = torch.arange(2 * b, device=ref.device) >= b  # the second half unconditional
            doubled = self.conditioning.drop({k: torch.cat([v, v]) for k, v in cond.items()}, drop)
            doubled_levels = {k: torch.cat([v, v]) for k, v in levels.items()}

            def denoise(x, t):
                out_c, out_u = self.unet(torch.cat([x, x]), torch.cat([t, t]), doubled, doubled_levels).chunk(2)
                return out_u + guidance * (out_c - out_u)

        shape = (b, ref.shape[1]) + self.image_size
        # A super-resolution UNet may start from its clean upsampled input (not the noise-augmented copy).
        start = (self.upsample(lowres), d.sr_start) if self.super_resolves else None
        return self.diffusion.sample(denoise, shape, steps, sampler, generator=generator,
                                     threshold=d.dynamic_threshold_percentile if d.dynamic_threshold else None,
                                     device=ref.device, dtype=ref.dtype, start=start, on_step=on_step)


def random_batch(config, unet_number: int, batch_size: int, generator: torch.Generator | None = None) -> dict:
    """A training batch of UNet ``unet_number``'s layout filled with noise, for tests and benchmarks: the
    target (a crop of it for a UNet trained on crops) and the inputs its conditioning names, images in
    [-1, 1] (the low-res one at the previous UNet's size), poses in [0, 1] with their masks."""
    k, crop = config.num_keypoints, config.crop_size(unet_number)
    conditioning = config.conditioning(unet_number)

    def image(size):
        return torch.rand(batch_size, config.channels, *size, generator=generator) * 2 - 1

    size = crop or config.image_size(unet_number)
    batch = {"person": image(size)}
    for name in conditioning.images:
        batch[name] = image(tuple(config.image_size(unet_number - 1)) if name == LOWRES else size)
    for name in conditioning.poses:
        batch[name] = torch.rand(batch_size, k, 2, generator=generator)
        batch[f"{name}_valid"] = torch.rand(batch_size, k, generator=generator) > 0.1
    if crop:
        h, w = config.image_size(unet_number)
        batch["crop"] = torch.stack([torch.randint(0, h - crop[0] + 1, (batch_size,), generator=generator),
                                     torch.randint(0, w - crop[1] + 1, (batch_size,), generator=generator)], dim=1)
    return batch
