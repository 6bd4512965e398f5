"""A procedural try-on data set, so the whole system runs and can be checked with no download.

Each sample is a person (a posed body silhouette drawn from 18 OpenPose-ordered keypoints, with varied
skin, background, pose and body shape) wearing a garment (t-shirt, long sleeve or tank top; solid, stripes,
checks or dots). The garment's pattern lives in the torso's own frame, so it is warped with the body:
- ``person``:  the target, the person wearing the garment;
- ``ca``:      the clothing-agnostic image, the person with the whole upper-body garment area greyed out
               (wider than any garment, so its outline does not leak the sleeve length);
- ``garment``: the same garment, either laid flat (a product image: no garment pose) or segmented from
               another person in another pose (garment pose = that pose);
- ``mask``:    the region the ca image removed, used by the evaluation.
Learning it means reading colour, pattern and sleeve length from the garment image and drawing them in
the person's pose: a small model does that on a CPU in minutes.
"""
from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..seeding import rng_for

SKIN = [(255, 224, 196), (234, 192, 160), (198, 143, 105), (141, 85, 54), (94, 58, 36)]
PATTERNS = ("solid", "stripes", "checks", "dots")
GARMENT_TYPES = ("tshirt", "longsleeve", "tank")
AGNOSTIC_GREY = (128, 128, 128)
# Keypoints that are sometimes left undetected, as a real pose estimator would.
FLAKY = (14, 15, 16, 17)


def _rotate(v, angle):
    c, s = math.cos(angle), math.sin(angle)
    return (v[0] * c - v[1] * s, v[0] * s + v[1] * c)


def random_pose(rng: random.Random, size: int, frontal: bool = False) -> np.ndarray:
    """COCO-18 keypoints (x, y) in pixels of a size x size canvas, for a standing person."""
    # Upper-body framing, as in VITON-HD; a flat (frontal) garment is centred and fills its frame.
    s = size * (1.6 if frontal else rng.uniform(1.15, 1.4))
    cx = size / 2 if frontal else size / 2 + rng.uniform(-0.06, 0.06) * size
    top = size / 2 - 0.37 * s if frontal else size * rng.uniform(-0.02, 0.04)
    shoulder = s * (0.2 if frontal else rng.uniform(0.16, 0.24)) / 2
    hip = shoulder * (0.8 if frontal else rng.uniform(0.6, 0.9))
    neck = (cx, top + 0.2 * s)
    lean = 0.0 if frontal else rng.uniform(-0.08, 0.08)
    torso = 0.33 * s
    mid_hip = (neck[0] + math.sin(lean) * torso, neck[1] + math.cos(lean) * torso)
    k = np.zeros((18, 2))
    k[1] = neck
    k[0] = (neck[0], neck[1] - 0.1 * s)
    k[14], k[15] = (k[0][0] - 0.025 * s, k[0][1] - 0.02 * s), (k[0][0] + 0.025 * s, k[0][1] - 0.02 * s)
    k[16], k[17] = (k[0][0] - 0.05 * s, k[0][1]), (k[0][0] + 0.05 * s, k[0][1])
    k[2], k[5] = (neck[0] - shoulder, neck[1] + 0.02 * s), (neck[0] + shoulder, neck[1] + 0.02 * s)
    k[8], k[11] = (mid_hip[0] - hip, mid_hip[1]), (mid_hip[0] + hip, mid_hip[1])
    upper, lower = 0.17 * s, 0.16 * s
    for side, (sh, el, wr) in ((-1, (2, 3, 4)), (1, (5, 6, 7))):
        a1 = math.radians(10 if frontal else rng.uniform(5, 60)) * side
        a2 = a1 + (0 if frontal else math.radians(rng.uniform(-40, 40)))
        d1, d2 = _rotate((0, upper), -a1), _rotate((0, lower), -a2)
        k[el] = (k[sh][0] + d1[0], k[sh][1] + d1[1])
        k[wr] = (k[el][0] + d2[0], k[el][1] + d2[1])
    thigh, shin = 0.22 * s, 0.2 * s
    for side, (hp, kn, an) in ((-1, (8, 9, 10)), (1, (11, 12, 13))):
        a = math.radians(3 if frontal else rng.uniform(0, 15)) * side
        d = _rotate((0, thigh), -a)
        k[kn] = (k[hp][0] + d[0], k[hp][1] + d[1])
        k[an] = (k[kn][0] + d[0] * shin / thigh, k[kn][1] + d[1] * shin / thigh)
    return k


def _limb(draw, a, b, width, fill):
    draw.line([tuple(a), tuple(b)], fill=fill, width=max(1, int(width)))
    for p in (a, b):
        r = width / 2
        draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=fill)


def _torso_polygon(k, inflate=1.0):
    centre = (k[2] + k[5] + k[8] + k[11]) / 4
    pts = [k[2], k[5], k[11], k[8]]
    return [tuple(centre + (p - centre) * inflate) for p in pts]


def _garment_mask(k, size, kind, limb_w, inflate=1.12, sleeves_scale=1.0):
    """The garment's region on a body with keypoints k, as an L image."""
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    d.polygon(_torso_polygon(k, inflate), fill=255)
    if kind != "tank":
        width = limb_w * 1.25 * sleeves_scale
        for sh, el, wr in ((2, 3, 4), (5, 6, 7)):
            if kind == "longsleeve":
                _limb(d, k[sh], k[el], width, 255)
                _limb(d, k[el], k[wr], width, 255)
            else:
                _limb(d, k[sh], k[sh] + (k[el] - k[sh]) * 0.6, width, 255)
    return m


