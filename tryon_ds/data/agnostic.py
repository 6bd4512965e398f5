"""Clothing-agnostic person images for data that do not ship one, built as the try-on literature does:
the garment's region and the limbs it covers, dilated, filled grey, the head and the rest kept.

One rule, DressCode's, written over groups of labels (``RULES``), read through the label set of the human
parser that made the map (``LABEL_SETS``: ATR's 18 labels, DressCode's and SCHP-ATR's; LIP's and CIHP's 20,
SCHP-LIP's and CIHP-PGN's), per garment category:
- ``upper_body``: the upper clothes and both arms, plus the torso quadrilateral of the shoulders and hips
  when those keypoints are detected (so a short top does not reveal its hem line);
- ``lower_body``: skirt, pants, belt and both legs;
- ``dresses``: dress, skirt, belt, arms and legs, plus the torso quadrilateral.
The region is dilated by 1/40 of the image height, then the head (face or head, hair, hat, sunglasses) is
kept, and for ``upper_body`` the lower garments as well, for ``lower_body`` the upper clothes: what the
garment does not cover stays the person's. In ATR's numbers (DressCode's ``label_maps``): upper clothes 4,
arms 14/15, skirt 5, pants 6, belt 8, legs 12/13, dress 7, head 11, hair 2, hat 1, sunglasses 3.

VITON-HD's older layout (``image-parse/`` with LIP labels, no ``agnostic-v3.2/``): VITON-HD's own recipe
from its ``datasets.py``: the arms and torso drawn grey from the keypoints, then the head (LIP 4, 13) and
the lower body (9, 12, 16-19) pasted back.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

GREY = (128, 128, 128)
# Groups of each parser's labels. LIP and CIHP share the numbering but for 10 (LIP jumpsuits, CIHP torso skin):
# both go with a dress or an upper garment alike, so one table serves both.
LABEL_SETS = {
    "atr": {"head": (1, 2, 3, 11), "upper": (4,), "skirt": (5,), "pants": (6,), "dress": (7,), "belt": (8,),
            "arms": (14, 15), "legs": (12, 13)},
    "lip": {"head": (1, 2, 4, 13), "upper": (5, 7, 10), "skirt": (12,), "pants": (9,), "dress": (6, 10), "belt": (),
            "arms": (14, 15), "legs": (16, 17)},
}
LABEL_COUNTS = {"atr": 18, "lip": 20}
RULES = {  # category: (groups removed, whether the torso quadrilateral goes too, groups kept)
    "upper_body": (("upper", "arms"), True, ("head", "skirt", "pants")),
    "lower_body": (("skirt", "pants", "belt", "legs"), False, ("head", "upper")),
    "dresses": (("dress", "skirt", "belt", "arms", "legs"), True, ("head",)),
}
CATEGORIES = tuple(RULES)
# What the garment itself is, per category: what is cut out of a photo of it being worn.
GARMENT = {"upper_body": ("upper",), "lower_body": ("skirt", "pants"), "dresses": ("dress",)}


def labels_of(label_set: str, groups: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(label for group in groups for label in LABEL_SETS[label_set][group])


def _labels(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A label map's values (a palette image's indices, not its colours) at ``size``."""
    image = image if image.mode in ("L", "P") else image.convert("L")
    return np.asarray(image.resize(size, Image.NEAREST))


def _torso(keypoints: np.ndarray | None, size: tuple[int, int]) -> Image.Image:
    """The quadrilateral right shoulder, left shoulder, left hip, right hip (COCO-18 2, 5, 11, 8)."""
    mask = Image.new("L", size, 0)
    if keypoints is not None and (keypoints[[2, 5, 11, 8], 2] > 0).all():
        ImageDraw.Draw(mask).polygon([tuple(keypoints[i, :2]) for i in (2, 5, 11, 8)], fill=255)
    return mask


def dilate(mask: np.ndarray, k: int) -> np.ndarray:
    """A bool mask dilated by a k x k square (k odd): exactly PIL's ``ImageFilter.MaxFilter(k)`` on it, in time
    independent of k: a pixel is set when its window's sum in the zero-padded integral image is not zero
    (the padding cannot raise a maximum, so it equals PIL's edge-copying border)."""
    r = k // 2
    padded = np.zeros((mask.shape[0] + 2 * r + 1, mask.shape[1] + 2 * r + 1), np.int32)
    padded[r + 1:r + 1 + mask.shape[0], r + 1:r + 1 + mask.shape[1]] = mask
    integral = padded.cumsum(0).cumsum(1)
    h, w = mask.shape
    window = integral[k:k + h, k:k + w] - integral[:h, k:k + w] - integral[k:k + h, :w] + integral[:h, :w]
    return window > 0


