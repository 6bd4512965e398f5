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
LAYOUTS = ("folders", "viton-hd", "dresscode", "parsed")
# The parsed layout: your own photos with a human parser's label maps and a pose estimator's JSON.
PARSED_DIRS = {"person": "person_images", "garment": "garment_images", "labels": "person_parse",
               "person_pose": "person_poses"}
PARSED_OPTIONAL = {"garment_labels": "garment_parse", "garment_pose": "garment_poses"}
POSE_SUFFIXES = ("_keypoints.json", ".json", ".npy")  # OpenPose names its files NAME_keypoints.json


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
    category: str = ""        # upper_body / lower_body / dresses (DressCode's, or the parsed layout's)
    label_set: str = "atr"    # the parser's labels of ``labels`` / ``garment_labels`` (agnostic.LABEL_SETS)
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


def _dresscode_rows(root: Path, categories: list[str], split: str, order: str, problems: list[str],
                    notes: list[str]) -> dict[str, list[list[str]]]:
    """Pairs of each category for a split: its own file, else the lines of that category in the top-level file
    (read once), whose third column names the category or numbers it: then the folder holding the person
    image says which. A numbered line whose person image is in no category folder is a problem, as a missing
    file of a per-category line is."""
    name = "train_pairs.txt" if split == "train" else f"test_pairs_{order}.txt"
    top, top_rows, out = root / name, None, {}
    for category in categories:
        own = root / category / name
        if own.is_file():
            out[category] = _pairs(own, (2,), problems, notes)
            continue
        if not top.is_file():
            continue
        if top_rows is None:
            top_rows = []
            for person, cloth, *cat in _pairs(top, (2, 3), problems, notes):
                if cat and cat[0] in agnostic.CATEGORIES:
                    top_rows.append((cat[0], person, cloth))
                    continue
                home = next((c for c in agnostic.CATEGORIES if (root / c / "images" / person).is_file()), None)
                if home is None:
                    problems.append(f"{top}: {person} {cloth}: missing counterpart "
                                    f"{root}/{{{','.join(agnostic.CATEGORIES)}}}/images/{person}")
                    continue
                top_rows.append((home, person, cloth))
        out[category] = [[person, cloth] for c, person, cloth in top_rows if c == category]
    return out


def scan_dresscode(root: Path, categories: tuple[str, ...] = agnostic.CATEGORIES) -> Scan:
    problems, notes, samples, sources = [], [], [], {}
    present = [c for c in categories if (root / c / "images").is_dir()]
    if not present:
        raise UserError(f"{root}: no DressCode category folder with images/ among {', '.join(categories)}")
    rows = {(split, order): _dresscode_rows(root, present, split, order, problems, notes)
            for split, order in (("train", "paired"), ("test", "paired"), ("test", "unpaired"))}
    for category in present:
        base = root / category
        for needed in ("keypoints", "label_maps"):
            if not (base / needed).is_dir():
                raise UserError(f"{base}: no {needed}/ folder, which DressCode's {category} needs")
        for split, order in (("train", "paired"), ("test", "paired"), ("test", "unpaired")):
            for person, cloth in rows[split, order].get(category, []):
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


