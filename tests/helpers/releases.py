"""Small replicas of the VITON-HD and DressCode releases: every folder, file name and JSON convention of the
real ones, with their quirks, at a small image size. People are drawn from known keypoints (so where a
keypoint must land can be checked) with a matching label map.

VITON-HD (``shadow2496/VITON-HD``): ``train/`` and ``test/``, each with ``image/ cloth/ cloth-mask/
agnostic-v3.2/ image-parse-v3/ openpose_img/ openpose_json/``; ``train_pairs.txt`` (paired lines) and
``test_pairs.txt`` (unpaired lines, as released); OpenPose BODY_25 JSON ``NNNNN_00_keypoints.json``
(``{"version": 1.3, "people": [{"person_id": [-1], "pose_keypoints_2d": [75 numbers], ...}]}``).
The older layout (``openpose-json/ openpose-img/ image-parse/``, no agnostic images) is what VITON-HD's own
datasets.py reads.

DressCode (``aimagelab/dress-code``): ``dresses/ lower_body/ upper_body/``, each with ``images/NNNNNN_0.jpg``
(person) and ``NNNNNN_1.jpg`` (garment), ``keypoints/NNNNNN_2.json`` (``{"keypoints": [[x, y, score, id]
x 18]}`` on a 384 x 512 copy; ``[-1, -1, 0, -1]`` not detected), ``label_maps/NNNNNN_4.png`` (ATR labels),
``skeletons/NNNNNN_5.jpg``, and ``train_pairs.txt test_pairs_paired.txt test_pairs_unpaired.txt``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tryon_ds.data.keypoints import BODY25_NAMES, BODY25_TO_COCO18
from tryon_ds.data.synthetic import random_pose

SIZE = (192, 256)  # W, H: the releases' 3:4 (768 x 1024), scaled down
LIMBS = {"arms": ((2, 3), (3, 4), (5, 6), (6, 7)), "legs": ((8, 9), (9, 10), (11, 12), (12, 13))}


def person_and_labels(k: np.ndarray, garment_label: int, rng: random.Random, atr: bool):
    """An image and its label map (ATR labels if ``atr``, else LIP) for COCO-18 keypoints ``k`` (pixels)."""
    w, h = SIZE
    labels = Image.new("L", SIZE, 0)
    d = ImageDraw.Draw(labels)
    arm, leg, head, hair = (14, 15), (12, 13), 11 if atr else 13, 2
    width = int(w * 0.07)
    for (a, b), lab in zip(LIMBS["legs"], (leg[1], leg[1], leg[0], leg[0])):
        d.line([tuple(k[a]), tuple(k[b])], fill=lab, width=width)
    if garment_label in (6, 7):  # pants / dress over the legs' upper part
        d.polygon([tuple(k[i]) for i in (8, 11, 12, 9)], fill=garment_label)
    torso = [tuple(k[i]) for i in (2, 5, 11, 8)]
    d.polygon(torso, fill=garment_label if garment_label in (4, 7) else (4 if atr else 5))
    for (a, b), lab in zip(LIMBS["arms"], (arm[1], arm[1], arm[0], arm[0])):
        d.line([tuple(k[a]), tuple(k[b])], fill=lab, width=width)
    r = np.linalg.norm(k[16] - k[17]) * 0.75
    d.ellipse([k[0][0] - r, k[0][1] - r, k[0][0] + r, k[0][1] + r], fill=head)
    d.chord([k[0][0] - r, k[0][1] - r, k[0][0] + r, k[0][1] + r], 180, 360, fill=hair)
    palette = {lab: tuple(rng.randint(30, 230) for _ in range(3)) for lab in range(20)}
    palette[0] = (245, 245, 245)
    lab = np.asarray(labels)
    person = np.zeros((h, w, 3), np.uint8)
    for value, colour in palette.items():
        person[lab == value] = colour
    return Image.fromarray(person), labels


def garment_image(colour) -> Image.Image:
    img = Image.new("RGB", SIZE, (255, 255, 255))
    w, h = SIZE
    ImageDraw.Draw(img).polygon([(w * 0.25, h * 0.2), (w * 0.75, h * 0.2), (w * 0.8, h * 0.8), (w * 0.2, h * 0.8)],
                                fill=colour)
    return img


def _pose(rng) -> np.ndarray:
    """COCO-18 keypoints for a full-ish figure inside the SIZE canvas."""
    k = random_pose(rng, SIZE[1]) * np.array([SIZE[0] / SIZE[1], 1.0])
    k[:, 0] += (SIZE[0] - SIZE[0]) / 2
    return np.clip(k, 2, np.array(SIZE) - 2)


def _body25(k18: np.ndarray) -> np.ndarray:
    out = np.zeros((25, 3))
    for coco, body in enumerate(BODY25_TO_COCO18):
        out[body] = (*k18[coco], 0.9)
    out[BODY25_NAMES.index("MidHip")] = (*((k18[8] + k18[11]) / 2), 0.9)
    return out


def openpose_json(body25: np.ndarray | None) -> str:
    people = [] if body25 is None else [{"person_id": [-1], "pose_keypoints_2d": body25.flatten().round(3).tolist(),
                                         "face_keypoints_2d": [], "hand_left_keypoints_2d": [],
                                         "hand_right_keypoints_2d": [], "pose_keypoints_3d": [],
                                         "face_keypoints_3d": [], "hand_left_keypoints_3d": [],
                                         "hand_right_keypoints_3d": []}]
    return json.dumps({"version": 1.3, "people": people})


def write_viton_hd(root: Path, older: bool = False, train=("00000_00", "00001_00", "00003_00", "00005_00"),
                   test=("00006_00", "00008_00", "00010_00")) -> dict:
    """A VITON-HD replica. Returns what a test needs to know: each stem's BODY_25 keypoints, and which stem
    carries which quirk."""
    rng = random.Random(7)
    names = (("openpose-json", "openpose-img", "image-parse") if older
             else ("openpose_json", "openpose_img", "image-parse-v3"))
    truth = {}
    quirks = {"no_person": test[1], "undetected_ear": train[0], "just_outside": train[1], "far_outside": train[2]}
    for split, stems in (("train", train), ("test", test)):
        base = root / split
        for d in ("image", "cloth", "cloth-mask", *names) + (() if older else ("agnostic-v3.2",
                                                                               "image-parse-agnostic-v3.2")):
            (base / d).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            k = _pose(rng)
            person, parse = person_and_labels(k, 5, rng, atr=False)  # LIP: 5 upper clothes
            person.save(base / "image" / f"{stem}.jpg", quality=95)
            parse.save(base / names[2] / f"{stem}.png")
            garment_image(tuple(rng.randint(30, 230) for _ in range(3))).save(base / "cloth" / f"{stem}.jpg")
            Image.new("L", SIZE, 255).save(base / "cloth-mask" / f"{stem}.jpg")
            Image.new("RGB", SIZE).save(base / names[1] / f"{stem}_rendered.png")
            if not older:
                grey = person.copy()
                ImageDraw.Draw(grey).polygon([tuple(k[i]) for i in (2, 5, 11, 8)], fill=(128, 128, 128))
                grey.save(base / "agnostic-v3.2" / f"{stem}.jpg", quality=95)
            b25 = _body25(k)
            if stem == quirks["undetected_ear"]:
                b25[BODY25_NAMES.index("REar")] = 0  # OpenPose writes a joint not detected as (0, 0, 0)
            if stem == quirks["just_outside"]:
                b25[BODY25_NAMES.index("LWrist")] = (SIZE[0] + 3.0, 100.0, 0.6)
            if stem == quirks["far_outside"]:
                b25[BODY25_NAMES.index("RKnee")] = (80.0, SIZE[1] * 1.6, 0.4)
            (base / names[0] / f"{stem}_keypoints.json").write_text(
                openpose_json(None if stem == quirks["no_person"] else b25))
            truth[stem] = b25
    (root / "train_pairs.txt").write_text("".join(f"{s}.jpg {s}.jpg\n" for s in train))
    # As released, test_pairs.txt pairs each test person with another person's garment.
    (root / "test_pairs.txt").write_text("".join(f"{p}.jpg {c}.jpg\n" for p, c in zip(test, test[1:] + test[:1])))
    return {"keypoints": truth, "quirks": quirks, "train": train, "test": test}


DRESSCODE_GARMENT = {"upper_body": 4, "lower_body": 6, "dresses": 7}


def write_dresscode(root: Path, per_category: int = 3, categories=tuple(DRESSCODE_GARMENT)) -> dict:
    rng = random.Random(11)
    truth, ids = {}, 0
    for category in categories:
        base = root / category
        for d in ("images", "keypoints", "label_maps", "skeletons", "dense"):
            (base / d).mkdir(parents=True, exist_ok=True)
        stems = []
        for _ in range(per_category + 2):  # the last two: the test split
            stem = f"{ids:06d}"
            ids += 1
            k = _pose(rng)
            person, labels = person_and_labels(k, DRESSCODE_GARMENT[category], rng, atr=True)
            person.save(base / "images" / f"{stem}_0.jpg", quality=95)
            garment_image(tuple(rng.randint(30, 230) for _ in range(3))).save(base / "images" / f"{stem}_1.jpg")
            labels.save(base / "label_maps" / f"{stem}_4.png")
            Image.new("RGB", SIZE).save(base / "skeletons" / f"{stem}_5.jpg")
            # DressCode's keypoints are on a 384 x 512 copy: [x, y, score, id].
            canvas = k * np.array([384 / SIZE[0], 512 / SIZE[1]])
            kp = [[float(x), float(y), 0.8, i] for i, (x, y) in enumerate(canvas)]
            kp[17] = [-1.0, -1.0, 0.0, -1]  # LEar not detected
            kp[14][1] = 0.0  # REye at the top edge (y = 0), as DressCode's head joints often are
            (base / "keypoints" / f"{stem}_2.json").write_text(json.dumps({"keypoints": kp}))
            truth[(category, stem)] = {"keypoints": kp, "labels": np.asarray(labels)}
            stems.append(stem)
        train, test = stems[:-2], stems[-2:]
        (base / "train_pairs.txt").write_text("".join(f"{s}_0.jpg {s}_1.jpg\n" for s in train))
        (base / "test_pairs_paired.txt").write_text("".join(f"{s}_0.jpg {s}_1.jpg\n" for s in test))
        (base / "test_pairs_unpaired.txt").write_text(f"{test[0]}_0.jpg {test[1]}_1.jpg\n{test[1]}_0.jpg {test[0]}_1.jpg\n")
    return truth
