"""Augmentations applied identically to every image of a sample and to its keypoints.

The person, ca and garment images of one sample get the same flip, rotation and colour jitter, so the
ca image still lines up with the target and the garment's colours still match; keypoints move with their
image: a flip mirrors x and swaps each left keypoint with its right twin, a rotation rotates them about
the image centre (a keypoint rotated out of the frame becomes invalid).

``hflip``, ``rotate`` and ``colour_jitter`` take float images (3, H, W) in [0, 1]; ``augment`` takes and gives
uint8 ones (the pipeline's), going through floats once, only when a rotation or a jitter needs them. Keypoints (K, 2) normalised (x, y) with a (K,) bool mask.
Normalised coordinates follow ``grid_sample(align_corners=False)``: x = 0 is the left edge of pixel 0.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from ..batch import PERSON, POSES, SHARD_IMAGES
from ..model.pose import flip_permutation



def hflip(sample: dict) -> dict:
    out = dict(sample)
    for key in SHARD_IMAGES:
        out[key] = sample[key].flip(-1)
    for key in POSES:
        perm = list(flip_permutation(sample[key].shape[0]))
        pose = sample[key][perm].clone()
        pose[:, 0] = 1 - pose[:, 0]
        out[key] = pose
        out[f"{key}_valid"] = sample[f"{key}_valid"][perm]
    return out


def rotate(sample: dict, degrees: float) -> dict:
    """Rotate every image and keypoint by ``degrees`` about the image centre."""
    out = dict(sample)
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    _, h, w = sample[PERSON].shape
    # Output pixel q (centred pixel units) samples the input at R q, R = [[c, -s], [s, c]], written in each
    # axis's normalised units for affine_grid; a keypoint at p therefore moves to R^-1 p = R^T p.
    matrix = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=torch.float32)
    stack = torch.stack([sample[k] for k in SHARD_IMAGES])
    grid = F.affine_grid(matrix.expand(len(SHARD_IMAGES), 2, 3), list(stack.shape), align_corners=False)
    rotated = F.grid_sample(stack, grid, mode="bilinear", padding_mode="border", align_corners=False)
    for key, img in zip(SHARD_IMAGES, rotated):
        out[key] = img
    for key in POSES:
        x = (sample[key][:, 0] * 2 - 1) * (w / 2)
        y = (sample[key][:, 1] * 2 - 1) * (h / 2)
        nx, ny = c * x + s * y, -s * x + c * y
        pose = torch.stack([(nx / (w / 2) + 1) / 2, (ny / (h / 2) + 1) / 2], dim=1)
        inside = ((pose >= 0) & (pose <= 1)).all(dim=1)
        valid = sample[f"{key}_valid"] & inside
        out[key] = torch.where(valid[:, None], pose.clamp(0, 1), torch.zeros_like(pose))
        out[f"{key}_valid"] = valid
    return out


def colour_jitter(sample: dict, brightness: float, contrast: float, saturation: float) -> dict:
    out = dict(sample)
    for key in SHARD_IMAGES:
        img = sample[key] * brightness
        mean = img.mean()
        img = (img - mean) * contrast + mean
        grey = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
        out[key] = ((img - grey) * saturation + grey).clamp(0, 1)
    return out


def augment(sample: dict, rng: random.Random, hflip_prob: float, rotation_degrees: float, jitter: float) -> dict:
    """A sample with uint8 images, augmented; its images uint8 again."""
    if rng.random() < hflip_prob:
        sample = hflip(sample)  # a flip is exact on uint8
    if rotation_degrees <= 0 and jitter <= 0:
        return sample
    sample = {k: v.float() / 255 if k in SHARD_IMAGES else v for k, v in sample.items()}
    if rotation_degrees > 0:
        sample = rotate(sample, rng.uniform(-rotation_degrees, rotation_degrees))
    if jitter > 0:
        sample = colour_jitter(sample, *(rng.uniform(1 - jitter, 1 + jitter) for _ in range(3)))
    return {k: (v * 255).round().clamp(0, 255).to(torch.uint8) if k in SHARD_IMAGES else v for k, v in sample.items()}
