"""ZeRO checkpoint -> bundle -> inference: consolidation, equality with the engine, the cascade CLI."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, command, free_port, run, run_tool

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from fixed_inputs import fixed_inputs  # noqa: E402

UNETS = {1: "cpu_zero2", 2: "cpu_zero3"}  # the base UNet under ZeRO-2, the SR UNet under ZeRO-3


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    for unet, ds in UNETS.items():
        run(command(root, shards, ds=ds, steps=4, extra=["--train_unet", str(unet)]))
    bundle = root / "bundle"
    for unet in UNETS:
        r = run_tool(["tools/consolidate_checkpoint.py", str(root / "ckpt" / f"unet{unet}"), "--out", str(bundle)])
        assert r.returncode == 0, r.stderr
        assert {1: "1,885,187 parameters", 2: "1,675,235 parameters"}[unet] in r.stdout
    return root, bundle


@pytest.mark.parametrize("unet", [1, 2])
def test_bundle_gives_the_engines_outputs_for_raw_and_ema_weights(trained, unet):
    root, bundle = trained
    ckpt = root / "ckpt" / f"unet{unet}" / "step00000004"
    out = root / f"engine{unet}.safetensors"
    subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                    str(free_port()), "tests/helpers/engine_outputs.py", "--ckpt", str(ckpt), "--ds",
                    f"ds_configs/{UNETS[unet]}.json", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    engine = load_file(str(out))
    from tryon_ds.inference import TryOnPipeline
    for use_ema, key in ((False, "raw"), (True, "ema")):
        pipe = TryOnPipeline.from_pretrained(bundle, ema=use_ema)
        x, t, cond, levels = fixed_inputs(pipe.configs[unet], unet)
        with torch.no_grad():
            got = pipe.unets[unet].unet(x, t, cond, levels)
        torch.testing.assert_close(got, engine[key], rtol=0, atol=1e-6)
    meta = json.loads((bundle / f"unet{unet}" / "config.json").read_text())
    assert meta["step"] == 4 and meta["unet_number"] == unet and meta["has_ema"]


def test_consolidation_refuses_to_overwrite_and_casts_dtype(trained, tmp_path):
    root, bundle = trained
    r = run_tool(["tools/consolidate_checkpoint.py", str(root / "ckpt" / "unet1"), "--out", str(bundle)])
    assert r.returncode == 2 and "pass --force" in r.stderr
    half = tmp_path / "half"
    r = run_tool(["tools/consolidate_checkpoint.py", str(root / "ckpt" / "unet1" / "step00000004"),
                  "--out", str(half), "--dtype", "bf16"])
    assert r.returncode == 0, r.stderr
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(half / "unet1" / "weights.safetensors")).values())
    assert not list(half.glob(".*"))


def _val_pair(shards, tmp_path):
    """One validation sample as the files a user would pass: images and (18, 3) pixel poses."""
    import webdataset as wds
    sample = next(iter(wds.WebDataset(sorted(str(p) for p in shards.glob("val-*.tar")), shardshuffle=False)))
    import io
    paths = {}
    for name in ("ca", "garment"):
        paths[name] = tmp_path / f"{name}.jpg"
        paths[name].write_bytes(sample[f"{name}.jpg"])
    for name in ("person_pose", "garment_pose"):
        pose = np.load(io.BytesIO(sample[f"{name}.npy"]))
        pose[:, :2] *= 64  # normalised -> pixels of the 64-px shard images
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], pose)
    return paths


def test_infer_cli_one_pair_is_deterministic_and_full_size(trained, shards, tmp_path):
    _, bundle = trained
    pair = _val_pair(shards, tmp_path)
    outputs = []
    for i in range(2):
        out = tmp_path / f"result{i}.png"
        r = run_tool(["tools/infer.py", "--checkpoint", str(bundle), "--ca_image", str(pair["ca"]),
                      "--garment_image", str(pair["garment"]), "--person_pose", str(pair["person_pose"]),
                      "--garment_pose", str(pair["garment_pose"]), "--output", str(out), "--steps", "3", "2",
                      "--seed", "7", "--sampler", "ddim"])
        assert r.returncode == 0, r.stderr
        outputs.append(np.asarray(Image.open(out)))
    assert outputs[0].shape == (64, 64, 3)  # UNet 2's size, square input: no crop
    assert np.array_equal(outputs[0], outputs[1])


def test_infer_cli_on_validation_shards_writes_results_and_grid(trained, shards, tmp_path):
    _, bundle = trained
    r = run_tool(["tools/infer.py", "--checkpoint", str(bundle), "--shards", str(shards / "val-*.tar"), "--num", "3",
                  "--batch_size", "2", "--output_dir", str(tmp_path), "--steps", "2", "--no-ema"])
    assert r.returncode == 0, r.stderr
    results = [p for p in tmp_path.glob("*.png") if p.name != "grid.png"]
    assert len(results) == 3 and all(Image.open(p).size == (64, 64) for p in results)
    assert Image.open(tmp_path / "grid.png").size == (4 * 64, 3 * 64)


def test_base_only_bundle_and_bad_bundles_fail_clearly(trained, tmp_path):
    _, bundle = trained
    from tryon_ds.errors import UserError
    from tryon_ds.inference import TryOnPipeline
    base_only = tmp_path / "base_only"
    shutil.copytree(bundle / "unet1", base_only / "unet1")
    pipe = TryOnPipeline.from_pretrained(base_only)
    assert list(pipe.unets) == [1] and pipe.output_size == (32, 32)

    with pytest.raises(UserError, match="does not exist"):
        TryOnPipeline.from_pretrained(tmp_path / "nowhere")
    other = tmp_path / "other"
    shutil.copytree(bundle / "unet1", other / "unet1")
    meta = json.loads((other / "unet1" / "config.json").read_text())
    meta["config"]["unet1"]["dim"] = 48  # the weights now belong to another preset than the config
    (other / "unet1" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not match the unet1 of its config"):
        TryOnPipeline.from_pretrained(other)
    (base_only / "unet1" / "ema.safetensors").unlink()
    r = run_tool(["tools/infer.py", "--checkpoint", str(base_only), "--shards", "x", "--num", "1"])
    assert r.returncode == 2 and "ema.safetensors is missing" in r.stderr


def test_evaluate_reports_paired_metrics_fid_kid_and_tries_unpaired_on(trained, tmp_path):
    """On a release's test split (a DressCode replica): the quality table over its paired samples, FID/KID
    from a locally saved Inception (TorchScript; random weights run the plumbing), the unpaired samples
    tried on for pictures only."""
    from releases import write_dresscode
    from tiny_inception import save
    _, bundle = trained
    write_dresscode(tmp_path / "dc", per_category=1, categories=("upper_body",))
    assert run_tool(["tools/make_shards.py", str(tmp_path / "dc"), "--out", str(tmp_path / "s"), "--image-size",
                     "64"]).returncode == 0
    save(tmp_path / "inception.pt")
    r = run_tool(["tools/evaluate.py", "--checkpoint", str(bundle), "--shards", str(tmp_path / "s" / "test-*.tar"),
                  "--num", "2", "--unpaired", "2", "--steps", "2", "--inception_weights",
                  str(tmp_path / "inception.pt"), "--json", str(tmp_path / "q.json")])
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["pairs"] == 2  # the two paired test samples; the unpaired ones are not measured
    assert report["fid_kid"].startswith("FID ") and "over 2 paired try-ons" in report["fid_kid"]
    assert Image.open(tmp_path / "unpaired.png").size == (3 * 64, 2 * 64)
