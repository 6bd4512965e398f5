"""tools/make_shards.py on replicas of the public releases and of your own parsed photos
(tests/helpers/releases.py): VITON-HD's splits kept honest, its older folder names, DressCode with built
agnostic images, keypoints as they come, and the parsed layout."""
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
from releases import SIZE, write_dresscode, write_parsed, write_viton_hd  # noqa: E402


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


def test_a_releases_test_split_is_stored_losslessly_so_targets_are_its_pixels(tmp_path):
    """Train and val are JPEG (--jpeg-quality); the test split is PNG: at the release's own size (no resize
    to letterbox) a test person decodes to the release's file's pixels exactly, and the training pipeline's
    reader takes either."""
    from tryon_ds.data.pipeline import decode
    write_viton_hd(tmp_path / "v")
    r = make_shards(tmp_path / "v", "--out", tmp_path / "s", "--image-size", f"{SIZE[1]}x{SIZE[0]}",
                    "--val-fraction", 0.3, "--skip-bad")
    assert r.returncode == 0, r.stderr
    train = shard_samples(tmp_path / "s", "train")
    assert train and all("person.jpg" in s and "person.png" not in s for s in train)
    test = shard_samples(tmp_path / "s", "test")
    assert test and all({"person.png", "ca.png", "garment.png"} <= set(s) and "person.jpg" not in s for s in test)
    for sample in test:
        source = json.loads(sample["json"])["source"]["person"]
        stored = np.asarray(Image.open(io.BytesIO(sample["person.png"])))
        assert np.array_equal(stored, np.asarray(Image.open(source).convert("RGB"))), source
        decoded = decode(sample, 18, ("ca", "garment", "person_pose", "garment_pose"))
        assert np.array_equal(np.asarray(decoded["person"]), stored) and decoded["ca"].size == (SIZE[0], SIZE[1])


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
    # REye at y = 0 with a score: a joint the head crop cut off, which DressCode's loader (x > 1 and y > 1)
    # ignores: not detected, and counted with the dropped joints.
    assert not valid[14] and (got[14, :2] == 0).all()
    x = source[14, 0]
    assert json.loads(sample["json"])["keypoints"]["dropped"] == [
        f"000000_2.json: REye, COCO-18 #14 at ({x:.1f}, 0.0) on the edge of DressCode's 384x512 canvas, where its "
        "files put the joints the crop cut off: stored as not detected"]
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


@pytest.mark.parametrize("top_level", [False, True])
def test_a_dresscode_pairs_line_naming_missing_files_is_reported_whichever_pairs_files(tmp_path, top_level):
    """Per-category pairs files and the top-level ones with their numbered category column read the same
    samples, and a line whose files are missing is a listed problem in both (--skip-bad: skipped.json and
    the manifest's counts), never a sample that vanishes without a word."""
    write_dresscode(tmp_path / "dc", per_category=1, categories=("upper_body", "lower_body"), top_level=top_level,
                    missing=True)
    r = make_shards(tmp_path / "dc", "--out", tmp_path / "s", "--val-fraction", 0)
    assert r.returncode == 2 and "2 problem(s) in the input, nothing written" in r.stderr, r.stderr
    assert "missing counterpart" in r.stderr and "900003_0.jpg" in r.stderr and "900006_0.jpg" in r.stderr
    r = make_shards(tmp_path / "dc", "--out", tmp_path / "s", "--val-fraction", 0, "--skip-bad")
    assert r.returncode == 0, r.stderr
    skipped = json.loads((tmp_path / "s" / "skipped.json").read_text())["problems"]
    assert len(skipped) == 2 and all("missing counterpart" in p for p in skipped)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["skipped_reasons"] == {"missing file": 2}
    keys = sorted(s["__key__"] for split in ("train", "test") for s in shard_samples(tmp_path / "s", split))
    assert keys == ['dc_lower_body_test_000004', 'dc_lower_body_test_000004__000005', 'dc_lower_body_test_000005',
                    'dc_lower_body_test_000005__000004', 'dc_lower_body_train_000003', 'dc_upper_body_test_000001',
                    'dc_upper_body_test_000001__000002', 'dc_upper_body_test_000002',
                    'dc_upper_body_test_000002__000001', 'dc_upper_body_train_000000']


