"""Images of any aspect: a portrait release (the VITON-HD replica, 3:4 as the real one) converted at 128x96
(H x W) trains UNets 1, 2 and 3 at 32x24 -> 64x48 -> 128x96 with no padding, and the cascade tries on a
portrait photo at its own aspect. Shards of another aspect than a UNet's are refused."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import command, run, run_tool

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from releases import SIZE, write_viton_hd  # noqa: E402

# Real multi-rank or multi-process runs: the full suite, not the fast tier (-m "not slow").
pytestmark = pytest.mark.slow

PORTRAIT = ["--set", "base_image_size=[32,24]", "--set", "sr_image_size=[64,48]",
            "--set", "unet3.image_size=[128,96]", "--set", "unet3.crop_size=[64,48]"]


@pytest.fixture(scope="module")
def portrait(tmp_path_factory):
    root = tmp_path_factory.mktemp("portrait")
    stems = [f"{i:05d}_00" for i in range(12)]
    write_viton_hd(root / "VITON-HD", train=tuple(stems[:9]), test=tuple(stems[9:]))
    r = run_tool(["tools/make_shards.py", str(root / "VITON-HD"), "--out", str(root / "shards"), "--image-size",
                  "128x96", "--val-fraction", "0.2", "--skip-bad"])
    assert r.returncode == 0, r.stderr
    return root


def test_a_portrait_release_is_sharded_at_its_own_aspect_without_padding(portrait):
    manifest = json.loads((portrait / "shards" / "manifest.json").read_text())
    assert manifest["settings"]["image_size"] == [128, 96]
    sample = next(iter(wds.WebDataset(str(sorted((portrait / "shards").glob("train-*.tar"))[0]), shardshuffle=False)))
    import io
    stored = np.asarray(Image.open(io.BytesIO(sample["person.jpg"])), dtype=np.float32)
    source = Image.open(portrait / "VITON-HD" / "train" / "image" / f"{sample['__key__'][len('train_'):]}.jpg")
    assert source.size == SIZE and stored.shape == (128, 96, 3)
    # The whole photo, scaled: no band of padding anywhere (a letterbox to a square would add 16 px a side).
    expected = np.asarray(source.resize((96, 128), Image.BICUBIC), dtype=np.float32)
    assert np.abs(stored - expected).mean() < 4


def test_portrait_cascade_end_to_end(portrait):
    """Each UNet trains on the portrait shards (UNet 3 on 64x48 crops of 128x96), the bundle runs the three
    of them, and a portrait photo comes back at its own size and aspect."""
    shards, run_dir = portrait / "shards", portrait / "run"
    for unet in (1, 2, 3):
        r = run(command(run_dir, shards, ranks=1, steps=2, extra=["--train_unet", str(unet), *PORTRAIT]))
        assert f"unet{unet}" in r.stdout and "done" in r.stdout
    bundle = run_dir / "bundle"
    for unet in (1, 2, 3):
        r = run_tool(["tools/consolidate_checkpoint.py", str(run_dir / "ckpt" / f"unet{unet}"), "--out", str(bundle)])
        assert r.returncode == 0, r.stderr
    from tryon_ds.data.keypoints import read_keypoints
    from tryon_ds.inference import TryOnPipeline
    pipe = TryOnPipeline.from_pretrained(bundle)
    assert pipe.output_size == (128, 96)
    test = portrait / "VITON-HD" / "test"
    ca = Image.open(test / "agnostic-v3.2" / "00009_00.jpg")
    garment = Image.open(test / "cloth" / "00010_00.jpg")
    pose = read_keypoints(test / "openpose_json" / "00009_00_keypoints.json", ca.size).points
    conds, box = pipe.prepare(ca, garment, pose, None)
    assert box == (0, 0, 96, 128)  # 192x256 for 96x128: no padding, the whole output is the photo
    assert {n: tuple(c["ca"].shape[-2:]) for n, c in conds.items() if "ca" in c} == {1: (32, 24), 2: (64, 48),
                                                                                     3: (128, 96)}
    image = pipe(ca, garment, pose, steps=(2,), sampler="ddim")
    assert image.size == (96, 128)


def test_shards_of_another_aspect_or_smaller_than_the_unet_are_refused(portrait, tmp_path):
    r = run_tool(command(tmp_path, portrait / "shards", ranks=1, steps=1)[1:])  # the square tiny config
    assert r.returncode == 2 and "holds shards of 128x96 (HxW) but UNet 1 trains at 32x32" in r.stderr
    r = run_tool(command(tmp_path, portrait / "shards", ranks=1, steps=1, extra=[
        "--train_unet", "3", *PORTRAIT, "--set", "unet3.image_size=[256,192]"])[1:])
    assert r.returncode == 2 and "smaller than the 256x192 UNet 3 trains at ('unets.2.image_size')" in r.stderr
