"""Pose keypoints as the releases ship them, read into COCO-18 order: (18, 3) pixel x, y and a confidence,
0 meaning not detected.

Read as they come:
- OpenPose JSON (``{"people": [{"pose_keypoints_2d": [...]}]}``) in COCO-18 (18 x 3) or BODY_25 (25 x 3,
  mapped to COCO-18: MidHip and the feet dropped); VITON-HD ships BODY_25. No person (``"people": []``)
  means no pose;
- DressCode JSON (``{"keypoints": [[x, y, score, id], ...]}``, 18 joints) computed on a 384 x 512 copy of
  each image, so rescaled to the image's own size; ``[-1, -1, 0, -1]`` is a joint not detected. DressCode's
  photos crop the head off, and its files write the joints the crop cut off (nose, eyes, ears) at y = 0 with
  a score; DressCode's own loader (aimagelab/dress-code, ``data/dataset.py``) uses a joint only when x > 1
  and y > 1, and so do we: such joints are stored invalid and counted with the dropped ones;
- ``.npy`` arrays (18, 2), (18, 3) or (25, 3) in the pixels of their image;
- the same in memory (arrays, nested lists, OpenPose's flat list of 54 or 75 numbers, a parsed JSON dict), as
  the Python API takes them.
A joint not detected (confidence 0, coordinates -1, or (0, 0) without a confidence) is stored invalid,
never as a point at (0, 0). A detected joint at most ``OUTSIDE_TOLERANCE`` of the image's size outside it
is clipped onto its edge; one further out is marked invalid; both are counted. Messages name a joint as
the source file numbers it ("RKnee, BODY_25 #10") with its coordinates and the image size.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..model.pose import COCO18_NAMES

BODY25_NAMES = ("Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist", "MidHip", "RHip",
                "RKnee", "RAnkle", "LHip", "LKnee", "LAnkle", "REye", "LEye", "REar", "LEar", "LBigToe", "LSmallToe",
                "LHeel", "RBigToe", "RSmallToe", "RHeel")
BODY25_TO_COCO18 = tuple(BODY25_NAMES.index(name) for name in COCO18_NAMES)
DRESSCODE_CANVAS = (384, 512)  # (W, H) of the copy DressCode's keypoints were computed on
OUTSIDE_TOLERANCE = 0.05  # of the image's width/height: within it a joint is clipped, beyond it dropped


class KeypointError(Exception):
    """The file holds no usable pose: unreadable, of an unknown shape, NaN."""


@dataclass
class Pose:
    points: np.ndarray | None  # (18, 3) x, y in the image's pixels, confidence (0: not detected); None: no person
    clipped: list[str] = field(default_factory=list)  # joints slightly outside, moved onto the edge
    dropped: list[str] = field(default_factory=list)  # joints far outside, stored invalid


def _joint(index: int, scheme: str) -> str:
    names = BODY25_NAMES if scheme == "BODY_25" else COCO18_NAMES
    return f"{names[index] if index < len(names) else 'joint'}, {scheme} #{index}"


def _load(source) -> object:
    """What a pose source holds: a file's parsed JSON or array, or the in-memory pose itself."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return np.load(path, allow_pickle=False)
    return source


