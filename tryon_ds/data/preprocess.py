"""How a picture becomes the UNets' input and back, in one place, so that shard writing, the training
pipeline, evaluation and inference prepare it the same way:

1. ``letterbox`` to the shard size (aspect kept, white padding) and ``normalise_pose`` to that image:
   tools/make_shards.py stores this. Inference pads its inputs to the cascade's aspect at their own
   resolution (``pad_to_aspect``): nothing is resampled before step 2, as nothing is after a shard is read;
2. ``unet_inputs``: the whole decoded PIL images as uint8 tensors (``pixels``), resized to one UNet's size
   by ``resize`` (augmented there when training); a super-resolution UNet also gets ``lowres``, the target
   at the previous UNet's size. A UNet trained on crops takes, in training, a random crop of that target
   (``crop_inputs``). With augmentation off, training, evaluation and inference therefore give a UNet the
   same pixels from the same picture, to the bit (tests/test_same_pixels.py).
3. ``to_device``: a batch on the device, its images [-1, 1] floats there. Images stay uint8 from the decoder
   to the device (a quarter of the bytes of float32 between loader workers and the trainer, pinned for the
   copy to a GPU), so a target is the shard's own pixels wherever no resize or augmentation touched it.
``to_image`` and ``image_grid`` turn [-1, 1] tensors back into pictures.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..batch import IMAGES, LOWRES, MASK, PERSON, SHARD_IMAGES
from .transforms import augment

PAD_COLOUR = (255, 255, 255)


def letterbox(img: Image.Image, size: tuple[int, int], fill=PAD_COLOUR, resample=Image.BICUBIC):
    """Resize to fit (H, W) keeping the aspect ratio, pad the rest. Returns image, scale, (pad_x, pad_y)."""
    h, w = size
    scale = min(w / img.width, h / img.height)
    nw, nh = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    out = Image.new(img.mode, (w, h), fill)
    pad = ((w - nw) // 2, (h - nh) // 2)
    out.paste(img.resize((nw, nh), resample) if (nw, nh) != img.size else img, pad)
    return out, scale, pad


def pad_to_aspect(img: Image.Image, size: tuple[int, int], fill=PAD_COLOUR) -> tuple[Image.Image, tuple[int, int]]:
    """``img`` padded (centred) to the aspect of ``size`` (H, W) at its own resolution, nothing resampled.
    Returns the image and the (x, y) offset of the original in it."""
    h, w = size
    width, height = max(img.width, round(img.height * w / h)), max(img.height, round(img.width * h / w))
    if (width, height) == img.size:
        return img, (0, 0)
    out = Image.new(img.mode, (width, height), fill)
    pad = ((width - img.width) // 2, (height - img.height) // 2)
    out.paste(img, pad)
    return out, pad


def normalise_pose(pose: np.ndarray | None, scale: float, pad, size: tuple[int, int], k: int) -> np.ndarray:
    """Pixel (x, y, confidence) -> (x, y, valid) in [0, 1] of the letterboxed image; None -> all invalid."""
    out = np.zeros((k, 3), np.float32)
    if pose is None:
        return out
    h, w = size
    valid = pose[:, 2] > 0
    out[:, 0] = (pose[:, 0] * scale + pad[0]) / w
    out[:, 1] = (pose[:, 1] * scale + pad[1]) / h
    out[:, :2] = np.clip(out[:, :2], 0.0, 1.0)
    out[:, 2] = valid
    out[~valid, :2] = 0.0
    return out


def pixels(img: Image.Image) -> torch.Tensor:
    """A PIL image -> uint8 (C, H, W): 3 channels, 1 for a greyscale mask."""
    arr = np.asarray(img if img.mode in ("RGB", "L") else img.convert("RGB"))
    return torch.from_numpy(arr.reshape(*arr.shape[:2], -1).copy()).permute(2, 0, 1).contiguous()


def pose_tensors(pose: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored (K, 3) pose (x, y, valid) -> (K, 2) coordinates in [0, 1] and a (K,) bool mask."""
    t = torch.from_numpy(np.asarray(pose, dtype=np.float32))
    return t[:, :2].clamp(0, 1), t[:, 2] > 0


