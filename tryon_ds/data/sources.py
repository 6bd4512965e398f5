"""Input layouts for ``tools/make_shards.py``: where each sample's images and poses come from, and which
split of the release it belongs to.

A layout scan returns :class:`SourceSample` records (a key, where to read it, its split and whether it is
paired) and the problems met while matching files; :func:`load_sample` reads one in full, checks it and
returns PIL images and pixel keypoints, or raises :class:`SampleError` listing every problem with its file.

Layouts:
- ``folders``: ``person_images/ ca_images/ garment_images/ person_poses/ garment_poses/``, matched by file
  stem (the layout of the original TryOnDiffusion training guide); all of it is training data.
- ``viton-hd``: the VITON-HD release: ``train/`` and ``test/`` with ``image/ cloth/ agnostic-v3.2/
  openpose_json/``, ``train_pairs.txt`` and ``test_pairs.txt``. Training samples are the person in their
  own garment; the test split gives every test person paired with their own garment (a ground truth
  exists) and each line of test_pairs.txt that names another person's garment as an unpaired sample.
  The older layout (``openpose-json/``, ``image-parse/``, no agnostic images, as VITON-HD's own
  datasets.py reads it) is accepted too: the agnostic image is then built by VITON-HD's recipe.
  ``cloth/`` holds flat product images, so the garment pose is absent.
- ``dresscode``: the DressCode release: ``dresses/ lower_body/ upper_body/``, each with ``images/``
  (``NNNNNN_0.jpg`` person, ``NNNNNN_1.jpg`` garment), ``keypoints/NNNNNN_2.json`` and
  ``label_maps/NNNNNN_4.png``, and the pairs files (``train_pairs.txt``, ``test_pairs_paired.txt``,
  ``test_pairs_unpaired.txt``) in each category folder, or at the top with a category column. The
  agnostic image is built from the label map (tryon_ds/data/agnostic.py); garments are flat.
- ``synthetic``: :mod:`tryon_ds.data.synthetic`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from . import agnostic, synthetic
from .keypoints import KeypointError, read_keypoints

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FOLDER_DIRS = {"person": "person_images", "ca": "ca_images", "garment": "garment_images",
               "person_pose": "person_poses", "garment_pose": "garment_poses"}
# VITON-HD folder names, the release's and (second) the older ones VITON-HD's own datasets.py reads.
VITON_DIRS = {"person": ("image",), "garment": ("cloth",), "person_pose": ("openpose_json", "openpose-json"),
              "ca": ("agnostic-v3.2",), "parse": ("image-parse-v3", "image-parse")}
LAYOUTS = ("folders", "viton-hd", "dresscode")


class SampleError(Exception):
    def __init__(self, key: str, problems: list[str]):
        super().__init__(f"{key}: " + "; ".join(problems))
        self.key, self.problems = key, problems


@dataclass
class SourceSample:
    key: str
    files: dict[str, Path] = field(default_factory=dict)  # role -> path; absent garment_pose = none
    split: str = "train"      # the release's split: "train" or "test"
    pair: str = "paired"      # "paired": the person wears the garment (a ground truth); "unpaired": another's
    category: str = ""        # DressCode's upper_body / lower_body / dresses
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


@dataclass
class Scan:
    samples: list[SourceSample]
    problems: list[str]
    notes: list[str] = field(default_factory=list)  # what the scan decided, to tell the user
    sources: dict[str, str] = field(default_factory=dict)  # split -> where it came from, for the manifest


# --------------------------------------------------------------------------- scanning
def _images_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def scan_folders(root: Path) -> Scan:
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
    return Scan(samples, problems, sources={"train": f"{root} (the folders layout has no test split)"})


def _pairs(path: Path, columns: tuple[int, ...], problems: list[str], notes: list[str]) -> list[list[str]]:
    """The lines of a pairs file, split. A malformed line is a problem; a repeated one is noted once and
    read once."""
    rows, seen = [], {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) not in columns:
            problems.append(f"{path}:{n}: expected {' or '.join(map(str, columns))} columns, got {line!r}")
            continue
        if tuple(parts) in seen:
            notes.append(f"{path}:{n} repeats line {seen[tuple(parts)]} ({line.strip()!r}); written once")
            continue
        seen[tuple(parts)] = n
        rows.append(parts)
    return rows


def _viton_dirs(base: Path, notes: list[str]) -> dict[str, Path | None]:
    """Where each VITON-HD role lives under ``base``, accepting the older folder names."""
    dirs = {}
    for role, names in VITON_DIRS.items():
        found = next((base / n for n in names if (base / n).is_dir()), None)
        if found is not None and found.name != names[0]:
            notes.append(f"found {found.name}/ (VITON-HD's older name), reading it as {names[0]}/")
        dirs[role] = found
    return dirs


def scan_viton_hd(root: Path) -> Scan:
    problems, notes, samples, sources = [], [], [], {}
    pair_files = {s: root / f"{s}_pairs.txt" for s in ("train", "test") if (root / f"{s}_pairs.txt").is_file()}
    if not pair_files:
        raise UserError(f"{root}: not a VITON-HD folder, expected train_pairs.txt and/or test_pairs.txt")
    for split, pairs in pair_files.items():
        base = root / split if (root / split).is_dir() else root
        dirs = _viton_dirs(base, notes)
        for role in ("person", "garment", "person_pose"):
            if dirs[role] is None:
                raise UserError(f"{base}: no {'/ or '.join(VITON_DIRS[role])}/ folder, which VITON-HD's {split} "
                                f"split needs (found: {', '.join(sorted(p.name for p in base.iterdir() if p.is_dir()))})")
        if dirs["ca"] is None and dirs["parse"] is None:
            raise UserError(f"{base}: neither agnostic-v3.2/ nor image-parse-v3/ (or image-parse/) to build the "
                            "clothing-agnostic images from")
        if dirs["ca"] is None:
            notes.append(f"{base}: no agnostic-v3.2/; building the agnostic images from {dirs['parse'].name}/ "
                         "and the keypoints with VITON-HD's recipe")

        def files(person: str, cloth: str) -> dict[str, Path]:
            stem = Path(person).stem
            f = {"person": dirs["person"] / person, "garment": dirs["garment"] / cloth,
                 "person_pose": dirs["person_pose"] / f"{stem}_keypoints.json"}
            f.update({"ca": dirs["ca"] / person} if dirs["ca"] else {"parse": dirs["parse"] / f"{stem}.png"})
            return f

        rows = _pairs(pairs, (2,), problems, notes)
        people = list(dict.fromkeys(person for person, _ in rows))
        # Paired samples: every person in their own garment (for the test split, also those whose line in
        # test_pairs.txt names another garment: the ground truth exists all the same).
        candidates = [(f"{split}_{Path(p).stem}", files(p, p), "paired") for p in people]
        unpaired = [(person, cloth) for person, cloth in rows if cloth != person]
        if split == "train" and unpaired:
            notes.extend(f"{pairs}: {person} {cloth}: an unpaired line in the training pairs has no ground "
                         "truth to train on; left out" for person, cloth in unpaired)
        elif split == "test":
            candidates += [(f"test_{Path(p).stem}__{Path(c).stem}", files(p, c), "unpaired") for p, c in unpaired]
        for key, f, pair in candidates:
            absent = [str(p) for p in f.values() if not p.is_file()]
            if absent:
                problems.append(f"{key}: missing counterpart " + ", ".join(absent))
                continue
            samples.append(SourceSample(key, f, split=split, pair=pair))
        sources[split] = f"{pairs.name} over {base}/"
    return Scan(samples, problems, list(dict.fromkeys(notes)), sources)


def _dresscode_rows(root: Path, category: str, split: str, order: str, problems: list[str],
                    notes: list[str]) -> list[list[str]] | None:
    """Pairs of a category and split: its own file, else the top-level file's lines of that category."""
    name = "train_pairs.txt" if split == "train" else f"test_pairs_{order}.txt"
    own = root / category / name
    if own.is_file():
        return _pairs(own, (2,), problems, notes)
    top = root / name
    if not top.is_file():
        return None
    rows = []
    for person, cloth, *cat in _pairs(top, (2, 3), problems, notes):
        if cat and cat[0] in agnostic.CATEGORIES:
            if cat[0] == category:
                rows.append([person, cloth])
        elif (root / category / "images" / person).is_file():  # a numeric column: the file says where it is
            rows.append([person, cloth])
    return rows


