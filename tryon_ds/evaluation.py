"""Try-on quality on held-out pairs: PSNR and SSIM against the target, over the whole image and inside the
garment region (the region the ca image removed), for the cascade and for two baselines on the same pairs:
- ``ca image``: the clothing-agnostic image itself;
- ``ca + mean colour``: the ca image with the garment region filled with the garment's mean colour.
And UNet 2 alone: given the true low-res target, against plain bilinear upsampling of it.
The region is the sample's ``mask`` (synthetic and DressCode shards carry it), else the pixels where the ca
image differs from the target. Only paired samples (the person in their own garment) have a target; the
unpaired ones of a test split are tried on for pictures, not measured. FID/KID (torchmetrics) run only with
a local Inception file; nothing is ever downloaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

METHODS = ("try-on (cascade)", "ca image", "ca + mean colour")
SR_METHODS = ("UNet 2 from the true low-res", "bilinear upsampling")


def garment_region(batch: dict) -> torch.Tensor:
    """(B, 1, H, W) float mask in {0, 1}."""
    if "mask" in batch:
        return batch["mask"]
    return ((batch["ca"] - batch["person"]).abs().amax(dim=1, keepdim=True) > 0.1).float()


def mean_colour_fill(ca: torch.Tensor, garment: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1]. The garment's mean colour over its non-background (not near-white) pixels."""
    fg = (garment < 0.9).any(dim=1, keepdim=True).float()
    mean = (garment * fg).sum(dim=(2, 3)) / fg.sum(dim=(2, 3)).clamp(min=1)
    return ca * (1 - region) + mean[:, :, None, None] * region


def psnr(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR of images in [0, 1] over the pixels where weight is 1."""
    w = weight.expand_as(pred)
    mse = ((pred - target) ** 2 * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3)).clamp(min=1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


def ssim(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of the SSIM map (11x11 Gaussian window) over the pixels where weight is 1."""
    _, full = structural_similarity_index_measure(pred, target, data_range=1.0, return_full_image=True,
                                                  reduction="none")
    w = weight.expand_as(full)
    return (full * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3)).clamp(min=1)


def tryon_candidates(result: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
    """The cascade's try-on and the two baselines on the same pairs, in METHODS order."""
    return dict(zip(METHODS, (result, batch["ca"], mean_colour_fill(batch["ca"], batch["garment"], garment_region(batch)))))


@dataclass
class QualityTable:
    """PSNR and SSIM per method, whole image and garment region, averaged over the pairs added."""
    sums: dict = field(default_factory=dict)
    count: int = 0
    region_pixels: int = 0

    def add(self, candidates: dict[str, torch.Tensor], batch: dict) -> None:
        """candidates: {method: images}, images in [-1, 1] at the size of the batch's target."""
        region = garment_region(batch)
        whole = torch.ones_like(region)
        target = (batch["person"] + 1) / 2
        for name, image in candidates.items():
            image = (image.float().clamp(-1, 1) + 1) / 2
            values = torch.stack([psnr(image, target, whole), ssim(image, target, whole),
                                  psnr(image, target, region), ssim(image, target, region)], dim=1)
            self.sums[name] = self.sums.get(name, torch.zeros(4, dtype=torch.float64)) + values.double().sum(dim=0)
        self.count += target.shape[0]
        self.region_pixels += int(region.sum())

    def rows(self) -> dict[str, dict[str, float]]:
        keys = ("psnr", "ssim", "psnr_region", "ssim_region")
        return {m: dict(zip(keys, (s / max(self.count, 1)).tolist())) for m, s in self.sums.items()}

    def format(self) -> str:
        return format_table(self.rows(), self.count, self.region_pixels)

    def margins(self, keys=("psnr_region", "ssim_region")) -> dict[str, float]:
        """How far the first method is ahead of the best of the others."""
        rows = self.rows()
        first, *others = rows
        return {k: rows[first][k] - max(rows[m][k] for m in others) for k in keys}


def format_table(rows: dict, pairs: int, region_pixels: int) -> str:
    w = max(map(len, rows)) + 2
    lines = [f"{'':<{w}}{'whole image':^18}{'garment region':^18}",
             f"{'':<{w}}{'PSNR dB':>9}{'SSIM':>9}{'PSNR dB':>9}{'SSIM':>9}"]
    for name, r in rows.items():
        lines.append(f"{name:<{w}}{r['psnr']:9.2f}{r['ssim']:9.3f}{r['psnr_region']:9.2f}{r['ssim_region']:9.3f}")
    lines.append(f"({pairs} held-out pairs; garment region {region_pixels / max(pairs, 1):.0f} pixels per image "
                 "on average)")
    return "\n".join(lines)


class TorchScriptInception(torch.nn.Module):
    """The FID Inception-v3 saved as TorchScript, as StyleGAN2-ADA's and clean-fid's metrics ship it
    (``inception-2015-12-05.pt``: uint8 images of any size in, 2048 pool features out with
    ``return_features=True``). A TorchScript file loads without unpickling Python objects, and without
    torchvision, which torchmetrics' own Inception needs."""

    def __init__(self, path: str):
        super().__init__()
        self.net = torch.jit.load(path, map_location="cpu").eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images, return_features=True)


def fid_kid(weights_path: str | None, real: list[torch.Tensor], fake: list[torch.Tensor]) -> str:
    """FID and KID (torchmetrics) of the paired try-ons against their targets, images in [-1, 1]."""
    if not weights_path:
        return "FID/KID skipped: no --inception_weights given (a local Inception file; this tool never downloads)"
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real_u8 = [((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8) for x in real]
    fake_u8 = [((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8) for x in fake]
    n = sum(x.shape[0] for x in real_u8)
    inception = TorchScriptInception(weights_path)
    fid = FrechetInceptionDistance(feature=inception)
    kid = KernelInceptionDistance(feature=inception, subset_size=min(50, n))
    for metric in (fid, kid):
        for x in real_u8:
            metric.update(x, real=True)
        for x in fake_u8:
            metric.update(x, real=False)
    kid_mean, kid_std = kid.compute()
    return (f"FID {fid.compute().item():.2f}, KID {kid_mean.item() * 1000:.2f} +- {kid_std.item() * 1000:.2f} "
            f"(x1e-3) over {n} paired try-ons")


def finite(rows: dict) -> bool:
    return all(math.isfinite(v) for r in rows.values() for v in r.values())
