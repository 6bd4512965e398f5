"""Clothing-agnostic person images for releases that do not ship one, built as the try-on literature does:
the garment's region and the limbs it covers, dilated, filled grey, the head and the rest kept.

DressCode (ATR labels in ``label_maps/NNNNNN_4.png``), per category:
- ``upper_body``: upper clothes (4) and both arms (14, 15), plus the torso quadrilateral of the shoulders
  and hips when those keypoints are detected (so a short top does not reveal its hem line);
- ``lower_body``: skirt (5), pants (6), belt (8) and both legs (12, 13);
- ``dresses``: dress (7), skirt (5), belt (8), arms and legs, plus the torso quadrilateral.
The region is dilated by 1/40 of the image height, then the head (11), hair (2), hat (1) and sunglasses (3)
are kept, and for ``upper_body`` the lower garments (5, 6) as well, for ``lower_body`` the upper clothes
(4): what the garment does not cover stays the person's.

VITON-HD's older layout (``image-parse/`` with LIP labels, no ``agnostic-v3.2/``): VITON-HD's own recipe
from its ``datasets.py``: the arms and torso drawn grey from the keypoints, then the head (LIP 4, 13) and
the lower body (9, 12, 16-19) pasted back.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

GREY = (128, 128, 128)
ATR = {"background": 0, "hat": 1, "hair": 2, "sunglasses": 3, "upper_clothes": 4, "skirt": 5, "pants": 6, "dress": 7,
       "belt": 8, "left_shoe": 9, "right_shoe": 10, "head": 11, "left_leg": 12, "right_leg": 13, "left_arm": 14,
       "right_arm": 15, "bag": 16, "scarf": 17}
ARMS, LEGS = (14, 15), (12, 13)
DRESSCODE_RULES = {  # category: (labels removed, whether the torso quadrilateral goes too, labels kept)
    "upper_body": ((4, *ARMS), True, (1, 2, 3, 11, 5, 6)),
    "lower_body": ((5, 6, 8, *LEGS), False, (1, 2, 3, 11, 4)),
    "dresses": ((7, 5, 8, *ARMS, *LEGS), True, (1, 2, 3, 11)),
}
CATEGORIES = tuple(DRESSCODE_RULES)


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


def dresscode_agnostic(person: Image.Image, labels: Image.Image, category: str,
                       keypoints: np.ndarray | None) -> tuple[Image.Image, Image.Image]:
    """(agnostic image, the mask of what was greyed out) for a DressCode person image of ``category``."""
    removed, torso, kept = DRESSCODE_RULES[category]
    lab = _labels(labels, person.size)
    region = Image.fromarray((np.isin(lab, removed) * 255).astype(np.uint8))
    if torso:
        region = Image.fromarray(np.maximum(np.asarray(region), np.asarray(_torso(keypoints, person.size))))
    k = max(3, person.height // 40) | 1
    region = np.asarray(region.filter(ImageFilter.MaxFilter(k))) > 0
    region &= ~np.isin(lab, kept)
    mask = Image.fromarray((region * 255).astype(np.uint8))
    return Image.composite(Image.new("RGB", person.size, GREY), person.convert("RGB"), mask), mask


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
