"""The training/validation input pipeline over real tar shards."""
import io
import random

import pytest
from hypothesis import given, strategies as st
import torch

from conftest import make_synthetic_shards, run_tool
from tryon_ds.config import build_config, deep_merge, read_config_file
from tryon_ds.data.pipeline import Data, TrainLoader, resolve_shards
from tryon_ds.data.preprocess import pixels, resize, to_device
from tryon_ds.errors import DataError
from tryon_ds.batch import SHARD_IMAGES as IMAGES
from tryon_ds.data.transforms import augment, hflip, rotate
from tryon_ds.model.pose import COCO18_FLIP
from conftest import ROOT


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("shards"), samples=90, shard_size=10, val_fraction=0.3)


def config_for(shards, **data):
    base = read_config_file(ROOT / "configs" / "tiny.yaml")
    return build_config(deep_merge(base, {"data_dir": str(shards), "data": {"num_workers": 0, **data}}))


# --------------------------------------------------------------------------- transforms
def _dot_sample(points, size=64):
    """Images with a bright dot at each keypoint (in its own channel mix), poses at the dots' centres."""
    person = torch.zeros(3, size, size)
    pose = torch.zeros(18, 2)
    valid = torch.zeros(18, dtype=torch.bool)
    for i, (x, y) in points.items():
        person[:, y - 1:y + 2, x - 1:x + 2] = torch.tensor([1.0, i / 18, 0.5])[:, None, None]
        pose[i] = torch.tensor([(x + 0.5) / size, (y + 0.5) / size])
        valid[i] = True
    return {"person": person, "ca": person.clone(), "garment": person.clone(), "person_pose": pose,
            "person_pose_valid": valid, "garment_pose": pose.clone(), "garment_pose_valid": valid.clone()}


def _dot_centre(img, i):
    # Interpolation scales both channels of a dot alike: their ratio identifies the keypoint.
    hit = (img[0] > 0.2) & ((img[1] / img[0].clamp(min=1e-6) - i / 18).abs() < 0.01)
    ys, xs = torch.nonzero(hit, as_tuple=True)
    weights = img[0][hit]
    size = img.shape[-1]
    return ((xs.float() + 0.5) * weights).sum() / weights.sum() / size, ((ys.float() + 0.5) * weights).sum() / weights.sum() / size


def test_hflip_mirrors_x_and_swaps_left_right_keypoints():
    s = _dot_sample({2: (10, 20), 5: (40, 22), 0: (30, 8)})
    f = hflip(s)
    assert f["person_pose_valid"][[0, 2, 5]].all()
    for old in (0, 2, 5):
        new = COCO18_FLIP[old]
        x, y = _dot_centre(f["person"], old)  # the dot keeps its colour: it is still the old keypoint's marker
        assert abs(f["person_pose"][new, 0] - x) < 1 / 64 and abs(f["person_pose"][new, 1] - y) < 1 / 64
    torch.testing.assert_close(hflip(f)["person_pose"], s["person_pose"])


@pytest.mark.parametrize("degrees", [-20.0, 7.5, 30.0])
def test_rotation_moves_keypoints_with_the_image(degrees):
    points = {1: (32, 12), 4: (14, 40), 7: (50, 44)}
    r = rotate(_dot_sample(points), degrees)
    for i in points:
        x, y = _dot_centre(r["person"], i)
        assert abs(r["person_pose"][i, 0] - x) < 1.0 / 64 and abs(r["person_pose"][i, 1] - y) < 1.0 / 64, (i, degrees)
        assert r["garment_pose_valid"][i]


def test_rotation_out_of_frame_invalidates_keypoint():
    r = rotate(_dot_sample({3: (1, 1)}), 40)
    assert not r["person_pose_valid"][3] and (r["person_pose"][3] == 0).all()


def test_augment_is_consistent_across_images():
    s = {k: (v * 255).round().to(torch.uint8) if k in IMAGES else v for k, v in _dot_sample({1: (32, 12)}).items()}
    a = augment(s, random.Random(3), 1.0, 10.0, 0.2)
    assert a["person"].dtype == torch.uint8 and not torch.equal(a["person"], s["person"])
    torch.testing.assert_close(a["person"], a["ca"])
    torch.testing.assert_close(a["person"], a["garment"])
    torch.testing.assert_close(a["person_pose"], a["garment_pose"])