def parsed_agnostic(person: Image.Image, labels: Image.Image, category: str, keypoints: np.ndarray | None,
                    label_set: str = "atr", photo_height: int | None = None) -> tuple[Image.Image, Image.Image]:
    """(agnostic image, the mask of what was greyed out) for a person image of ``category`` and its label map
    in ``label_set`` (DressCode's: ATR). ``photo_height``: the height of the photo ``person`` was scaled down
    from, whose 1/40 the dilation is (scaled with it)."""
    removed, torso, kept = RULES[category]
    lab = _labels(labels, person.size)
    region = np.isin(lab, labels_of(label_set, removed))
    if torso:
        region |= np.asarray(_torso(keypoints, person.size)) > 0
    photo_height = photo_height or person.height
    radius = (max(3, photo_height // 40) | 1) // 2
    region = dilate(region, 2 * max(1, round(radius * person.height / photo_height)) + 1)
    region &= ~np.isin(lab, labels_of(label_set, kept))
    mask = Image.fromarray((region * 255).astype(np.uint8))
    return Image.composite(Image.new("RGB", person.size, GREY), person.convert("RGB"), mask), mask


def cut_out(photo: Image.Image, labels: Image.Image, category: str, label_set: str) -> Image.Image:
    """The garment of ``category`` from a photo of someone wearing it, on white (what training pads with)."""
    garment = np.isin(_labels(labels, photo.size), labels_of(label_set, GARMENT[category]))
    keep = Image.fromarray((garment * 255).astype(np.uint8))
    return Image.composite(photo.convert("RGB"), Image.new("RGB", photo.size, (255, 255, 255)), keep)


def viton_agnostic(person: Image.Image, parse: Image.Image, keypoints: np.ndarray) -> Image.Image:
    """VITON-HD's agnostic image (its datasets.py ``get_img_agnostic``), at any resolution."""
    pose = keypoints[:, :2].astype(np.float64).copy()
    r = 20 * person.height / 1024
    lab = _labels(parse, person.size)
    head = Image.fromarray((np.isin(lab, (4, 13)) * 255).astype(np.uint8))
    lower = Image.fromarray((np.isin(lab, (9, 12, 16, 17, 18, 19)) * 255).astype(np.uint8))
    out = person.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    # Hips moved apart to the shoulders' width, as VITON-HD does, so the torso mask fits the body.
    shoulders = np.linalg.norm(pose[5] - pose[2])
    hips = np.linalg.norm(pose[11] - pose[8])
    if hips > 0:
        mid = (pose[8] + pose[11]) / 2
        pose[8] = mid + (pose[8] - mid) / hips * shoulders
        pose[11] = mid + (pose[11] - mid) / hips * shoulders
    seen = keypoints[:, 2] > 0

    def dot(i, rx, ry):
        draw.ellipse((pose[i, 0] - rx, pose[i, 1] - ry, pose[i, 0] + rx, pose[i, 1] + ry), GREY, GREY)

    def line(i, j, width):
        if seen[i] and seen[j]:
            draw.line([tuple(pose[i]), tuple(pose[j])], GREY, width=int(width))

    line(2, 5, r * 10)
    for i in (2, 5):
        if seen[i]:
            dot(i, r * 5, r * 5)
    for i in (3, 4, 6, 7):
        if seen[i - 1] and seen[i]:
            line(i - 1, i, r * 10)
            dot(i, r * 5, r * 5)
    for i in (8, 11):
        if seen[i]:
            dot(i, r * 3, r * 6)
    line(2, 8, r * 6)
    line(5, 11, r * 6)
    line(8, 11, r * 12)
    if seen[[2, 5, 11, 8]].all():
        draw.polygon([tuple(pose[i]) for i in (2, 5, 11, 8)], GREY, GREY)
    if seen[1]:
        draw.rectangle((pose[1, 0] - r * 7, pose[1, 1] - r * 7, pose[1, 0] + r * 7, pose[1, 1] + r * 7), GREY, GREY)
    out.paste(person.convert("RGB"), None, head)
    out.paste(person.convert("RGB"), None, lower)
    return out