def resize(img: torch.Tensor, size) -> torch.Tensor:
    """Antialiased bilinear, uint8 or float (C, H, W) in, the same dtype out."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img[None], size=tuple(size), mode="bilinear", antialias=True, align_corners=False)[0]


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch as the pipeline makes it (uint8 images, a 0/1 uint8 mask) on ``device``, images in [-1, 1] as
    float32 there, the mask 0./1."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if v.dtype == torch.uint8:
                v = from_uint8(v) if k in IMAGES else v.float()
        out[k] = v
    return out


def unet_inputs(sample: dict, config, unet_number: int, rng: random.Random | None = None) -> dict:
    """One sample (PIL images) -> UNet ``unet_number``'s inputs: uint8 images resized to its size, augmented
    there when ``rng`` is given (training); a super-resolution UNet also gets ``lowres``, the target at the
    previous UNet's size; the mask (where given) 0/1. Images absent from ``sample`` (inference has no target)
    are left out."""
    if rng is not None and config.crop_size(unet_number) is not None:
        return crop_inputs(sample, config, unet_number, rng)
    if rng is not None:
        d = config.data
        out = at_size({k: v for k, v in sample.items() if k != MASK}, config.image_size(unet_number))
        out = augment(out, rng, d.hflip_prob, d.rotation_degrees, d.color_jitter)
    else:
        out = at_size(sample, config.image_size(unet_number))
    if config.conditioning(unet_number).super_resolves and PERSON in out:
        out[LOWRES] = resize(out[PERSON], config.image_size(unet_number - 1))
    return out


def at_size(sample: dict, size: tuple[int, int]) -> dict:
    """A sample's PIL images (and mask, 0/1) as uint8 tensors at ``size``; its other fields as they are."""
    out = dict(sample)
    for name in SHARD_IMAGES:
        if name in sample:
            out[name] = resize(pixels(sample[name]), size)
    if MASK in sample:
        out[MASK] = (resize(pixels(sample[MASK])[:1], size) > 127).to(torch.uint8)
    return out


def crop_inputs(sample: dict, config, unet_number: int, rng: random.Random) -> dict:
    """Training inputs of a super-resolution UNet trained on crops (its ``crop_size``; Imagen's 1024 px
    model: 256 px crops): a random crop of the target at the UNet's size, the whole low-res image (the target
    at the previous UNet's size), and the crop's place (``crop``: top, left), where the UNet cuts the same
    crop from its upsampled low-res input. Only the target is read. The target and the low-res image are
    those ``unet_inputs`` makes for evaluation (flipped where ``data.hflip_prob`` says): the crop is cut from
    them, never resized on its own."""
    whole = unet_inputs({PERSON: sample[PERSON]}, config, unet_number)
    if rng.random() < config.data.hflip_prob:
        whole = {k: v.flip(-1) for k, v in whole.items()}
    h, w = config.image_size(unet_number)
    crop_h, crop_w = config.crop_size(unet_number)
    top, left = rng.randint(0, h - crop_h), rng.randint(0, w - crop_w)
    out = {k: v for k, v in sample.items() if k not in SHARD_IMAGES and k != MASK}
    out[PERSON] = whole[PERSON][:, top:top + crop_h, left:left + crop_w].contiguous()
    out[LOWRES] = whole[LOWRES]
    out["crop"] = torch.tensor([top, left])
    return out


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1]."""
    return x.float() / 127.5 - 1


def as_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any shape) as the uint8 pixels a saved PNG holds, on the CPU: what every metric
    sees, as a user would share it."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return as_uint8(x).permute(1, 2, 0).numpy()


def picture(x: torch.Tensor) -> Image.Image:
    """uint8 (3, H, W) pixels -> a PIL image: the inverse of ``pixels``."""
    return Image.fromarray(x.cpu().permute(1, 2, 0).numpy())


def to_image(x: torch.Tensor) -> Image.Image:
    return picture(as_uint8(x))


def image_grid(columns: list[torch.Tensor]) -> Image.Image:
    """Columns of (B, 3, H, W) images in [-1, 1], all of one size -> one picture, a row per sample."""
    rows = torch.cat([c.float() for c in columns], dim=3)  # B, 3, H, W * ncols
    return to_image(torch.cat(list(rows), dim=1))  # 3, B*H, W*ncols