# --------------------------------------------------------------------------- streams
def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_train_batches_have_unet_shapes_and_ranges(shards):
    cfg = config_for(shards)
    wire = _take(TrainLoader(cfg, 1, rank=0, batch_size=4), 1)[0]
    assert wire["person"].dtype == torch.uint8 and wire["person_pose"].dtype == torch.float32  # uint8 images on the wire
    b1 = to_device(wire, torch.device("cpu"))
    assert b1["person"].dtype == torch.float32
    assert b1["person"].shape == (4, 3, 32, 32) and b1["person"].min() >= -1 and b1["person"].max() <= 1
    assert b1["person_pose"].shape == (4, 18, 2) and b1["person_pose_valid"].dtype == torch.bool
    b2 = _take(TrainLoader(cfg, 2, rank=0, batch_size=4), 1)[0]
    assert b2["person"].shape == (4, 3, 64, 64) and b2["lowres"].shape == (4, 3, 32, 32)


def test_every_member_a_unet_reads_is_declared_once_and_written_and_decoded_by_that_declaration(shards):
    """tryon_ds/batch.py is the one list: each family's conditioning reads only declared members, the shard
    writer writes exactly the declared files, and the decoder gives back every input from them."""
    import webdataset as wds
    from tryon_ds import batch
    from tryon_ds.data.pipeline import decode
    from tryon_ds.model.presets import EFFICIENT_PRESETS, PRESETS
    from tryon_ds.config import preset
    for name in [*PRESETS, *EFFICIENT_PRESETS]:
        for sr in (False, True):
            try:
                cond = preset(name).conditioning(sr)
            except Exception:
                continue  # a family that cannot take this place (the Efficient-UNet as UNet 1)
            assert set(cond.inputs) <= set(batch.MEMBERS) and set(cond.sample_inputs) <= set(batch.IN_SHARDS), name
    raw = next(iter(wds.WebDataset(sorted(str(p) for p in shards.glob("train-*.tar")), shardshuffle=False)))
    written = {k for k in raw if not k.startswith("__") and k != "json"}
    declared = {f for m in batch.MEMBERS.values() for f in m.files}
    required = {m.files[0] for m in batch.MEMBERS.values() if m.files and not m.optional}
    assert required <= written <= declared
    sample = decode(raw, 18)
    assert {batch.PERSON, *batch.INPUTS} - {batch.MASK} <= set(sample)
    assert all(f"{pose}_valid" in sample for pose in batch.POSES)


def test_a_validation_target_at_the_shards_size_is_the_shards_own_pixels(shards):
    """Nothing between the decoder and the device rounds an image: UNet 2 validates at the shards' 64 px, where
    its target is the stored JPEG decoded, to the bit, and its low-res input the torch resize of it."""
    import webdataset as wds
    from PIL import Image
    cfg = config_for(shards)
    batch = next(iter(Data(cfg, 2).val(2, whole=True)))
    raw = {s["__key__"]: s for s in wds.WebDataset(sorted(str(p) for p in shards.glob("val-*.tar")), shardshuffle=False)}
    for i, key in enumerate(batch["key"]):
        decoded = pixels(Image.open(io.BytesIO(raw[key]["person.jpg"])).convert("RGB"))
        assert torch.equal(batch["person"][i], decoded)
        assert torch.equal(batch["lowres"][i], resize(decoded, (32, 32)))


def test_ranks_see_different_streams_and_runs_repeat(shards):
    cfg = config_for(shards, num_workers=2, segment_batches=3)
    r0 = _take(TrainLoader(cfg, 1, rank=0, batch_size=4, world_size=2), 6)
    r1 = _take(TrainLoader(cfg, 1, rank=1, batch_size=4, world_size=2), 6)
    again = _take(TrainLoader(cfg, 1, rank=0, batch_size=4, world_size=2), 6)
    assert [b["key"] for b in r0] != [b["key"] for b in r1]
    for a, b in zip(r0, again):
        assert a["key"] == b["key"] and torch.equal(a["person"], b["person"])