def _raw(data, size: tuple[int, int]) -> tuple[np.ndarray | None, str, list[str]]:
    """(K, 3) pixel x, y, confidence as the source has them, its numbering scheme, and the joints its format
    marks as cut off (stored as not detected, and said so)."""
    if isinstance(data, dict):
        if "keypoints" in data:  # DressCode
            a = np.asarray(data["keypoints"], dtype=np.float64)
            if a.ndim != 2 or a.shape[1] != 4:
                raise KeypointError(f"'keypoints' of shape {a.shape}, expected (18, 4): x, y, score, id")
            undetected = (a[:, 0] < 0) | (a[:, 1] < 0)
            # DressCode's loader's rule (x > 1 and y > 1 on its canvas): joints the head crop cut off sit at y = 0.
            cut = ~undetected & ((a[:, 0] <= 1) | (a[:, 1] <= 1))
            notes = [f"{_joint(i, 'COCO-18')} at ({a[i, 0]:.1f}, {a[i, 1]:.1f}) on the edge of DressCode's "
                     "384x512 canvas, where its files put the joints the crop cut off: stored as not detected"
                     for i in np.flatnonzero(cut)]
            undetected |= cut
            pts = np.stack([a[:, 0] * size[0] / DRESSCODE_CANVAS[0], a[:, 1] * size[1] / DRESSCODE_CANVAS[1],
                            np.where(undetected, 0.0, np.maximum(a[:, 2], 1e-3))], axis=1)
            pts[undetected, :2] = 0
            return pts, "COCO-18", notes
        people = data.get("people")
        if people is None:
            raise KeypointError("neither 'people' (OpenPose) nor 'keypoints' (DressCode) in the JSON")
        if not people:
            return None, "COCO-18", []
        data = people[0]["pose_keypoints_2d"]
    a = np.asarray(data, dtype=np.float64)
    if a.ndim == 1 and len(a) in (54, 75):  # OpenPose's flat x, y, confidence list
        a = a.reshape(-1, 3)
    if a.ndim != 2 or (a.shape[0], a.shape[1]) not in ((18, 2), (18, 3), (25, 3)):
        raise KeypointError(f"pose of shape {tuple(a.shape)}, expected (18, 2), (18, 3) or (25, 3) "
                            "(x, y[, confidence]; COCO-18 or BODY_25), or OpenPose's flat list of 54 or 75 numbers")
    if a.shape[1] == 2:  # without confidences, OpenPose's (0, 0) marks a joint not detected
        a = np.concatenate([a, (np.abs(a).sum(axis=1, keepdims=True) > 0).astype(np.float64)], axis=1)
    return a, "BODY_25" if a.shape[0] == 25 else "COCO-18", []


def read_keypoints(source, size: tuple[int, int]) -> Pose:
    """The pose ``source`` holds, for an image of ``size`` (W, H), in COCO-18 order: a file (.npy, OpenPose or
    DressCode JSON) or the pose itself (an array or nested list, OpenPose's flat list, a parsed JSON dict), in
    the pixels of its image. The same reading, checks and messages for shards, the CLI and the Python API.
    Raises KeypointError."""
    try:
        raw, scheme, cut = _raw(_load(source), size)
    except KeypointError:
        raise
    except Exception as err:
        raise KeypointError(f"unreadable pose ({type(err).__name__}: {err})") from None
    if raw is None:
        return Pose(None)
    if not np.isfinite(raw).all():
        raise KeypointError("pose has NaN or infinite values")
    w, h = size
    detected = (raw[:, 2] > 0) & ~((raw[:, 0] == -1) & (raw[:, 1] == -1))
    pose = Pose(np.zeros((len(raw), 3)), dropped=list(cut))
    for i in np.flatnonzero(detected):
        x, y = raw[i, :2]
        where = f"{_joint(i, scheme)} at ({x:.1f}, {y:.1f}) outside the {w}x{h} image"
        if -OUTSIDE_TOLERANCE * w <= x <= (1 + OUTSIDE_TOLERANCE) * w and -OUTSIDE_TOLERANCE * h <= y <= (1 + OUTSIDE_TOLERANCE) * h:
            if not (0 <= x <= w and 0 <= y <= h):
                pose.clipped.append(where + ": clipped onto its edge")
            pose.points[i] = (min(max(x, 0.0), w), min(max(y, 0.0), h), raw[i, 2])
        else:
            pose.dropped.append(where + ": stored as not detected")
    if scheme == "BODY_25":
        pose.points = pose.points[list(BODY25_TO_COCO18)]
    pose.points = pose.points.astype(np.float32)
    return pose


# OpenPose's COCO-18 skeleton (its limbSeq, 0-based): what a pose drawn over its picture joins.
COCO18_LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
                (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))


def draw_pose(image, points: np.ndarray, valid: np.ndarray, colour=(255, 64, 32)):
    """A copy of the PIL ``image`` with a stored pose drawn over it: ``points`` (K, 2) in [0, 1] of the image,
    ``valid`` (K,) which of them were detected; COCO-18's skeleton joined, any other layout as points."""
    from PIL import ImageDraw

    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    xy = [(float(x) * (out.width - 1), float(y) * (out.height - 1)) for x, y in np.asarray(points)[:, :2]]
    valid = np.asarray(valid, bool)
    width = max(1, round(min(out.size) / 64))
    if len(xy) == len(COCO18_NAMES):
        for a, b in COCO18_LIMBS:
            if valid[a] and valid[b]:
                draw.line([xy[a], xy[b]], fill=colour, width=width)
    r = width + 1
    for (x, y), ok in zip(xy, valid):
        if ok:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return out
