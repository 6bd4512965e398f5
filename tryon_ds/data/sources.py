"""Input layouts for ``tools/make_shards.py``: where each sample's images and poses come from.

A layout scan returns :class:`SourceSample` records (a key plus where to read it); :func:`load_sample`
reads one in full, checks it and returns PIL images and pixel-coordinate keypoints, or raises
:class:`SampleError` listing every problem with its file and what was expected.

Layouts:
- ``folders``: ``person_images/ ca_images/ garment_images/ person_poses/ garment_poses/`` (the layout of
  the original TryOnDiffusion training guide), matched by file stem; poses are ``.npy`` arrays (K, 2) or
  (K, 3) in the source image's pixels.
- ``viton-hd``: the VITON-HD release (``train_pairs.txt``, ``test_pairs.txt``, and ``image/ cloth/
  agnostic-v3.2/ openpose_json/`` under ``train/`` and ``test/`` or at the top). Samples are paired (the
  person in their own garment, the only pairs with a ground truth); ``cloth/`` holds flat product images,
  so the garment pose is absent.
- ``synthetic``: :mod:`tryon_ds.data.synthetic`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from . import synthetic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FOLDER_DIRS = {"person": "person_images", "ca": "ca_images", "garment": "garment_images",
               "person_pose": "person_poses", "garment_pose": "garment_poses"}
# OpenPose BODY_25 -> COCO-18 (drops MidHip and the feet).
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)


class SampleError(Exception):
    def __init__(self, key: str, problems: list[str]):
        super().__init__(f"{key}: " + "; ".join(problems))
        self.key, self.problems = key, problems


@dataclass
class SourceSample:
    key: str
    files: dict[str, Path] = field(default_factory=dict)  # role -> path; absent garment_pose = none
    synthetic_index: int | None = None
    synthetic_seed: int = 0
    synthetic_size: int = 256


@dataclass
class LoadedSample:
    key: str
    person: Image.Image
    ca: Image.Image
    garment: Image.Image
    person_pose: np.ndarray          # (K, 3): x, y in source pixels, confidence (0 = not detected)
    garment_pose: np.ndarray | None  # None: the garment has no wearer (a flat product image)
    mask: Image.Image | None = None  # the region the ca image removed, where the source knows it
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- scanning
def _images_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def scan_folders(root: Path) -> tuple[list[SourceSample], list[str]]:
    """Samples of the ``folders`` layout and the problems found while matching them."""
    missing = [d for d in FOLDER_DIRS.values() if not (root / d).is_dir()]
    if missing:
        raise UserError(f"{root}: not the folders layout, missing folder(s) {', '.join(missing)} "
                        f"(expected {', '.join(FOLDER_DIRS.values())})")
    found = {role: (_images_by_stem(root / d) if "pose" not in role
                    else {p.stem: p for p in sorted((root / d).glob("*.npy"))})
             for role, d in FOLDER_DIRS.items()}
    samples, problems = [], []
    for key in sorted(found["person"]):
        files = {role: found[role].get(key) for role in FOLDER_DIRS}
        absent = [f"{root / FOLDER_DIRS[r]}/{key}{'.npy' if 'pose' in r else '.jpg|.png'}"
                  for r, p in files.items() if p is None]
        if absent:
            problems.append(f"{key}: missing counterpart " + ", ".join(absent))
            continue
        samples.append(SourceSample(key, files))
    for role in ("ca", "garment", "person_pose", "garment_pose"):
        for key in sorted(set(found[role]) - set(found["person"])):
            problems.append(f"{key}: {found[role][key]} has no person image "
                            f"{root / FOLDER_DIRS['person']}/{key}.jpg|.png")
    return samples, problems


def scan_viton_hd(root: Path) -> tuple[list[SourceSample], list[str]]:
    samples, problems = [], []
    pair_files = [root / f"{s}_pairs.txt" for s in ("train", "test") if (root / f"{s}_pairs.txt").is_file()]
    if not pair_files:
        raise UserError(f"{root}: not a VITON-HD folder, expected train_pairs.txt and/or test_pairs.txt")
    for pairs in pair_files:
        split = pairs.name.split("_")[0]
        base = root / split if (root / split).is_dir() else root
        for n, line in enumerate(pairs.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                problems.append(f"{pairs}:{n}: expected 'person.jpg cloth.jpg', got {line!r}")
                continue
            stem = Path(parts[0]).stem
            files = {"person": base / "image" / parts[0], "ca": base / "agnostic-v3.2" / parts[0],
                     "garment": base / "cloth" / parts[0],  # paired: the person's own garment
                     "person_pose": base / "openpose_json" / f"{stem}_keypoints.json"}
            absent = [str(p) for p in files.values() if not p.is_file()]
            if absent:
                problems.append(f"{split}/{stem}: missing counterpart " + ", ".join(absent))
                continue
            samples.append(SourceSample(f"{split}_{stem}", files))
    return samples, problems


def synthetic_samples(n: int, seed: int, size: int) -> list[SourceSample]:
    return [SourceSample(f"synth_{i:07d}", synthetic_index=i, synthetic_seed=seed, synthetic_size=size)
            for i in range(n)]


def detect_layout(root: Path) -> str:
    if (root / "train_pairs.txt").is_file() or (root / "test_pairs.txt").is_file():
        return "viton-hd"
    return "folders"


# --------------------------------------------------------------------------- loading
def read_image(path: Path, problems: list[str]) -> Image.Image | None:
    try:
        with Image.open(path) as img:
            img.load()  # decodes fully: a truncated file fails here, not later in training
            return img.convert("RGB")
    except Exception as err:  # PIL raises many types for bad files
        problems.append(f"{path}: unreadable or truncated image ({type(err).__name__}: {err})")
        return None


def read_pose(path: Path, num_keypoints: int, size: tuple[int, int] | None,
               problems: list[str]) -> np.ndarray | None:
    try:
        if path.suffix == ".json":
            people = json.loads(path.read_text()).get("people", [])
            if not people:
                problems.append(f"{path}: no person in the OpenPose JSON")
                return None
            flat = np.asarray(people[0]["pose_keypoints_2d"], dtype=np.float64).reshape(-1, 3)
            pose = flat[list(BODY25_TO_COCO18)] if len(flat) == 25 and num_keypoints == 18 else flat
        else:
            pose = np.load(path, allow_pickle=False).astype(np.float64)
    except Exception as err:
        problems.append(f"{path}: unreadable pose ({type(err).__name__}: {err})")
        return None
    if pose.ndim != 2 or pose.shape[0] != num_keypoints or pose.shape[1] not in (2, 3):
        problems.append(f"{path}: pose of shape {tuple(pose.shape)}, expected ({num_keypoints}, 2) or "
                        f"({num_keypoints}, 3) (x, y[, confidence])")
        return None
    if pose.shape[1] == 2:
        # Without confidences, OpenPose's (0, 0) marks an undetected keypoint.
        conf = (np.abs(pose).sum(axis=1, keepdims=True) > 0).astype(np.float64)
        pose = np.concatenate([pose, conf], axis=1)
    if not np.isfinite(pose).all():
        problems.append(f"{path}: pose has NaN or infinite values")
        return None
    if size is not None:
        w, h = size
        detected = pose[:, 2] > 0
        outside = detected & ((pose[:, 0] < -0.5) | (pose[:, 0] > w + 0.5) | (pose[:, 1] < -0.5) | (pose[:, 1] > h + 0.5))
        if outside.any():
            idx = np.flatnonzero(outside).tolist()
            problems.append(f"{path}: keypoint(s) {idx} lie outside the {w}x{h} image, expected pixel "
                            f"coordinates within it")
            return None
    return pose.astype(np.float32)


def load_sample(sample: SourceSample, num_keypoints: int = 18) -> LoadedSample:
    if sample.synthetic_index is not None:
        r = synthetic.render_sample(sample.synthetic_index, sample.synthetic_seed, sample.synthetic_size)
        return LoadedSample(sample.key, r["person"], r["ca"], r["garment"], r["person_pose"], r["garment_pose"],
                            r["mask"], r["meta"])
    problems: list[str] = []
    f = sample.files
    person, ca, garment = (read_image(f[r], problems) for r in ("person", "ca", "garment"))
    if person is not None and ca is not None and person.size != ca.size:
        problems.append(f"{f['ca']}: size {ca.size[0]}x{ca.size[1]} differs from the person image "
                        f"{f['person']} ({person.size[0]}x{person.size[1]}); they must be pixel-aligned")
    person_pose = read_pose(f["person_pose"], num_keypoints, person.size if person else None, problems)
    garment_pose = None
    if "garment_pose" in f:
        garment_pose = read_pose(f["garment_pose"], num_keypoints, garment.size if garment else None, problems)
    if problems:
        raise SampleError(sample.key, problems)
    return LoadedSample(sample.key, person, ca, garment, person_pose, garment_pose,
                        meta={"source": {r: str(p) for r, p in f.items()}})