def scan_dresscode(root: Path, categories: tuple[str, ...] = agnostic.CATEGORIES) -> Scan:
    problems, notes, samples, sources = [], [], [], {}
    present = [c for c in categories if (root / c / "images").is_dir()]
    if not present:
        raise UserError(f"{root}: no DressCode category folder with images/ among {', '.join(categories)}")
    for category in present:
        base = root / category
        for needed in ("keypoints", "label_maps"):
            if not (base / needed).is_dir():
                raise UserError(f"{base}: no {needed}/ folder, which DressCode's {category} needs")
        for split, order in (("train", "paired"), ("test", "paired"), ("test", "unpaired")):
            rows = _dresscode_rows(root, category, split, order, problems, notes)
            if rows is None:
                continue
            for person, cloth in rows:
                stem = person.split("_")[0]
                pair = "paired" if cloth.split("_")[0] == stem else "unpaired"
                if split == "train" and pair == "unpaired":
                    notes.append(f"{base}: {person} {cloth}: an unpaired line in the training pairs has no "
                                 "ground truth to train on; left out")
                    continue
                key = f"dc_{category}_{split}_{stem}" + ("" if pair == "paired" else f"__{cloth.split('_')[0]}")
                f = {"person": base / "images" / person, "garment": base / "images" / cloth,
                     "person_pose": base / "keypoints" / f"{stem}_2.json",
                     "labels": base / "label_maps" / f"{stem}_4.png"}
                absent = [str(p) for p in f.values() if not p.is_file()]
                if absent:
                    problems.append(f"{key}: missing counterpart " + ", ".join(absent))
                    continue
                samples.append(SourceSample(key, f, split=split, pair=pair, category=category))
    # A paired test line may repeat across the paired and unpaired files' people: one sample per key.
    samples = list({s.key: s for s in samples}.values())
    for split in ("train", "test"):
        if any(s.split == split for s in samples):
            sources[split] = f"DressCode {split} pairs of {', '.join(present)} under {root}/"
    return Scan(samples, problems, notes, sources)


