"""Pose keypoints -> embeddings.

A pose is ``(K, 2)`` normalised (x, y) in [0, 1] plus a ``(K,)`` validity mask. Invalid keypoints (not
detected, or a flat product garment that has no wearer at all) contribute only through the mask, so
"absent" is an input the network learns, never a made-up coordinate.
"""
from __future__ import annotations

import torch
from torch import nn

# OpenPose COCO-18 order: 0 nose, 1 neck, 2 r-shoulder, 3 r-elbow, 4 r-wrist, 5 l-shoulder, 6 l-elbow,
# 7 l-wrist, 8 r-hip, 9 r-knee, 10 r-ankle, 11 l-hip, 12 l-knee, 13 l-ankle, 14 r-eye, 15 l-eye,
# 16 r-ear, 17 l-ear. A horizontal flip swaps each right keypoint with its left twin.
COCO18_FLIP = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)


def flip_permutation(num_keypoints: int) -> tuple[int, ...]:
    if num_keypoints == len(COCO18_FLIP):
        return COCO18_FLIP
    return tuple(range(num_keypoints))


class PoseEncoder(nn.Module):
    """Embeds one pose into a vector: linear layers over the masked coordinates and the mask."""

    def __init__(self, num_keypoints: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * num_keypoints, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))

    def forward(self, keypoints: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        valid = valid.to(keypoints.dtype)
        centred = (keypoints * 2 - 1) * valid[..., None]
        return self.net(torch.cat([centred.flatten(1), valid], dim=1))
