"""Pose keypoints -> tokens, as the paper embeds them: one token per keypoint.

A pose is ``(K, 2)`` normalised (x, y) in [0, 1] plus a ``(K,)`` validity mask. A valid keypoint's token is
a linear embedding of its coordinates; an invalid one (not detected, or a flat product garment with no
wearer at all) gets a learned null token instead, so its coordinates cannot matter: "absent" is an input
the network learns, never a made-up point. Each token also carries which joint and which pose (person or
garment's wearer) it is. The tokens join the self-attention's keys and values; for FiLM each pose is pooled
into one vector by attention pooling (CLIP's).
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .attention import attention

# OpenPose COCO-18 order: 0 nose, 1 neck, 2 r-shoulder, 3 r-elbow, 4 r-wrist, 5 l-shoulder, 6 l-elbow,
# 7 l-wrist, 8 r-hip, 9 r-knee, 10 r-ankle, 11 l-hip, 12 l-knee, 13 l-ankle, 14 r-eye, 15 l-eye,
# 16 r-ear, 17 l-ear. A horizontal flip swaps each right keypoint with its left twin.
COCO18_NAMES = ("Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist", "RHip", "RKnee",
                "RAnkle", "LHip", "LKnee", "LAnkle", "REye", "LEye", "REar", "LEar")
COCO18_FLIP = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)


def flip_permutation(num_keypoints: int) -> tuple[int, ...]:
    if num_keypoints == len(COCO18_FLIP):
        return COCO18_FLIP
    return tuple(range(num_keypoints))


class PoseTokens(nn.Module):
    """(person pose, its mask, garment pose, its mask) -> (B, 2K, dim): the person's K tokens, then the
    garment wearer's."""

    def __init__(self, num_keypoints: int, dim: int):
        super().__init__()
        self.coords = nn.Linear(2, dim)
        self.null = nn.Parameter(torch.randn(dim) * 0.02)
        self.identity = nn.Parameter(torch.randn(2, num_keypoints, dim) * 0.02)  # which pose, which joint

    def forward(self, person, person_valid, garment, garment_valid) -> torch.Tensor:
        keypoints = torch.stack([person, garment], dim=1)  # B, 2, K, 2
        valid = torch.stack([person_valid, garment_valid], dim=1)[..., None]
        embedded = self.coords((keypoints * 2 - 1).to(self.coords.weight.dtype))
        tokens = torch.where(valid, embedded, self.null.to(embedded.dtype)) + self.identity.to(embedded.dtype)
        return rearrange(tokens, "b p k d -> b (p k) d")


class AttentionPool(nn.Module):
    """CLIP's attention pooling: a learned query attends over the tokens; one vector out."""

    def __init__(self, dim: int, heads: int, out_dim: int, backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(tokens)
        q = rearrange(self.to_q(self.query.to(h.dtype)).expand(h.shape[0], 1, -1), "b n (h d) -> b h n d",
                      h=self.heads)
        k, v = rearrange(self.to_kv(h), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        return self.to_out(rearrange(attention(q, k, v, self.backend), "b h n d -> b (n h d)"))