def _pattern(k, size, garment) -> Image.Image:
    """The garment's texture rendered in the torso frame of pose k (so it follows the body)."""
    origin = k[1]
    across = k[5] - k[2]
    scale = max(np.linalg.norm(across), 1e-3)
    u = across / scale
    v = np.array([-u[1], u[0]])
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    a = ((xs - origin[0]) * u[0] + (ys - origin[1]) * u[1]) / scale
    b = ((xs - origin[0]) * v[0] + (ys - origin[1]) * v[1]) / scale
    period = garment["period"]
    kind = garment["pattern"]
    if kind == "stripes":
        sel = np.floor(b / period) % 2 == 0
    elif kind == "checks":
        sel = (np.floor(a / period) + np.floor(b / period)) % 2 == 0
    elif kind == "dots":
        fa, fb = (a / period) % 1 - 0.5, (b / period) % 1 - 0.5
        sel = fa * fa + fb * fb > 0.09
    else:
        sel = np.ones_like(a, dtype=bool)
    c1, c2 = np.array(garment["colour"], np.uint8), np.array(garment["colour2"], np.uint8)
    return Image.fromarray(np.where(sel[..., None], c1, c2))


def _body(size, k, skin, background, limb_w):
    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    for a, b in ((8, 9), (9, 10), (11, 12), (12, 13)):
        _limb(d, k[a], k[b], limb_w * 1.2, (60, 60, 90))  # trousers
    d.polygon(_torso_polygon(k), fill=skin)
    for a, b in ((2, 3), (3, 4), (5, 6), (6, 7), (1, 0)):
        _limb(d, k[a], k[b], limb_w, skin)
    r = np.linalg.norm(k[16] - k[17]) * 0.75
    d.ellipse([k[0][0] - r, k[0][1] - r, k[0][0] + r, k[0][1] + r], fill=skin)
    hair = tuple(int(c * 0.35) for c in skin)
    d.chord([k[0][0] - r, k[0][1] - r, k[0][0] + r, k[0][1] + r], 180, 360, fill=hair)
    return img


def _random_garment(rng: random.Random) -> dict:
    def colour():
        return tuple(rng.randint(20, 235) for _ in range(3))
    return {"type": rng.choice(GARMENT_TYPES), "pattern": rng.choice(PATTERNS), "colour": colour(),
            "colour2": colour(), "period": rng.uniform(0.12, 0.3)}


def _keypoints_with_confidence(k: np.ndarray, rng: random.Random, size: int) -> np.ndarray:
    # Keypoints out of the frame (the upper-body framing cuts the legs) are not detected.
    conf = ((k >= 0) & (k <= size)).all(axis=1, keepdims=True).astype(np.float64)
    for i in FLAKY:
        if rng.random() < 0.15:
            conf[i] = 0.0
    out = np.concatenate([k, conf], axis=1).astype(np.float32)
    out[conf[:, 0] == 0, :2] = 0.0  # OpenPose writes undetected keypoints as (0, 0, 0)
    return out


def render_sample(index: int, seed: int = 0, size: int = 256) -> dict:
    """The ``index``-th sample of the synthetic set ``seed``: PIL images and (18, 3) pixel keypoints
    (x, y, confidence), ``garment_pose`` None for a flat product garment."""
    rng = rng_for("tryon-synthetic", seed, index)
    garment = _random_garment(rng)
    skin, background = rng.choice(SKIN), tuple(rng.randint(150, 255) for _ in range(3))
    k = random_pose(rng, size)
    limb_w = size * rng.uniform(0.045, 0.065)

    body = _body(size, k, skin, background, limb_w)
    garment_mask = _garment_mask(k, size, garment["type"], limb_w)
    person = Image.composite(_pattern(k, size, garment), body, garment_mask)

    agnostic = _garment_mask(k, size, "longsleeve", limb_w, inflate=1.25, sleeves_scale=1.5)
    agnostic = agnostic.filter(ImageFilter.MaxFilter(3))
    ca = Image.composite(Image.new("RGB", (size, size), AGNOSTIC_GREY), person, agnostic)

    flat = rng.random() < 0.5
    k_g = random_pose(rng, size, frontal=flat)
    g_mask = _garment_mask(k_g, size, garment["type"], limb_w)
    garment_img = Image.composite(_pattern(k_g, size, garment), Image.new("RGB", (size, size), (255, 255, 255)),
                                  g_mask)
    return {"person": person, "ca": ca, "garment": garment_img, "mask": agnostic,
            "person_pose": _keypoints_with_confidence(k, rng, size),
            "garment_pose": None if flat else _keypoints_with_confidence(k_g, rng, size),
            "meta": {"garment_type": garment["type"], "pattern": garment["pattern"], "flat_garment": flat}}


def export_folders(root, n: int, seed: int = 0, size: int = 256) -> None:
    """Write ``n`` synthetic samples in the ``folders`` layout (JPEG images, (18, 3) pixel poses);
    a flat garment's pose is written as all-undetected, the only way that layout can say it."""
    from pathlib import Path

    root = Path(root)
    for d in ("person_images", "ca_images", "garment_images", "person_poses", "garment_poses"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        s = render_sample(i, seed, size)
        key = f"{i:06d}"
        for name in ("person", "ca", "garment"):
            s[name].save(root / f"{name}_images" / f"{key}.jpg", quality=95)
        np.save(root / "person_poses" / f"{key}.npy", s["person_pose"])
        np.save(root / "garment_poses" / f"{key}.npy",
                s["garment_pose"] if s["garment_pose"] is not None else np.zeros((18, 3), np.float32))
