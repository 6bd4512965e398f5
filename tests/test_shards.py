"""tools/make_shards.py on each input layout, each kind of bad input, and interrupted runs."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from conftest import ROOT, run_tool
from tryon_ds.data.synthetic import export_folders


def make_shards(*args):
    return run_tool(["tools/make_shards.py", *map(str, args)])


def read_shards(folder):
    import webdataset as wds
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def write_person_layout(root, n=4, size=(96, 64), pose_cols=3):
    """A small seed-guide folder with non-square images and a marker dot at keypoint 1 (the neck)."""
    rng = np.random.default_rng(0)
    for d in ("person_images", "ca_images", "garment_images", "person_poses", "garment_poses"):
        (root / d).mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(n):
        pose = np.zeros((18, pose_cols), np.float32)
        pose[:, 0], pose[:, 1] = rng.uniform(8, w - 8, 18), rng.uniform(8, h - 8, 18)
        if pose_cols == 3:
            pose[:, 2] = 1.0
        img = np.full((h, w, 3), 200, np.uint8)
        x, y = int(pose[1, 0]), int(pose[1, 1])
        img[y - 2:y + 3, x - 2:x + 3] = (255, 0, 0)
        Image.fromarray(img).save(root / "person_images" / f"s{i}.png")
        Image.fromarray(img).save(root / "ca_images" / f"s{i}.jpg")
        Image.fromarray(np.full((50, 40, 3), 90, np.uint8)).save(root / "garment_images" / f"s{i}.jpg")
        np.save(root / "person_poses" / f"s{i}.npy", pose)
        np.save(root / "garment_poses" / f"s{i}.npy", pose * [40 / w, 50 / h, 1][:pose_cols])


def test_synthetic_round_trip(tmp_path):
    out = tmp_path / "shards"
    r = make_shards("--synthetic", 60, "--out", out, "--image-size", 64, "--shard-size", 16, "--val-fraction", 0.2)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["settings"]["layout"] == "synthetic"
    assert manifest["samples"]["train"] + manifest["samples"]["val"] == 60 and manifest["samples"]["val"] > 0
    samples = read_shards(out)
    assert len({s["__key__"] for s in samples}) == 60
    s = samples[0]
    for member in ("person.jpg", "ca.jpg", "garment.jpg", "person_pose.npy", "garment_pose.npy", "mask.png", "json"):
        assert member in s
    assert Image.open(__import__("io").BytesIO(s["person.jpg"])).size == (64, 64)
    pose = np.load(__import__("io").BytesIO(s["person_pose.npy"]))
    assert pose.shape == (18, 3) and pose.dtype == np.float32 and ((0 <= pose[:, :2]) & (pose[:, :2] <= 1)).all()
    # The split is a function of the key alone.
    again = tmp_path / "again"
    assert make_shards("--synthetic", 60, "--out", again, "--image-size", 64, "--shard-size", 16,
                       "--val-fraction", 0.2).returncode == 0
    assert json.loads((again / "manifest.json").read_text())["shards"] == manifest["shards"]


@pytest.mark.parametrize("pose_cols", [2, 3])
def test_seed_folder_layout_letterboxes_images_and_keypoints_together(tmp_path, pose_cols):
    src, out = tmp_path / "data", tmp_path / "shards"
    write_person_layout(src, pose_cols=pose_cols)
    r = make_shards(src, "--out", out, "--image-size", 128, "--val-fraction", 0)
    assert r.returncode == 0, r.stderr
    import io
    for s in read_shards(out):
        img = np.asarray(Image.open(io.BytesIO(s["person.jpg"])).convert("RGB")).astype(int)
        assert img.shape == (128, 128, 3)
        red = (img[..., 0] > 200) & (img[..., 1] < 80) & (img[..., 2] < 80)
        ys, xs = np.nonzero(red)
        pose = np.load(io.BytesIO(s["person_pose.npy"]))
        # The marker was drawn over pixels [x-2, x+2] around int(x): compare centres within 1.5 px.
        assert abs(xs.mean() + 0.5 - pose[1, 0] * 128) < 1.5 and abs(ys.mean() + 0.5 - pose[1, 1] * 128) < 1.5
        assert pose[:, 2].all()
        # 96x64 letterboxed into 128x128: scale 4/3, 21-px bands of padding above and below.
        assert 21 / 128 - 0.01 < pose[:, 1].min() and pose[:, 1].max() < 107 / 128 + 0.01


def write_viton(root, stems=("000001_00", "000002_00", "000003_00")):
    for split in ("train", "test"):
        for d in ("image", "cloth", "agnostic-v3.2", "openpose_json"):
            (root / split / d).mkdir(parents=True)
    for split, chosen in (("train", stems[:2]), ("test", stems[2:])):
        (root / f"{split}_pairs.txt").write_text("".join(f"{s}.jpg {s}.jpg\n" for s in chosen))
        for s in chosen:
            for d in ("image", "agnostic-v3.2"):
                Image.new("RGB", (192, 256), (120, 120, 120)).save(root / split / d / f"{s}.jpg")
            Image.new("RGB", (192, 256), (20, 200, 20)).save(root / split / "cloth" / f"{s}.jpg")
            body25 = np.zeros((25, 3))
            body25[:, 0], body25[:, 1], body25[:, 2] = np.arange(25) * 7 + 3, np.arange(25) * 9 + 5, 0.9
            body25[17] = 0  # an undetected ear
            (root / split / "openpose_json" / f"{s}_keypoints.json").write_text(
                json.dumps({"version": 1.3, "people": [{"pose_keypoints_2d": body25.flatten().tolist()}]}))


def test_viton_hd_layout(tmp_path):
    src, out = tmp_path / "viton", tmp_path / "shards"
    write_viton(src)
    r = make_shards(src, "--out", out, "--image-size", 256, "--val-fraction", 0)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    # The test person goes to the test split, never to training (tests/test_datasets.py has the release in full).
    assert manifest["settings"]["layout"] == "viton-hd" and manifest["samples"]["train"] == 2
    assert manifest["samples"]["test"] == 1
    import io
    for s in read_shards(out):
        person = np.load(io.BytesIO(s["person_pose.npy"]))
        garment = np.load(io.BytesIO(s["garment_pose.npy"]))
        assert not garment[:, 2].any(), "a flat product garment has no pose: stored as absent"
        assert json.loads(s["json"])["garment_pose"] is False
        # COCO-18 slot 8 (right hip) is BODY_25's 9: x = 9*7+3 = 66 px of 192, letterboxed with 32 px padding.
        assert abs(person[8, 0] * 256 - (66 + 32)) < 0.01 and abs(person[8, 1] * 256 - (9 * 9 + 5)) < 0.01
        assert person[16, 2] == 0 and person[8, 2] == 1  # BODY_25's ear 17 -> COCO slot 16, undetected


def _corrupt_inputs(src):
    write_person_layout(src, n=8)
    (src / "garment_images" / "s0.jpg").unlink()                                    # missing counterpart
    data = (src / "person_images" / "s1.png").read_bytes()
    (src / "person_images" / "s1.png").write_bytes(data[: len(data) // 2])          # truncated image
    np.save(src / "person_poses" / "s2.npy", np.zeros((17, 2)))                    # wrong shape
    bad = np.load(src / "person_poses" / "s3.npy"); bad[4, 0] = np.nan
    np.save(src / "person_poses" / "s3.npy", bad)                                   # NaN
    far = np.load(src / "person_poses" / "s4.npy"); far[5, 0] = 5000
    np.save(src / "person_poses" / "s4.npy", far)  # far outside: stored as not detected, not an error
    Image.new("RGB", (10, 10)).save(src / "ca_images" / "s5.jpg")                   # size mismatch
    return {"s0": "missing counterpart", "s1": "unreadable or truncated image", "s2": "pose of shape (17, 2)",
            "s3": "NaN", "s5": "differs from the person image"}


def test_bad_input_is_listed_with_files_and_nothing_is_written(tmp_path):
    src, out = tmp_path / "data", tmp_path / "shards"
    expected = _corrupt_inputs(src)
    r = make_shards(src, "--out", out, "--workers", 2)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    for key, message in expected.items():
        line = next((l for l in r.stderr.splitlines() if f"{key}." in l or f"{key}:" in l), None)
        assert line is not None and message in r.stderr, (key, r.stderr)
    assert str(src / "person_poses" / "s2.npy") in r.stderr
    assert not out.exists()


def test_skip_bad_writes_the_good_and_reports_the_bad(tmp_path):
    src, out = tmp_path / "data", tmp_path / "shards"
    expected = _corrupt_inputs(src)
    r = make_shards(src, "--out", out, "--skip-bad", "--val-fraction", 0)
    assert r.returncode == 0, r.stderr
    keys = {s["__key__"] for s in read_shards(out)}
    assert keys == {"s4", "s6", "s7"}
    assert json.loads((out / "manifest.json").read_text())["keypoints"] == {"clipped": 0, "dropped": 1}
    report = json.loads((out / "skipped.json").read_text())["problems"]
    assert len(report) == len(expected)


def test_changed_settings_refuse_to_mix_into_an_existing_folder(tmp_path):
    out = tmp_path / "shards"
    assert make_shards("--synthetic", 10, "--out", out, "--image-size", 64).returncode == 0
    r = make_shards("--synthetic", 10, "--out", out, "--image-size", 128)
    assert r.returncode == 2 and "image_size" in r.stderr


def test_killed_run_leaves_only_finished_shards_and_resumes(tmp_path):
    out, fresh = tmp_path / "killed", tmp_path / "fresh"
    args = ["--synthetic", 240, "--image-size", 64, "--shard-size", 10, "--val-fraction", 0.1]
    # It stops itself as it starts the fourth training shard (three finished), so the kill lands mid-run
    # whatever the machine's speed.
    pause = {"PYTHONPATH": str(Path(__file__).parent / "helpers" / "pause_at"),
             "TRYON_TEST_PAUSE_OPEN": ".train-000003.tar.tmp"}
    proc = subprocess.Popen([sys.executable, "tools/make_shards.py", *map(str, args), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **pause})
    while psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED:
        assert proc.poll() is None, "make_shards ended before it reached its fourth shard"
        time.sleep(0.05)
    assert len(list(out.glob("train-*.tar"))) == 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    for shard in out.glob("*.tar"):  # every file that looks like a shard is a whole one
        with tarfile.open(shard) as tar:
            assert len({m.name.split(".")[0] for m in tar.getmembers()}) == 10
    listed = {e["name"]: e["sha256"] for e in manifest["shards"]["train"]}
    assert listed
    from tryon_ds.data.shards import read_manifest
    from tryon_ds.errors import UserError
    with pytest.raises(UserError, match="incomplete"):
        read_manifest(out)
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in listed}
    r = make_shards(*args, "--out", out)
    assert r.returncode == 0 and "keeping" in r.stdout, r.stdout + r.stderr
    assert all(os.stat(out / n).st_mtime_ns == t for n, t in mtimes.items()), "finished shards were rewritten"
    assert make_shards(*args, "--out", fresh).returncode == 0
    done = json.loads((out / "manifest.json").read_text())
    assert done["complete"] and done["shards"] == json.loads((fresh / "manifest.json").read_text())["shards"]
    assert not list(out.glob(".*.tmp"))


def test_export_folders_converts(tmp_path):
    export_folders(tmp_path / "data", 6, size=64)
    r = make_shards(tmp_path / "data", "--out", tmp_path / "shards", "--image-size", 64, "--workers", 2)
    assert r.returncode == 0, r.stderr
    assert "6 samples" in r.stdout