def test_global_batches_do_not_depend_on_world_size_with_fixed_streams(shards):
    """1 rank x 2 accumulation steps reads, step by step, the micro-batches that 2 ranks read."""
    cfg = config_for(shards, num_workers=1, streams=2, segment_batches=4)
    single = _take(TrainLoader(cfg, 1, rank=0, batch_size=4, world_size=1, accumulation=2), 8)
    ranks = [_take(TrainLoader(cfg, 1, rank=r, batch_size=4, world_size=2), 4) for r in (0, 1)]
    for step in range(4):
        assert single[2 * step]["key"] == ranks[0][step]["key"]
        assert single[2 * step + 1]["key"] == ranks[1][step]["key"]
        assert torch.equal(single[2 * step + 1]["person"], ranks[1][step]["person"])


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_sees_the_same_batches(shards, workers):
    cfg = config_for(shards, num_workers=workers, segment_batches=3)
    full = _take(TrainLoader(cfg, 1, rank=1, world_size=2, batch_size=4, accumulation=2), 18)[10:]
    resumed = _take(TrainLoader(cfg, 1, rank=1, world_size=2, batch_size=4, accumulation=2, start_step=5), 8)
    for a, b in zip(full, resumed):
        assert a["key"] == b["key"]
        torch.testing.assert_close(a["person"], b["person"], rtol=0, atol=0)
        torch.testing.assert_close(a["person_pose"], b["person_pose"], rtol=0, atol=0)


@pytest.mark.parametrize("shard_size", [2, 10])  # many shards (split by shard), few shards (split by sample)
def test_validation_sees_each_sample_exactly_once_over_2_ranks_x_2_workers(tmp_path, shard_size):
    out = tmp_path / "s"
    assert run_tool(["tools/make_shards.py", "--synthetic", "60", "--out", str(out), "--image-size", "32",
                     "--shard-size", str(shard_size), "--val-fraction", "0.4"]).returncode == 0
    cfg = config_for(out, num_workers=2)
    expected = {s["__key__"] for s in __import__("webdataset").WebDataset(str(out / "val-{000000..000099}.tar"),
                                                                         shardshuffle=False, empty_check=False,
                                                                         handler=lambda e: True)}
    keys = [k for rank in (0, 1) for batch in Data(cfg, 1, rank, 2).val(batch_size=3) for k in batch["key"]]
    assert len(keys) == len(set(keys)) and set(keys) == expected


def test_shard_specs(shards, tmp_path):
    assert len(resolve_shards(str(shards / "train-{000000..000002}.tar"), "train")) == 3
    assert len(resolve_shards([str(shards / "train-*.tar")], "train")) == len(list(shards.glob("train-*.tar")))
    assert resolve_shards("pipe:cat x.tar", "train") == ["pipe:cat x.tar"]
    with pytest.raises(DataError, match="nothing-\\*.tar' matches no file"):
        resolve_shards(str(tmp_path / "nothing-*.tar"), "train")


# --------------------------------------------------------------------------- UNet 3: crops of the top size
@pytest.fixture(scope="module")
def shards128(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("shards128"), samples=40, shard_size=20, val_fraction=0.2,
                                 image_size=128)


def _upsampled_crops(cfg, batch):
    from tryon_ds.cascade import CascadeUNet
    return CascadeUNet(cfg, 3).upsample(batch["lowres"], batch["crop"])


def test_unet3_trains_on_crops_whose_low_res_input_is_cut_at_the_same_place(shards128):
    """A UNet 3 batch: a 32 px crop of the 128 px target, the whole 64 px low-res image, and where the crop
    is; the same crop of the upsampled low-res image is the target, blurred (close), and cut elsewhere it is
    not. Validation keeps whole images. Resumed streams repeat their crops."""
    cfg = config_for(shards128, segment_batches=3)
    batches = [to_device(b, torch.device("cpu")) for b in _take(TrainLoader(cfg, 3, rank=0, batch_size=4), 3)]
    b = batches[0]
    assert b["person"].shape == (4, 3, 32, 32) and b["lowres"].shape == (4, 3, 64, 64)
    assert b["crop"].dtype == torch.int64 and ((b["crop"] >= 0) & (b["crop"] <= 96)).all()
    assert "ca" not in b and "person_pose" not in b  # UNet 3 reads only its target
    tops = torch.cat([x["crop"] for x in batches])
    assert len({tuple(t) for t in tops.tolist()}) > 1  # random places
    same = (_upsampled_crops(cfg, b) - b["person"]).abs().mean()
    elsewhere = (_upsampled_crops(cfg, {**b, "crop": 96 - b["crop"]}) - b["person"]).abs().mean()
    assert same < 0.05 and elsewhere > 2 * same, (same, elsewhere)
    resumed = _take(TrainLoader(cfg, 3, rank=0, batch_size=4, start_step=2), 1)[0]
    assert torch.equal(resumed["crop"], batches[2]["crop"].to(resumed["crop"].dtype))
    val = next(iter(Data(cfg, 3).val(batch_size=2)))
    assert val["person"].shape == (2, 3, 128, 128) and "crop" not in val