@pytest.mark.parametrize("label_set, pose_style", [("atr", "body25"), ("lip", "coco18")])
def test_your_own_parsed_photos_become_shards(tmp_path, label_set, pose_style):
    """--layout parsed: person photos, garment photos, a parser's label maps (ATR or LIP numbers) and a pose
    estimator's JSON (OpenPose BODY_25, DWPose's COCO-18), matched by stem; the agnostic image built by
    DressCode's rule read through that label set; a worn garment cut out with its own map, its pose the
    wearer's; a dotted file name kept apart from its neighbours (its key encoded, its name in the json)."""
    made = write_parsed(tmp_path / "photos", label_set, pose_style)
    out = tmp_path / "shards"
    flags = ["--label-set", "atr"] if label_set == "atr" else []  # ATR's 0..17 could be LIP's too; LIP's shoes tell
    r = make_shards(tmp_path / "photos", "--out", out, "--category", "upper_body", "--val-fraction", 0,
                    "--image-size", "256", *flags)
    assert r.returncode == 0, r.stderr
    assert "layout: parsed" in r.stdout and f"label maps read as {label_set.upper()} labels" in r.stdout
    samples = {json.loads(s["json"])["key"]: s for s in shard_samples(out, "train")}
    assert sorted(samples) == sorted(made["stems"])  # the dotted look.1 too, whole, with its own members
    stock = {s["__key__"]: s for s in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)}
    assert "look%2E1" in stock and {"person.jpg", "ca.jpg", "garment.jpg", "json"} <= set(stock["look%2E1"])
    upper, head = (4, 11) if label_set == "atr" else (5, 13)
    for stem, sample in samples.items():
        labels = made["truth"][stem]["labels"]
        mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))[:, 32:-32] > 127
        mask = np.asarray(Image.fromarray(mask).resize(labels.shape[::-1], Image.NEAREST))
        assert mask[labels == upper].mean() > 0.97 and mask[labels == head].mean() < 0.05, stem
        k = made["truth"][stem]["keypoints"]
        np.testing.assert_allclose(pose(sample)[:, 0] * 256, k[:, 0] + 32, atol=0.1)  # 192 wide, 32 px padding
    worn = samples[made["stems"][-1]]
    wearer = made["truth"][made["stems"][-1]]
    garment = np.asarray(Image.open(io.BytesIO(worn["garment.jpg"])).convert("RGB"))[:, 32:-32]
    garment = np.asarray(Image.fromarray(garment).resize(SIZE, Image.NEAREST)).astype(int)
    outside = wearer["worn_labels"] != upper
    assert (garment[outside] > 240).all(axis=-1).mean() > 0.95  # cut out: white around the garment
    assert pose(worn, "garment")[:, 2].all()  # the wearer's pose
    assert not pose(samples[made["stems"][0]], "garment")[:, 2].any()  # a flat product photo has none


def test_parsed_layout_pairs_categories_and_label_set_errors(tmp_path):
    write_parsed(tmp_path / "p", "atr", "body25", pairs=True)
    r = make_shards(tmp_path / "p", "--out", tmp_path / "s", "--val-fraction", 0)
    assert r.returncode == 2 and "cannot tell the label set of the maps under" in r.stderr
    assert "give --label-set atr or --label-set lip" in r.stderr and "Traceback" not in r.stderr
    r = make_shards(tmp_path / "p", "--out", tmp_path / "s", "--val-fraction", 0, "--label-set", "atr")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["samples"]["train"] == 6 and manifest["splits"]["test"]["pairs"] == {"paired": 0, "unpaired": 1}
    (tmp_path / "p" / "pairs.txt").write_text("me_00.jpg me_00.jpg\n")
    r = make_shards(tmp_path / "p", "--out", tmp_path / "s2", "--label-set", "atr")
    assert r.returncode == 2 and "garment category None, expected one of upper_body, lower_body, dresses" in r.stderr


def test_the_fast_dilation_is_pils_max_filter_at_the_releases_size():
    """The agnostic region's dilation (an integral image, time independent of its size) against what it
    replaced, PIL's MaxFilter(25) on a 768x1024 DressCode-sized map: the same pixels (IoU 1 >= 0.98)."""
    from PIL import ImageFilter
    from tryon_ds.data.agnostic import dilate
    rng = np.random.default_rng(0)
    for shape, k in (((1024, 768), 25), ((256, 192), 7), ((20, 30), 25)):
        mask = rng.random(shape) > 0.998
        mask[:3, :2] = mask[-1, -1] = True  # the borders, where PIL copies edge pixels
        before = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(k))) > 0
        after = dilate(mask, k)
        assert (before & after).sum() / (before | after).sum() >= 0.98 and np.array_equal(before, after)


def test_the_agnostic_image_built_at_the_stored_size_covers_what_the_full_size_one_did(tmp_path, monkeypatch):
    """make_shards builds a DressCode agnostic image at the size the shard stores the person at; on photos of
    the release's 768x1024 written into 256 px shards, its grey region against the one built on the photo and
    then scaled down: IoU >= 0.98 in each category, and the person pixels around it identical (both come from
    the same resize)."""
    import releases
    from tryon_ds.data import sources
    from tryon_ds.data.preprocess import letterbox
    monkeypatch.setattr(releases, "SIZE", (768, 1024))
    write_dresscode(tmp_path / "dc", per_category=2)
    size = (256, 256)
    for sample in sources.scan_dresscode(tmp_path / "dc").samples:
        full, stored = sources.load_sample(sample), sources.load_sample(sample, size=size)
        assert stored.ca.size == (192, 256) and full.ca.size == (768, 1024)
        grey = [np.asarray(letterbox(s.mask.convert("L"), size, 0, Image.NEAREST)[0]) > 127 for s in (full, stored)]
        assert (grey[0] & grey[1]).sum() / (grey[0] | grey[1]).sum() >= 0.98, sample.key
        outside = ~(grey[0] | grey[1])
        person = np.asarray(letterbox(full.person, size)[0])
        assert np.array_equal(np.asarray(letterbox(stored.ca, size)[0])[outside], person[outside])