def _poses_by_stem(folder: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        for suffix in POSE_SUFFIXES:
            if path.name.endswith(suffix):
                found.setdefault(path.name[:-len(suffix)], path)
                break
    return found


def detect_label_set(maps: list[Path]) -> str:
    """A parser's label set from the values its maps use: any label above 17 means LIP/CIHP's 20 (ATR has 18).
    Maps using only 0..17 could be either: then the user must say which."""
    top = 0
    for path in maps[:64]:
        with Image.open(path) as img:
            top = max(top, int(np.asarray(img if img.mode in ("L", "P") else img.convert("L")).max()))
    if top >= max(agnostic.LABEL_COUNTS.values()):
        raise UserError(f"label maps under {maps[0].parent} use label {top}: no parser's set that this tool knows "
                        f"has it ({', '.join(f'{k}: 0..{n - 1}' for k, n in agnostic.LABEL_COUNTS.items())})")
    if top >= agnostic.LABEL_COUNTS["atr"]:
        return "lip"
    raise UserError(f"cannot tell the label set of the maps under {maps[0].parent} from their values (none above "
                    f"{top}: ATR's 18 labels and LIP/CIHP's 20 both fit): give --label-set atr or --label-set lip")


def scan_parsed(root: Path, category: str | None = None, label_set: str | None = None) -> Scan:
    """Your own photos: ``person_images/``, ``garment_images/``, the human parser's label maps of the people
    (``person_parse/``, ATR or LIP/CIHP labels) and the pose estimator's JSON (``person_poses/``: OpenPose or
    DWPose style, ``NAME.json`` or ``NAME_keypoints.json``, or .npy), matched by stem. A garment photo that is
    itself worn may have its own map and pose (``garment_parse/``, ``garment_poses/``): it is then cut out of
    it, and its pose is the wearer's. ``pairs.txt`` (``person garment [category]`` a line, names or stems)
    pairs them, else each person is paired with the garment of the same stem; the category comes from its
    third column, else from ``category``. A person in their own garment trains; in another's, it is an
    unpaired test sample."""
    missing = [d for d in PARSED_DIRS.values() if not (root / d).is_dir()]
    if missing:
        raise UserError(f"{root}: not the parsed layout, missing folder(s) {', '.join(missing)} (expected "
                        f"{', '.join(PARSED_DIRS.values())}; optional {', '.join(PARSED_OPTIONAL.values())}, pairs.txt)")
    people, garments = _images_by_stem(root / PARSED_DIRS["person"]), _images_by_stem(root / PARSED_DIRS["garment"])
    maps = {p.stem: p for p in sorted((root / PARSED_DIRS["labels"]).glob("*.png"))}
    garment_maps = {p.stem: p for p in sorted((root / PARSED_OPTIONAL["garment_labels"]).glob("*.png"))}
    poses, garment_poses = (_poses_by_stem(root / PARSED_DIRS["person_pose"]),
                            _poses_by_stem(root / PARSED_OPTIONAL["garment_pose"]))
    if not maps:
        raise UserError(f"{root / PARSED_DIRS['labels']}: no label map (.png) in it")
    label_set = label_set or detect_label_set(sorted(maps.values()) + sorted(garment_maps.values()))
    problems, notes = [], [f"label maps read as {label_set.upper()} labels"]
    pairs = root / "pairs.txt"
    if pairs.is_file():
        rows = [(Path(p).stem, Path(g).stem, *c) for p, g, *c in _pairs(pairs, (2, 3), problems, notes)]
    else:
        rows = [(stem, stem) for stem in people]
    samples = []
    for person, garment, *cat in rows:
        kind = cat[0] if cat else category
        if kind not in agnostic.CATEGORIES:
            problems.append(f"{person} {garment}: garment category {kind!r}, expected one of "
                            f"{', '.join(agnostic.CATEGORIES)} (a third column in pairs.txt, or --category)")
            continue
        pair = "paired" if person == garment else "unpaired"
        key = person if pair == "paired" else f"{person}__{garment}"
        files = {"person": people.get(person), "garment": garments.get(garment), "labels": maps.get(person),
                 "person_pose": poses.get(person)}
        absent = [f"{root / PARSED_DIRS[role]}/{person if role != 'garment' else garment}.*"
                  for role, path in files.items() if path is None]
        if absent:
            problems.append(f"{key}: missing counterpart " + ", ".join(absent))
            continue
        if garment in garment_maps:  # a worn garment: cut out with its own map; its wearer's pose
            files["garment_labels"] = garment_maps[garment]
            if garment in garment_poses:
                files["garment_pose"] = garment_poses[garment]
        samples.append(SourceSample(key, files, split="train" if pair == "paired" else "test", pair=pair,
                                    category=kind, label_set=label_set))
    return Scan(samples, problems, notes, sources={"train": f"{root} (the parsed layout)",
                                                   "test": f"{pairs} lines naming another person's garment"})


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
    if (root / PARSED_DIRS["labels"]).is_dir():
        return "parsed", f"{PARSED_DIRS['labels']}/ (a human parser's label maps)"
    if (root / FOLDER_DIRS["person"]).is_dir():
        return "folders", f"{FOLDER_DIRS['person']}/"
    raise UserError(f"{root}: no known layout found: expected person_images/ (folders; with person_parse/: "
                    "parsed), train_pairs.txt or test_pairs.txt with train/ and test/ (VITON-HD), or dresses/ "
                    "lower_body/ upper_body/ (DressCode); or give --layout")


# --------------------------------------------------------------------------- loading
def _open(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()  # decodes fully: a truncated file fails here, not later in training
        return img.copy()


def read_labels(path: Path, problems: list[str]) -> Image.Image | None:
    """A label map, its values kept (a palette image's indices, not its colours); None after noting a problem."""
    try:
        img = _open(path)
    except Exception as err:  # PIL raises many types for bad files
        problems.append(f"{path}: unreadable or truncated image ({type(err).__name__}: {err})")
        return None
    return img if img.mode in ("L", "P") else img.convert("L")


def read_image(source, problems: list[str], name: str | None = None) -> Image.Image | None:
    """A photo as RGB from a file, a PIL image or an (H, W, 3|4) uint8 array, a transparent one composited on
    white (what letterboxing pads with); None after noting a problem under ``name`` (default: the file)."""
    name = name or str(source)
    try:
        if isinstance(source, np.ndarray):
            if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] not in (3, 4):
                problems.append(f"{name}: an array of shape {source.shape} and dtype {source.dtype}, expected "
                                "(H, W, 3) uint8 RGB")
                return None
            img = Image.fromarray(source)
        elif isinstance(source, Image.Image):
            img = source
        else:
            img = _open(Path(source))
    except Exception as err:  # PIL raises many types for bad files
        problems.append(f"{name}: unreadable or truncated image ({type(err).__name__}: {err})")
        return None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    return img.convert("RGB")


def read_pose(source, size: tuple[int, int] | None, problems: list[str], meta: dict,
              name: str | None = None) -> np.ndarray | None:
    """The pose ``source`` holds (a file or the pose itself, tryon_ds/data/keypoints.py) for an image of
    ``size`` (W, H), or None after noting a problem under ``name`` (default: the file); clipped and dropped
    joints are counted in ``meta``."""
    if size is None:
        return None
    name = name or str(source)
    try:
        pose = read_keypoints(source, size)
    except KeypointError as err:
        problems.append(f"{name}: {err}")
        return None
    if pose.points is None:
        problems.append(f"{name}: no person in the OpenPose JSON (\"people\": [])")
        return None
    for what, joints in (("clipped", pose.clipped), ("dropped", pose.dropped)):
        if joints:
            meta.setdefault(what, []).extend(f"{Path(name).name}: {j}" for j in joints)
    return pose.points


def _as_stored(person: Image.Image, pose: np.ndarray, size: tuple[int, int] | None):
    """The person image and its pose at the size ``letterbox`` stores them at in ``size`` (H, W) shards,
    when that is smaller: a DressCode agnostic image built there costs about a sixteenth of one built on the
    768x1024 photo and then scaled down (BENCHMARKS.md, "Real release files")."""
    if size is None:
        return person, pose
    scale = min(size[1] / person.width, size[0] / person.height)
    stored = (max(1, round(person.width * scale)), max(1, round(person.height * scale)))
    if scale >= 1 or stored == person.size:
        return person, pose
    pose = pose.copy()
    pose[:, :2] *= scale
    return person.resize(stored, Image.BICUBIC), pose


def load_sample(sample: SourceSample, num_keypoints: int = 18, build: bool = True,
                size: tuple[int, int] | None = None) -> LoadedSample:
    """Read and check one sample. ``build=False`` (make_shards' check pass) reads and checks everything but
    leaves the clothing-agnostic image of a release that ships none unbuilt: building it cannot fail once
    its inputs are read, and it is the costly part, done once, when the sample is written. With ``size``
    (the shards' [H, W]) a label-map agnostic image is built at the size the shard stores the person at
    (the person resized as ``letterbox`` resizes it, so the two stay pixel-aligned), not at the photo's."""
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
        labels = read_labels(f.get("labels") or f["parse"], problems)
        ca = None
        if build and person is not None and labels is not None and person_pose is not None:
            if "labels" in f:
                at, pose_at = _as_stored(person, person_pose, size)
                ca, mask = agnostic.parsed_agnostic(at, labels, sample.category, pose_at, sample.label_set,
                                                    photo_height=person.height)
            else:
                ca = agnostic.viton_agnostic(person, labels, person_pose)
    garment_pose = None
    if "garment_pose" in f:
        garment_pose = read_pose(f["garment_pose"], garment.size if garment else None, problems, keypoints)
    if "garment_labels" in f:  # a garment photo of someone wearing it: the garment cut out, white around it
        garment_labels = read_labels(f["garment_labels"], problems)
        if build and garment is not None and garment_labels is not None:
            garment = agnostic.cut_out(garment, garment_labels, sample.category, sample.label_set)
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
