"""The members of a sample, declared once: the person image (every UNet's target), the clothing-agnostic image,
the garment, the two poses, the garment mask evaluation reads, and the low-res image a super-resolving UNet
reads, made from the target. The shard writer and the decoder name a member's files from here, the
augmentations move its images and poses with the person, the device transfer makes its images [-1, 1]
floats, and each UNet family's conditioning names what it reads by these names.

A pose travels as two tensors: ``NAME`` (K, 2) keypoints in [0, 1] and ``NAME_valid`` (K,) bool.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PERSON, CA, GARMENT = "person", "ca", "garment"
PERSON_POSE, GARMENT_POSE = "person_pose", "garment_pose"
MASK, LOWRES = "mask", "lowres"


@dataclass(frozen=True)
class Member:
    kind: Literal["image", "pose", "mask"]  # RGB; (K, 3) keypoints and confidence; grey, 0 or 255
    files: tuple[str, ...] = ()  # the shard members it is read from, the first preferred; none: made in the pipeline
    optional: bool = False  # a shard sample may lack it


MEMBERS = {
    PERSON: Member("image", ("person.jpg", "person.png")),
    CA: Member("image", ("ca.jpg", "ca.png")),
    GARMENT: Member("image", ("garment.jpg", "garment.png")),
    PERSON_POSE: Member("pose", ("person_pose.npy",)),
    GARMENT_POSE: Member("pose", ("garment_pose.npy",)),
    MASK: Member("mask", ("mask.png",), optional=True),
    LOWRES: Member("image"),
}
# What a shard sample holds: the target and the inputs.
IN_SHARDS = tuple(name for name, m in MEMBERS.items() if m.files)
INPUTS = tuple(name for name in IN_SHARDS if name != PERSON)
# The images a shard holds; the augmentations move, and colour, them alike.
SHARD_IMAGES = tuple(name for name in IN_SHARDS if MEMBERS[name].kind == "image")
POSES = tuple(name for name, m in MEMBERS.items() if m.kind == "pose")
# uint8 from the decoder to the device, [-1, 1] floats there.
IMAGES = tuple(name for name, m in MEMBERS.items() if m.kind == "image")


def file_name(name: str, lossless: bool = False) -> str:
    """The shard member ``name`` is written to: an image as JPEG, or PNG where ``lossless`` (a test split's
    targets)."""
    files = MEMBERS[name].files
    return next(f for f in files if f.endswith(".png")) if lossless and len(files) > 1 else files[0]
