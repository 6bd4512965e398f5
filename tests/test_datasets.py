"""tools/make_shards.py on replicas of the public releases (tests/helpers/releases.py): VITON-HD's splits kept
honest, its older folder names, DressCode with built agnostic images, and keypoints as they come."""
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import run_tool

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from releases import SIZE, write_dresscode, write_viton_hd  # noqa: E402


def make_shards(*args):
    return run_tool(["tools/make_shards.py", *map(str, args)])


def shard_samples(folder, split):
    return list(wds.WebDataset(sorted(str(p) for p in folder.glob(f"{split}-*.tar")), shardshuffle=False,
                               empty_check=False))


def pose(sample, which="person"):
    return np.load(io.BytesIO(sample[f"{which}_pose.npy"]))


@pytest.fixture(scope="module")
def viton(tmp_path_factory):
    root = tmp_path_factory.mktemp("viton")
    truth = write_viton_hd(root / "VITON-HD")
    out = root / "shards"
    r = make_shards(root / "VITON-HD", "--out", out, "--image-size", 256, "--val-fraction", 0.3, "--skip-bad")
    assert r.returncode == 0, r.stderr
    return truth, out, r


def test_viton_hd_test_persons_never_reach_train_or_val(viton):
    truth, out, r = viton
    assert "layout: viton-hd" in r.stdout
    seen = {split: {s["__key__"] for s in shard_samples(out, split)} for split in ("train", "val", "test")}
    test_people = {stem for stem in truth["test"]}
    for split in ("train", "val"):
        assert not {k for k in seen[split] if any(p in k for p in test_people)}, split
        assert all(json.loads(s["json"])["split"] == "train" for s in shard_samples(out, split))
    assert seen["train"] and seen["val"]  # validation is carved from the training split
    manifest = json.loads((out / "manifest.json").read_text())
    assert "train_pairs.txt" in manifest["splits"]["train"]["source"]
    assert "test_pairs.txt" in manifest["splits"]["test"]["source"]
    assert "of the training split" in manifest["splits"]["val"]["source"]


def test_viton_hd_test_split_keeps_paired_and_unpaired_marked(viton):
    truth, out, _ = viton
    test = {s["__key__"]: json.loads(s["json"]) for s in shard_samples(out, "test")}
    no_person = truth["quirks"]["no_person"]
    paired = {k for k, m in test.items() if m["pair"] == "paired"}
    unpaired = {k for k, m in test.items() if m["pair"] == "unpaired"}
    assert paired == {f"test_{s}" for s in truth["test"] if s != no_person}
    # each test_pairs.txt line names another person's garment; the one whose person has no pose is left out
    assert len(unpaired) == len(truth["test"]) - 1 and all("__" in k for k in unpaired)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["test"]["pairs"] == {"paired": len(paired), "unpaired": len(unpaired)}
    assert any("no person in the OpenPose JSON" in p for p in manifest["skipped"][f"test_{no_person}"])


def test_viton_hd_keypoints_body25_undetected_clipped_and_dropped(viton):
    truth, out, r = viton
    q = truth["quirks"]
    samples = {s["__key__"]: s for split in ("train", "val") for s in shard_samples(out, split)}
    ear = pose(samples[f"train_{q['undetected_ear']}"])
    assert ear[16, 2] == 0 and (ear[16, :2] == 0).all()  # COCO-18 REar, from BODY_25 (0, 0, 0): invalid
    wrist = pose(samples[f"train_{q['just_outside']}"])
    assert wrist[7, 2] == 1  # a few pixels outside: clipped onto the edge, still valid
    knee = pose(samples[f"train_{q['far_outside']}"])
    assert knee[9, 2] == 0 and knee[8, 2] == 1  # far outside: stored invalid; the sample is kept
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["keypoints"] == {"clipped": 1, "dropped": 1}
    assert f"RKnee, BODY_25 #10 at (80.0, {SIZE[1] * 1.6:.1f}) outside the 192x256 image" in r.stdout
    # a valid joint lands where the source says: BODY_25 RHip (#9) -> COCO-18 slot 8, letterboxed 192x256 -> 256
    b25 = truth["keypoints"][q["undetected_ear"]]
    x, y = b25[9, :2] * (256 / 256) + (32, 0)
    np.testing.assert_allclose(ear[8, :2] * 256, (x, y), atol=0.05)


def test_viton_hd_older_layout_is_read_and_its_agnostic_built(tmp_path):
    write_viton_hd(tmp_path / "old", older=True)
    r = make_shards(tmp_path / "old", "--out", tmp_path / "shards", "--image-size", 128, "--skip-bad")
    assert r.returncode == 0, r.stderr
    assert "found openpose-json/ (VITON-HD's older name), reading it as openpose_json/" in r.stdout
    assert "found image-parse/ (VITON-HD's older name), reading it as image-parse-v3/" in r.stdout
    assert "building the agnostic images from image-parse/" in r.stdout
    sample = shard_samples(tmp_path / "shards", "train")[0]
    ca = np.asarray(Image.open(io.BytesIO(sample["ca.jpg"])).convert("RGB")).astype(int)
    grey = (np.abs(ca - 128).max(axis=2) < 12).mean()
    assert grey > 0.05, grey  # the torso and arms greyed out by VITON-HD's recipe


