"""Training, evaluation and inference give a UNet the same pixels from the same sample (issue #44).

For every UNet of three cascades (configs/tiny.yaml, configs/tiny4.yaml, configs/cascade1024x768.yaml) over
real shards (square 256 px and portrait 1024x768, with JPEG members as train and val splits store them and
PNG members as test splits do), the training stream with augmentation off, the validation stream, the
evaluation's batches (``TryOnPipeline.shard_batches``) and inference from the shard's own pictures
(``TryOnPipeline.prepare``, poses given in pixels as a user gives them) must agree: every image input to the
bit, poses to float32 rounding (inference goes through pixel coordinates). A UNet trained on crops is
compared on its crop of the evaluation's target. The test fails if either side changes its preparation alone.
"""
import io
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import ROOT, make_synthetic_shards
from tryon_ds.config import build_config, deep_merge, read_config_file
from tryon_ds.data.pipeline import Data, TrainLoader
from tryon_ds.inference import TryOnPipeline
from tryon_ds.model import LOWRES

SAMPLES = 6


def as_png(src, out):
    """A shard with the same samples, its images stored as PNG (a test split's members)."""
    with tarfile.open(src) as tin, tarfile.open(out, "w") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read()
            if member.name.endswith(".jpg"):
                buf = io.BytesIO()
                Image.open(io.BytesIO(data)).save(buf, format="PNG")
                data, member.name = buf.getvalue(), member.name[:-len(".jpg")] + ".png"
            member.size = len(data)
            tout.addfile(member, io.BytesIO(data))
    return out


# The portrait 1024x768 shards cost most of this file's time: the full tier's.
@pytest.fixture(scope="module", params=["256", pytest.param("1024x768", marks=pytest.mark.slow)])
def shard_files(request, tmp_path_factory):
    """{member format: one shard of SAMPLES samples at that size}."""
    root = tmp_path_factory.mktemp(f"shards{request.param}")
    make_synthetic_shards(root, samples=SAMPLES, shard_size=SAMPLES, val_fraction=0.0, image_size=request.param)
    jpeg = sorted(root.glob("train-*.tar"))[0]
    return request.param, {"jpeg": jpeg, "png": as_png(jpeg, root / "png.tar")}


CASCADES = {"256": ["tiny.yaml", "tiny4.yaml"], "1024x768": ["cascade1024x768.yaml"]}


def config(name, shard):
    base = read_config_file(ROOT / "configs" / name)
    return build_config(deep_merge(base, {"data": {
        "train_shards": [str(shard)], "val_shards": [str(shard)], "num_workers": 0, "streams": 1,
        "hflip_prob": 0.0, "rotation_degrees": 0.0, "color_jitter": 0.0, "shuffle_buffer": 4}}))


def by_key(batches):
    """{key: {field: one sample's tensor}} of collated batches."""
    out = {}
    for batch in batches:
        for i, key in enumerate(batch["key"]):
            out[key] = {k: v[i] for k, v in batch.items() if torch.is_tensor(v)}
    return out


def training(cfg, number):
    """Every sample of the shard as the training stream prepares it for UNet ``number``."""
    loader, seen = iter(TrainLoader(cfg, number, rank=0, batch_size=2)), {}
    for _ in range(20 * SAMPLES):
        seen.update(by_key([next(loader)]))
        if len(seen) == SAMPLES:
            return seen
    raise AssertionError(f"the training stream gave {len(seen)} of the {SAMPLES} samples")


def inference(pipe, shard):
    """{key: {unet number: its inputs}} as ``prepare`` makes them from each sample's decoded pictures and its
    poses in pixels."""
    out = {}
    for raw in wds.WebDataset(str(shard), shardshuffle=False):
        image = {k: Image.open(io.BytesIO(raw[f"{k}.{ext}"])).convert("RGB")
                 for k in ("ca", "garment") for ext in ("jpg", "png") if f"{k}.{ext}" in raw}
        w, h = image["ca"].size
        poses = []
        for name in ("person_pose", "garment_pose"):
            stored = np.load(io.BytesIO(raw[f"{name}.npy"]))  # (x, y) in [0, 1] of the image, valid
            poses.append(np.stack([stored[:, 0] * w, stored[:, 1] * h, stored[:, 2]], axis=1))
        conds, box = pipe.prepare(image["ca"], image["garment"], *poses)
        assert box == (0, 0, pipe.output_size[1], pipe.output_size[0])  # the shard's aspect: nothing to cut
        out[raw["__key__"]] = {n: {k: v[0] for k, v in c.items()} for n, c in conds.items()}
    return out


def assert_same(got: dict, want: dict, where: str):
    """Every input ``got`` holds (but a crop's place) is in ``want``, and equal."""
    assert set(got) - {"crop"} <= set(want), (where, sorted(set(got) - set(want)))
    for name, value in got.items():
        if name == "crop":
            continue
        if value.is_floating_point():  # poses
            torch.testing.assert_close(value, want[name], rtol=0, atol=1e-6, msg=f"{where}: {name}")
        else:
            assert torch.equal(value, want[name]), (where, name, (value.int() - want[name].int()).abs().max())


@pytest.mark.parametrize("members", ["jpeg", "png"])
def test_training_evaluation_and_inference_prepare_the_same_pixels(shard_files, members):
    size, shards = shard_files
    shard = shards[members]
    for name in CASCADES[size]:
        cfg = config(name, shard)
        numbers = list(range(1, len(cfg.unets) + 1))
        pipe = TryOnPipeline({}, {n: cfg for n in numbers}, torch.device("cpu"))
        evaluation = {n: by_key(batch[n] for batch in pipe.shard_batches(str(shard), 4)) for n in numbers}
        inferred = inference(pipe, shard)
        assert len(inferred) == SAMPLES
        for n in numbers:
            where = f"{name}, UNet {n}, {size} {members}"
            validation = by_key(Data(cfg, n).val(4))
            assert validation.keys() == evaluation[n].keys() == inferred.keys(), where
            for key, sample in training(cfg, n).items():
                whole = evaluation[n][key]
                assert {"person", *cfg.conditioning(n).keys} <= set(sample), where
                if "crop" in sample:  # a UNet trained on crops: its crop of the whole target
                    top, left = sample["crop"].tolist()
                    h, w = sample["person"].shape[-2:]
                    whole = {**whole, "person": whole["person"][:, top:top + h, left:left + w]}
                assert_same(sample, whole, f"{where}, training vs evaluation, {key}")
                assert_same(validation[key], evaluation[n][key], f"{where}, validation vs evaluation, {key}")
                # Inference has no target, and so no low-res input: a super-resolution UNet's is the UNet
                # before's output.
                assert set(inferred[key][n]) == set(evaluation[n][key]) - {"person", LOWRES, "mask"}, where
                assert_same(inferred[key][n], evaluation[n][key], f"{where}, inference vs evaluation, {key}")