def synthetic_samples(n: int, seed: int, size: int) -> list[SourceSample]:
    return [SourceSample(f"synth_{i:07d}", synthetic_index=i, synthetic_seed=seed, synthetic_size=size)
            for i in range(n)]


def detect_layout(root: Path) -> tuple[str, str]:
    """(layout, what gave it away)."""
    dress = [c for c in agnostic.CATEGORIES if (root / c / "images").is_dir()]
    if dress:
        return "dresscode", f"category folder(s) {', '.join(c + '/' for c in dress)} with images/"
    splits = [s for s in ("train", "test") if (root / f"{s}_pairs.txt").is_file()]
    if splits:
        return "viton-hd", f"{' and '.join(s + '_pairs.txt' for s in splits)} without DressCode's category folders"
    if (root / FOLDER_DIRS["person"]).is_dir():
        return "folders", f"{FOLDER_DIRS['person']}/"
    raise UserError(f"{root}: no known layout found: expected person_images/ (folders), train_pairs.txt or "
                    "test_pairs.txt with train/ and test/ (VITON-HD), or dresses/ lower_body/ upper_body/ "
                    "(DressCode); or give --layout")


# --------------------------------------------------------------------------- loading
def read_image(path: Path, problems: list[str]) -> Image.Image | None:
    try:
        with Image.open(path) as img:
            img.load()  # decodes fully: a truncated file fails here, not later in training
            return img.copy() if img.mode in ("L", "P") else img.convert("RGB")  # label maps keep their values
    except Exception as err:  # PIL raises many types for bad files
        problems.append(f"{path}: unreadable or truncated image ({type(err).__name__}: {err})")
        return None


def read_pose(path: Path, size: tuple[int, int] | None, problems: list[str], meta: dict) -> np.ndarray | None:
    """The pose for an image of ``size`` (W, H), or None after noting a problem; clipped and dropped joints
    are counted in ``meta``."""
    if size is None:
        return None
    try:
        pose = read_keypoints(path, size)
    except KeypointError as err:
        problems.append(f"{path}: {err}")
        return None
    if pose.points is None:
        problems.append(f"{path}: no person in the OpenPose JSON (\"people\": [])")
        return None
    for what, joints in (("clipped", pose.clipped), ("dropped", pose.dropped)):
        if joints:
            meta.setdefault(what, []).extend(f"{path.name}: {j}" for j in joints)
    return pose.points


def load_sample(sample: SourceSample, num_keypoints: int = 18) -> LoadedSample:
    if sample.synthetic_index is not None:
        r = synthetic.render_sample(sample.synthetic_index, sample.synthetic_seed, sample.synthetic_size)
        return LoadedSample(sample.key, r["person"], r["ca"], r["garment"], r["person_pose"], r["garment_pose"],
                            r["mask"], r["meta"])
    problems: list[str] = []
    keypoints: dict = {}
    f = sample.files
    person, garment = read_image(f["person"], problems), read_image(f["garment"], problems)
    person_pose = read_pose(f["person_pose"], person.size if person else None, problems, keypoints)
    if person_pose is not None and len(person_pose) != num_keypoints:
        problems.append(f"{f['person_pose']}: {len(person_pose)} keypoints, the model takes {num_keypoints}")
    mask = None
    if "ca" in f:
        ca = read_image(f["ca"], problems)
        if person is not None and ca is not None and person.size != ca.size:
            problems.append(f"{f['ca']}: size {ca.size[0]}x{ca.size[1]} differs from the person image "
                            f"{f['person']} ({person.size[0]}x{person.size[1]}); they must be pixel-aligned")
    else:  # built from a label map (DressCode) or a parse (VITON-HD's older layout)
        labels = read_image(f.get("labels") or f["parse"], problems)
        ca = None
        if person is not None and labels is not None and person_pose is not None:
            if "labels" in f:
                ca, mask = agnostic.dresscode_agnostic(person, labels, sample.category, person_pose)
            else:
                ca = agnostic.viton_agnostic(person, labels, person_pose)
    garment_pose = None
    if "garment_pose" in f:
        garment_pose = read_pose(f["garment_pose"], garment.size if garment else None, problems, keypoints)
    if problems:
        raise SampleError(sample.key, problems)
    meta = {"source": {r: str(p) for r, p in f.items()}, "split": sample.split, "pair": sample.pair}
    if sample.category:
        meta["category"] = sample.category
    if keypoints:
        meta["keypoints"] = keypoints
    if person_pose[:, 2].sum() == 0:
        raise SampleError(sample.key, [f"{f['person_pose']}: no joint of the person detected"])
    return LoadedSample(sample.key, person, ca, garment, person_pose, garment_pose, mask, meta)