def test_viton_hd_folder_missing_is_named_and_duplicates_written_once(tmp_path):
    truth = write_viton_hd(tmp_path / "v")
    pairs = tmp_path / "v" / "train_pairs.txt"
    pairs.write_text(pairs.read_text() + f"{truth['train'][3]}.jpg {truth['train'][3]}.jpg\n")
    r = make_shards(tmp_path / "v", "--out", tmp_path / "s", "--skip-bad", "--val-fraction", 0)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("repeats line 4") == 1 and "written once" in r.stdout
    keys = [s["__key__"] for s in shard_samples(tmp_path / "s", "train")]
    assert len(keys) == len(set(keys)) == 4
    for d in ("openpose_json",):
        (tmp_path / "v" / "train" / d).rename(tmp_path / "v" / "train" / "elsewhere")
    r = make_shards(tmp_path / "v", "--out", tmp_path / "s2")
    assert r.returncode == 2 and "no openpose_json/ or openpose-json/ folder" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def dresscode(tmp_path_factory):
    root = tmp_path_factory.mktemp("dresscode")
    truth = write_dresscode(root / "DressCode")
    out = root / "shards"
    r = make_shards(root / "DressCode", "--out", out, "--image-size", 256, "--val-fraction", 0,
                    "--preview", root / "sheet.png")
    assert r.returncode == 0, r.stderr
    return truth, out, r, root


def test_dresscode_is_detected_split_and_marked(dresscode):
    truth, out, r, _ = dresscode
    assert "layout: dresscode (found category folder(s) upper_body/, lower_body/, dresses/" in r.stdout
    train = {s["__key__"]: json.loads(s["json"]) for s in shard_samples(out, "train")}
    test = {s["__key__"]: json.loads(s["json"]) for s in shard_samples(out, "test")}
    assert len(train) == 9 and {m["category"] for m in train.values()} == {"upper_body", "lower_body", "dresses"}
    assert sum(m["pair"] == "paired" for m in test.values()) == 6
    assert sum(m["pair"] == "unpaired" for m in test.values()) == 6
    assert all(m["garment_pose"] is False for m in {**train, **test}.values())  # flat garments: no wearer


def test_dresscode_keypoints_are_rescaled_from_its_384x512_canvas(dresscode):
    truth, out, _, _ = dresscode
    sample = next(s for s in shard_samples(out, "train") if s["__key__"] == "dc_upper_body_train_000000")
    got = pose(sample)
    source = np.asarray(truth[("upper_body", "000000")]["keypoints"])
    # 384x512 -> the 192x256 image (x 0.5) -> letterboxed into 256x256 (x 1, 32 px of padding on each side)
    want_x, want_y = source[:, 0] * 0.5 + 32, source[:, 1] * 0.5
    valid = got[:, 2] > 0
    assert not valid[17] and (got[17, :2] == 0).all()  # [-1, -1, 0, -1]: not detected, never a point at (0, 0)
    assert valid[14] and got[14, 1] == 0.0  # REye at y = 0: detected, on the top edge
    np.testing.assert_allclose(got[valid, 0] * 256, want_x[valid], atol=0.05)
    np.testing.assert_allclose(got[valid, 1] * 256, want_y[valid], atol=0.05)
    assert not pose(sample, "garment")[:, 2].any()


def test_dresscode_agnostic_covers_the_garment_region(dresscode):
    truth, out, _, root = dresscode
    for s in shard_samples(out, "train"):
        meta = json.loads(s["json"])
        category, stem = meta["category"], s["__key__"].split("_")[-1]
        labels = truth[(category, stem)]["labels"]
        garment = np.isin(labels, {"upper_body": (4,), "lower_body": (6,), "dresses": (7,)}[category])
        mask = np.asarray(Image.open(io.BytesIO(s["mask.png"])))[:, 32:-32] > 127  # letterbox padding cut
        mask = np.asarray(Image.fromarray(mask).resize(labels.shape[::-1], Image.NEAREST))
        assert mask[garment].mean() > 0.97, (s["__key__"], mask[garment].mean())
        head = labels == 11
        assert mask[head].mean() < 0.05, s["__key__"]  # the head stays the person's
    sheet = Image.open(root / "sheet.png")
    assert sheet.size == (3 * 256, 6 * 256)


def test_dresscode_categories_and_nothing_usable(tmp_path):
    write_dresscode(tmp_path / "dc", per_category=2, categories=("upper_body", "lower_body"))
    r = make_shards(tmp_path / "dc", "--out", tmp_path / "s", "--categories", "lower_body", "--val-fraction", 0)
    assert r.returncode == 0, r.stderr
    keys = [s["__key__"] for split in ("train", "test") for s in shard_samples(tmp_path / "s", split)]
    assert keys and all(k.startswith("dc_lower_body") for k in keys)
    for p in (tmp_path / "dc").glob("*/keypoints/*.json"):
        p.write_text("{\"keypoints\": [[1, 2]]}")
    r = make_shards(tmp_path / "dc", "--out", tmp_path / "s3", "--skip-bad")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no usable samples among 12 found: 12 x pose of the wrong shape" in r.stderr, r.stderr  # 8 people; 4 unpaired test lines
    assert "'keypoints' of shape (1, 2), expected (18, 4)" in r.stderr
    assert not (tmp_path / "s3" / "manifest.json").exists()


def test_body25_npy_pose_is_accepted(tmp_path):
    from tryon_ds.data.synthetic import export_folders
    from tryon_ds.data.keypoints import BODY25_TO_COCO18
    export_folders(tmp_path / "data", 3, size=64)
    for p in (tmp_path / "data" / "person_poses").glob("*.npy"):
        coco = np.load(p)
        body = np.zeros((25, 3), np.float32)
        body[list(BODY25_TO_COCO18)] = coco
        np.save(p, body)
    r = make_shards(tmp_path / "data", "--out", tmp_path / "s", "--image-size", 64, "--val-fraction", 0)
    assert r.returncode == 0, r.stderr
    assert len(shard_samples(tmp_path / "s", "train")) == 3
