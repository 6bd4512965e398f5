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
    arm, leg, head, hair = (14, 15), (12, 13) if atr else (16, 17), 11 if atr else 13, 2
    width = int(w * 0.07)
    for (a, b), lab in zip(LIMBS["legs"], (leg[1], leg[1], leg[0], leg[0])):
        d.line([tuple(k[a]), tuple(k[b])], fill=lab, width=width)
    for ankle, shoe in zip((10, 13), (10, 9) if atr else (19, 18)):  # right shoe, left shoe
        d.ellipse([k[ankle][0] - width, k[ankle][1] - width / 2, k[ankle][0] + width, k[ankle][1] + width / 2],
                  fill=shoe)
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


def write_dresscode(root: Path, per_category: int = 3, categories=tuple(DRESSCODE_GARMENT),
                    top_level: bool = False, missing: bool = False) -> dict:
    """A DressCode replica. ``top_level``: the pairs files at the top, with the release's category column (a
    number), instead of in each category folder. ``missing``: each category's training pairs name one more
    person, whose files are not there, as lines of the real files do."""
    rng = random.Random(11)
    truth, ids, lines = {}, 0, {}
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
        absent = [f"9{ids:05d}_0.jpg 9{ids:05d}_1.jpg"] if missing else []
        lines[category] = {"train_pairs.txt": [f"{s}_0.jpg {s}_1.jpg" for s in train] + absent,
                           "test_pairs_paired.txt": [f"{s}_0.jpg {s}_1.jpg" for s in test],
                           "test_pairs_unpaired.txt": [f"{test[0]}_0.jpg {test[1]}_1.jpg",
                                                       f"{test[1]}_0.jpg {test[0]}_1.jpg"]}
    for name in ("train_pairs.txt", "test_pairs_paired.txt", "test_pairs_unpaired.txt"):
        if top_level:
            (root / name).write_text("".join(f"{line} {list(DRESSCODE_GARMENT).index(c)}\n"
                                             for c in lines for line in lines[c][name]))
        else:
            for category in lines:
                (root / category / name).write_text("".join(f"{line}\n" for line in lines[category][name]))
    return truth


def write_parsed(root: Path, label_set: str = "atr", pose_style: str = "body25", people: int = 6,
                 pairs: bool = False) -> dict:
    """Your own photos run through a human parser and a pose estimator (the ``parsed`` layout): people in upper
    garments, their label maps in ``label_set`` (ATR or LIP numbers, LIP's with shoes 18/19), their poses as
    OpenPose JSON (``body25``: ``NAME_keypoints.json`` with 75 numbers) or DWPose's OpenPose-style COCO-18
    (``coco18``: ``NAME.json`` with 54 numbers). The last garment photo is worn by someone: with its own map
    and pose. ``pairs``: a pairs.txt naming each category, plus one line pairing a person with another's garment."""
    rng = random.Random(5)
    atr = label_set == "atr"
    for d in ("person_images", "person_parse", "person_poses", "garment_images", "garment_parse", "garment_poses"):
        (root / d).mkdir(parents=True, exist_ok=True)
    truth = {}
    stems = [f"look.{i}" if i == 1 else f"me_{i:02d}" for i in range(people)]  # one dotted name, as photos have
    for i, stem in enumerate(stems):
        k = _pose(rng)
        person, labels = person_and_labels(k, 4 if atr else 5, rng, atr=atr)
        person.save(root / "person_images" / f"{stem}.jpg", quality=95)
        labels.save(root / "person_parse" / f"{stem}.png")
        if pose_style == "body25":
            (root / "person_poses" / f"{stem}_keypoints.json").write_text(openpose_json(_body25(k)))
        else:
            flat = [float(v) for x, y in k for v in (round(x, 2), round(y, 2), 0.9)]
            (root / "person_poses" / f"{stem}.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": flat}]}))
        truth[stem] = {"keypoints": k, "labels": np.asarray(labels)}
        if i < people - 1:
            garment_image(tuple(rng.randint(30, 230) for _ in range(3))).save(root / "garment_images" / f"{stem}.jpg")
        else:  # a garment photo worn by a second person
            wk = _pose(rng)
            worn, worn_labels = person_and_labels(wk, 4 if atr else 5, rng, atr=atr)
            worn.save(root / "garment_images" / f"{stem}.jpg", quality=95)
            worn_labels.save(root / "garment_parse" / f"{stem}.png")
            (root / "garment_poses" / f"{stem}_keypoints.json").write_text(openpose_json(_body25(wk)))
            truth[stem].update(worn_labels=np.asarray(worn_labels), wearer=wk)
    if pairs:
        lines = [f"{s}.jpg {s}.jpg upper_body" for s in stems] + [f"{stems[0]}.jpg {stems[2]}.jpg upper_body"]
        (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return {"stems": stems, "truth": truth}
