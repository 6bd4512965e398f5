"""Ours, in the garment region: PSNR and SSIM against the target, over the whole image and inside the region
the ca image removed, for the cascade and two baselines on the same pairs:
- ``ca image``: the clothing-agnostic image itself;
- ``ca + mean colour``: the ca image with the garment region filled with the garment's mean colour.
And each super-resolution UNet alone: given the true low-res target, against bilinear upsampling of it.
The region is the sample's ``mask`` (synthetic and DressCode shards carry it), else the pixels where the ca
image differs from the target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import metrics
from ..batch import CA, GARMENT, MASK, PERSON

METHODS = ("try-on (cascade)", "ca image", "ca + mean colour")


def sr_methods(unet_number: int) -> tuple[str, str]:
    """The rows of a super-resolution UNet alone against what it starts from."""
    return f"UNet {unet_number} from the true low-res", "bilinear upsampling"


def garment_region(batch: dict) -> torch.Tensor:
    """(B, 1, H, W) float mask in {0, 1}."""
    if MASK in batch:
        return batch[MASK]
    return ((batch[CA] - batch[PERSON]).abs().amax(dim=1, keepdim=True) > 0.1).float()


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


def tryon_candidates(result: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
    """The cascade's try-on and the two baselines on the same pairs, in METHODS order."""
    return dict(zip(METHODS, (result, batch[CA], mean_colour_fill(batch[CA], batch[GARMENT], garment_region(batch)))))


@dataclass
class QualityTable:
    """PSNR and SSIM per method, whole image and garment region, per pair (by key), averaged in key order: the
    table is the same however the pairs were batched or split across ranks."""
    values: dict = field(default_factory=dict)  # key -> {method: [psnr, ssim, psnr_region, ssim_region]}
    pixels: dict = field(default_factory=dict)  # key -> pixels of its garment region

    def add(self, candidates: dict[str, torch.Tensor], batch: dict) -> None:
        """candidates: {method: images}, images in [-1, 1] at the size of the batch's target."""
        region = garment_region(batch)
        whole = torch.ones_like(region)
        target = (batch[PERSON] + 1) / 2
        keys = batch.get("key") or [f"#{len(self.values) + i:06d}" for i in range(len(target))]
        per_method = {}
        for name, image in candidates.items():
            image = (image.float().clamp(-1, 1) + 1) / 2
            per_method[name] = torch.stack([psnr(image, target, whole), metrics.ssim(image, target, whole).float(),
                                            psnr(image, target, region), metrics.ssim(image, target, region).float()],
                                           dim=1)
        for i, key in enumerate(keys):
            self.values[key] = {name: v[i].double().tolist() for name, v in per_method.items()}
            self.pixels[key] = int(region[i].sum())

    def merge(self, other: "QualityTable") -> None:
        self.values.update(other.values)
        self.pixels.update(other.pixels)

    @property
    def count(self) -> int:
        return len(self.values)

    @property
    def region_pixels(self) -> int:
        return sum(self.pixels[k] for k in sorted(self.pixels))

    def rows(self) -> dict[str, dict[str, float]]:
        names = ("psnr", "ssim", "psnr_region", "ssim_region")
        keys = sorted(self.values)
        if not keys:
            return {}
        methods = list(self.values[keys[0]])
        out = {}
        for method in methods:
            sums = [0.0] * 4
            for key in keys:
                sums = [a + b for a, b in zip(sums, self.values[key][method])]
            out[method] = {n: v / len(keys) for n, v in zip(names, sums)}
        return out

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


def finite(rows: dict) -> bool:
    return all(math.isfinite(v) for r in rows.values() for v in r.values())


# --------------------------------------------------------------------------- the field's protocol
def size_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