def test_unet3_decodes_only_its_target_so_a_broken_conditioning_member_does_not_cost_it_the_sample(shards128, tmp_path):
    """A sample whose ca image is corrupt is skipped by UNet 1, which reads it, and trained on by UNet 3."""
    import io
    import tarfile
    src = sorted(shards128.glob("train-*.tar"))[0]
    out = tmp_path / "broken.tar"
    with tarfile.open(src) as tin, tarfile.open(out, "w") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read()
            if member.name.endswith(".ca.jpg"):
                data = b"not a jpeg"
            member.size = len(data)
            tout.addfile(member, io.BytesIO(data))
    cfg = config_for(shards128, train_shards=[str(out)])
    loader = TrainLoader(cfg, 3, rank=0, batch_size=4)
    _take(loader, 2)
    assert sum(loader.skipped().values()) == 0
    loader = TrainLoader(cfg, 1, rank=0, batch_size=4)
    with pytest.raises(DataError, match="unreadable ca.jpg"):
        _take(loader, 2)


def test_the_crops_low_res_image_is_the_tensor_paths_resize_of_the_target(shards128):
    """UNet 3's low-res input is the one resize every other path makes (torch's antialiased bilinear), to the
    bit, and its crop is cut from the whole target (tests/test_same_pixels.py holds every path to this)."""
    import webdataset as wds
    from PIL import Image
    from tryon_ds.data.preprocess import crop_inputs
    cfg = config_for(shards128, hflip_prob=0.0)
    raw = next(iter(wds.WebDataset(str(sorted(shards128.glob("train-*.tar"))[0]), shardshuffle=False)))
    person = Image.open(io.BytesIO(raw["person.jpg"])).convert("RGB")
    out = crop_inputs({"key": "k", "person": person}, cfg, 3, random.Random(0))
    expected = resize(pixels(person), (64, 64))
    assert torch.equal(out["lowres"], expected)
    top, left = out["crop"].tolist()
    assert torch.equal(out["person"], pixels(person)[:, top:top + 32, left:left + 32])


@given(st.lists(st.sampled_from(["paired", "unpaired", "bad"]), max_size=30),
       st.one_of(st.none(), st.integers(0, 10)), st.one_of(st.none(), st.integers(0, 10)),
       st.one_of(st.none(), st.integers(0, 20)))
def test_a_quota_takes_the_first_samples_of_each_kind_up_to_its_total(kinds, paired, unpaired, total):
    """What evaluate.py (--max-samples/--max-unpaired) and infer.py (--max-samples) take from the shards: the
    first ``paired`` paired and ``unpaired`` unpaired samples, and no more than ``total`` in all, in order; a
    sample whose json cannot be read is never taken (the decoder would skip it)."""
    import json
    from tryon_ds.data.pipeline import Quota
    raws = [{"json": b"{" if kind == "bad" else json.dumps({"pair": kind}).encode()} for kind in kinds]
    quota = Quota(paired, unpaired, total)
    taken = [i for i, raw in enumerate(raws) if quota(raw)]
    expected, seen = [], {"paired": 0, "unpaired": 0}
    for i, kind in enumerate(kinds):
        limit = {"paired": paired, "unpaired": unpaired}.get(kind, 0)
        if kind != "bad" and (limit is None or seen[kind] < limit) and (total is None or len(expected) < total):
            seen[kind] += 1
            expected.append(i)
    assert taken == expected
