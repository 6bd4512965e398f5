"""Try-on quality on held-out pairs: PSNR and SSIM against the target, over the whole image and inside the
garment region (the region the ca image removed), for the cascade and for two baselines on the same pairs:
- ``ca image``: the clothing-agnostic image itself;
- ``ca + mean colour``: the ca image with the garment region filled with the garment's mean colour.
The region is the sample's ``mask`` (synthetic shards carry it), else the pixels where the ca image differs
from the target. FID/KID (torchmetrics) run only with Inception weights from a local file; nothing is
ever downloaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

METHODS = ("try-on (cascade)", "ca image", "ca + mean colour")


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


@dataclass
class QualityTable:
    sums: dict = field(default_factory=lambda: {m: torch.zeros(4, dtype=torch.float64) for m in METHODS})
    count: int = 0
    region_pixels: int = 0

    def add(self, result: torch.Tensor, batch: dict) -> None:
        """result, batch images in [-1, 1] at the same size."""
        region = garment_region(batch)
        whole = torch.ones_like(region)
        target = (batch["person"] + 1) / 2
        candidates = {"try-on (cascade)": result, "ca image": batch["ca"],
                      "ca + mean colour": mean_colour_fill(batch["ca"], batch["garment"], region)}
        for name, image in candidates.items():
            image = (image.float().clamp(-1, 1) + 1) / 2
            values = torch.stack([psnr(image, target, whole), ssim(image, target, whole),
                                  psnr(image, target, region), ssim(image, target, region)], dim=1)
            self.sums[name] += values.double().sum(dim=0)
        self.count += result.shape[0]
        self.region_pixels += int(region.sum())

    def rows(self) -> dict[str, dict[str, float]]:
        keys = ("psnr", "ssim", "psnr_region", "ssim_region")
        return {m: dict(zip(keys, (s / max(self.count, 1)).tolist())) for m, s in self.sums.items()}

    def format(self) -> str:
        return format_table(self.rows(), self.count, self.region_pixels)

    def margins(self) -> dict[str, float]:
        """How far the cascade is ahead of the better baseline inside the garment region."""
        rows = self.rows()
        ours = rows[METHODS[0]]
        return {k: ours[k] - max(rows[m][k] for m in METHODS[1:]) for k in ("psnr_region", "ssim_region")}


def format_table(rows: dict, pairs: int, region_pixels: int) -> str:
    lines = [f"{'':<18}{'whole image':^18}{'garment region':^18}",
             f"{'':<18}{'PSNR dB':>9}{'SSIM':>9}{'PSNR dB':>9}{'SSIM':>9}"]
    for name, r in rows.items():
        lines.append(f"{name:<18}{r['psnr']:9.2f}{r['ssim']:9.3f}{r['psnr_region']:9.2f}{r['ssim_region']:9.3f}")
    lines.append(f"({pairs} held-out pairs; garment region {region_pixels / max(pairs, 1):.0f} pixels per image "
                 "on average)")
    return "\n".join(lines)


def fid_kid(weights_path: str | None, real: list[torch.Tensor], fake: list[torch.Tensor]) -> str:
    if not weights_path:
        return "FID/KID skipped: no --inception_weights given (a local Inception file; this tool never downloads)"
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real_u8 = [((x.clamp(-1, 1) + 1) * 127.5).to(torch.uint8) for x in real]
    fake_u8 = [((x.clamp(-1, 1) + 1) * 127.5).to(torch.uint8) for x in fake]
    n = sum(x.shape[0] for x in real_u8)
    fid = FrechetInceptionDistance(feature_extractor_weights_path=weights_path)
    kid = KernelInceptionDistance(feature_extractor_weights_path=weights_path, subset_size=min(50, n))
    for metric in (fid, kid):
        for x in real_u8:
            metric.update(x, real=True)
        for x in fake_u8:
            metric.update(x, real=False)
    kid_mean, kid_std = kid.compute()
    return f"FID {fid.compute().item():.2f}, KID {kid_mean.item() * 1000:.2f} +- {kid_std.item() * 1000:.2f} (x1e-3)"


def finite(rows: dict) -> bool:
    return all(math.isfinite(v) for r in rows.values() for v in r.values())
