"""ZeRO checkpoint -> bundle -> inference for the three-UNet cascade of configs/tiny.yaml (32 -> 64 -> 128 px,
UNet 3 on 32 px crops), each UNet trained on 2 CPU ranks: consolidation, equality with the engine, the cascade
from the guide's command line and from Python."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, assert_reports_close, command, free_port, make_synthetic_shards, run, run_tool

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from fixed_inputs import fixed_inputs  # noqa: E402
from releases import write_dresscode  # noqa: E402

# Real multi-rank or multi-process runs: the full suite, not the fast tier (-m "not slow").
pytestmark = pytest.mark.slow

UNETS = {1: "cpu_zero2", 2: "cpu_zero3", 3: "cpu_zero2"}  # ZeRO-2 and ZeRO-3 checkpoints, UNet 3 on crops
SIZE = 128  # UNet 3's: the shards are written at the top UNet's size, the lower UNets resize from them


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("shards"), image_size=SIZE)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    for unet, ds in UNETS.items():
        run(command(root, shards, ds=ds, steps=4, extra=["--train_unet", str(unet)], launcher="torchrun"))
    bundle = root / "bundle"
    for unet in UNETS:
        r = run_tool(["tools/consolidate_checkpoint.py", str(root / "ckpt" / f"unet{unet}"), "--out", str(bundle)])
        assert r.returncode == 0, r.stderr
        assert {1: "1,885,187 parameters", 2: "1,675,235 parameters", 3: "3,139,956 parameters"}[unet] in r.stdout
    return root, bundle


@pytest.mark.parametrize("unet", [1, 2, 3])
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
        pose[:, :2] *= SIZE  # normalised -> pixels of the shard images
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], pose)
    return paths


def test_three_stage_inference_from_the_guides_command_line_and_from_python_agree(trained, shards, tmp_path):
    """The guide's one-pair command line runs UNets 1, 2 and 3 (one --steps number each) and is deterministic;
    TryOnPipeline from Python gives the same picture, and every UNet's output at its own size."""
    _, bundle = trained
    pair = _val_pair(shards, tmp_path)
    outputs = []
    for i in range(2):
        out = tmp_path / f"result{i}.png"
        r = run_tool(["tools/infer.py", "--checkpoint", str(bundle), "--config", "configs/tiny.yaml",
                      "--ca_image", str(pair["ca"]), "--garment_image", str(pair["garment"]),
                      "--person_pose", str(pair["person_pose"]), "--garment_pose", str(pair["garment_pose"]),
                      "--output", str(out), "--steps", "3", "2", "2", "--seed", "7", "--sampler", "ddim"])
        assert r.returncode == 0, r.stderr
        outputs.append(np.asarray(Image.open(out)))
    assert outputs[0].shape == (SIZE, SIZE, 3)  # UNet 3's size, square input: no crop
    assert np.array_equal(outputs[0], outputs[1])

    from tryon_ds.data.keypoints import read_keypoints
    from tryon_ds.inference import TryOnPipeline
    pipe = TryOnPipeline.from_pretrained(bundle)
    assert list(pipe.unets) == [1, 2, 3] and pipe.output_size == (SIZE, SIZE)
    ca, garment = Image.open(pair["ca"]), Image.open(pair["garment"])
    poses = [read_keypoints(pair[k], (SIZE, SIZE)).points for k in ("person_pose", "garment_pose")]
    image = pipe(ca, garment, *poses, steps=(3, 2, 2), seed=7, sampler="ddim")
    assert np.array_equal(np.asarray(image), outputs[0])
    conds, _ = pipe.prepare(ca, garment, *poses)
    stages = pipe.generate(conds, steps=(2,), sampler="ddim")
    assert {n: tuple(v.shape[-2:]) for n, v in stages.items()} == {1: (32, 32), 2: (64, 64), 3: (128, 128)}
    r = run_tool(["tools/infer.py", "--checkpoint", str(bundle), "--shards", str(shards / "val-*.tar"),
                  "--max-samples", "1", "--steps", "3", "2", "--output_dir", str(tmp_path / "x")])
    assert r.returncode == 2 and "--steps takes one number, or one per UNet of the bundle (3); got 2" in r.stderr


def test_infer_cli_on_validation_shards_writes_results_and_grid(trained, shards, tmp_path):
    _, bundle = trained
    r = run_tool(["tools/infer.py", "--checkpoint", str(bundle), "--shards", str(shards / "val-*.tar"), "--max-samples", "3",
                  "--batch_size", "2", "--output_dir", str(tmp_path), "--steps", "2", "--no-ema"])
    assert r.returncode == 0, r.stderr
    results = [p for p in tmp_path.glob("*.png") if p.name != "grid.png"]
    assert len(results) == 3 and all(Image.open(p).size == (SIZE, SIZE) for p in results)
    assert Image.open(tmp_path / "grid.png").size == (4 * SIZE, 3 * SIZE)


def test_base_only_bundle_and_bad_bundles_fail_clearly(trained, tmp_path):
    _, bundle = trained
    from tryon_ds.errors import UserError
    from tryon_ds.inference import TryOnPipeline
    base_only = tmp_path / "base_only"
    shutil.copytree(bundle / "unet1", base_only / "unet1")
    pipe = TryOnPipeline.from_pretrained(base_only)
    assert list(pipe.unets) == [1] and pipe.output_size == (32, 32)
    two = tmp_path / "two"  # the guide's cascade: a bundle of UNets 1 and 2 works as before
    for n in (1, 2):
        shutil.copytree(bundle / f"unet{n}", two / f"unet{n}")
    assert TryOnPipeline.from_pretrained(two).output_size == (64, 64)
    mismatched = tmp_path / "mismatched"  # a UNet 3 that super-resolves another size than UNet 2 makes
    shutil.copytree(two, mismatched)
    shutil.copytree(bundle / "unet3", mismatched / "unet3")
    meta = json.loads((mismatched / "unet2" / "config.json").read_text())
    meta["config"]["unets"][1]["image_size"] = [32, 32]
    (mismatched / "unet2" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"unet3 was trained on \[64, 64\] inputs but unet2 makes \[32, 32\] images"):
        TryOnPipeline.from_pretrained(mismatched)

    with pytest.raises(UserError, match="does not exist"):
        TryOnPipeline.from_pretrained(tmp_path / "nowhere")
    other = tmp_path / "other"
    shutil.copytree(bundle / "unet1", other / "unet1")
    meta = json.loads((other / "unet1" / "config.json").read_text())
    meta["config"]["unets"][0]["dim"] = 48  # the weights now belong to another preset than the config
    (other / "unet1" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not match the unet1 of its config"):
        TryOnPipeline.from_pretrained(other)
    (base_only / "unet1" / "ema.safetensors").unlink()
    r = run_tool(["tools/infer.py", "--checkpoint", str(base_only), "--shards", "x", "--max-samples", "1"])
    assert r.returncode == 2 and "ema.safetensors is missing" in r.stderr


@pytest.fixture(scope="module")
def dresscode_test(trained, tmp_path_factory):
    """A DressCode replica's test split (paired and unpaired samples of two categories) as shards."""
    root = tmp_path_factory.mktemp("dc")
    write_dresscode(root / "dc", per_category=1, categories=("upper_body", "lower_body"))
    assert run_tool(["tools/make_shards.py", str(root / "dc"), "--out", str(root / "s"), "--image-size",
                     str(SIZE)]).returncode == 0
    return root / "s" / "test-*.tar"


def _evaluate(bundle, shards, out, ranks=1, extra=(), launcher="deepspeed"):
    what = ["--results", str(bundle)] if "--results" in extra else ["--checkpoint", str(bundle), "--steps", "2",
                                                                     "--sampler", "dpmpp"]
    extra = [e for e in extra if e != "--results"]
    cmd = ["tools/evaluate.py", *what, "--shards", str(shards), "--batch_size", "3", "--eval-size", "64x64",
           "--json", str(out), *extra]
    if ranks > 1 and launcher == "deepspeed":  # the README's commands, as written
        cmd = ["-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(free_port()), *cmd]
    elif ranks > 1:
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port()), *cmd]
    r = run_tool(cmd, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r


def test_evaluate_reports_the_fields_table_per_category_and_skips_what_has_no_weights(trained, dresscode_test, tmp_path):
    """On DressCode's test split: paired SSIM/LPIPS/FID/KID and unpaired FID/KID, at the output size and at
    64x64, per category and over all; FID/KID from a local Inception (a stand-in network: the plumbing),
    LPIPS skipped with the file it needs; our garment-region table beside it."""
    from tiny_inception import save
    _, bundle = trained
    save(tmp_path / "inception.pt")
    weights = ["--inception_weights", str(tmp_path / "inception.pt")]
    cache = tmp_path / "cache"
    weights += ["--reference-cache", str(cache)]
    report, r = _evaluate(bundle, dresscode_test, tmp_path / "q.json", extra=weights)
    field = report["field"]
    assert set(field) == {"all", "lower_body", "upper_body"} and set(field["all"]) == {f"{SIZE}x{SIZE}", "64x64"}
    for size, row in field["all"].items():
        paired, unpaired = row["paired"], row["unpaired"]
        assert paired["n"] == 4 and unpaired["n"] == 4
        assert 0 < paired["ssim"] <= 1 and paired["psnr"] > 0 and paired["lpips"] is None
        assert paired["fid"] is not None and unpaired["kid_x1000"] is not None and unpaired["kid_x1000_std"] >= 0
        # The reference set: each test person once, although each is in a paired and an unpaired sample.
        assert row["reference_n"] == 4 and unpaired["kid_subset_size"] == 4
    assert field["upper_body"]["64x64"]["reference_n"] == 2 and field["upper_body"]["64x64"]["paired"]["n"] == 2
    assert any("LPIPS (alex) skipped: no alexnet-owt-7be5be79.pth given" in note for note in report["skipped"])
    md = (tmp_path / "q.md").read_text()
    assert "| upper_body | 64x64 | 2 | 2 |" in md and "LPIPS (alex) skipped" in md
    assert "KID on subsets smaller than 1000 images" in md and "border of 5 pixels" in md
    assert "computed and kept in" in r.stdout and len(list(cache.glob("reference-*.npz"))) == 2
    # Another subset of the same test set reads the reference set from the cache: the same real side.
    again, r = _evaluate(bundle, dresscode_test, tmp_path / "q2.json", extra=[*weights, "--max-samples", "1"])
    assert f"reference set: 4 test person(s), from {cache}" in r.stdout
    assert again["field"]["all"]["64x64"]["reference_n"] == 4 and again["field"]["all"]["64x64"]["paired"]["n"] == 1
    assert_reports_close(again["field"]["all"]["64x64"]["unpaired"], field["all"]["64x64"]["unpaired"], rel=1e-3,
                         abs_=1e-3)
    assert report["pairs"] == 4 and "margins" in report  # the garment-region table, on the paired samples
    assert Image.open(tmp_path / "q_unpaired.png").size == (3 * SIZE, 4 * SIZE)
    assert not (tmp_path / "q.json.tryons").exists()  # the work folder goes once the report is written



def test_a_killed_evaluation_resumes_from_its_saved_try_ons(trained, dresscode_test, tmp_path):
    """--save-images keeps one PNG per sample, named by its key; a run killed part-way leaves some, and the
    run again with the same arguments reads them instead of sampling them, and reports what an
    uninterrupted run on 2 ranks does (the ranks split the samples and send their measures to rank 0)."""
    import os
    import signal
    import subprocess
    _, bundle = trained
    whole, _ = _evaluate(bundle, dresscode_test, tmp_path / "whole.json", ranks=2,
                         extra=["--save-images", str(tmp_path / "a")])
    saved = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert len(saved) == 8 and all(name.startswith("dc_") for name in saved)
    # That folder measured as another method's results: the run's own numbers, through the same code.
    measured, _ = _evaluate(tmp_path / "a", dresscode_test, tmp_path / "r.json", extra=["--results"])
    assert_reports_close(measured["field"], whole["field"], rel=1e-3, abs_=1e-3)
    assert_reports_close(measured["rows"], whole["rows"], rel=1e-3, abs_=1e-3)
    # Named as LaDI-VTON names its results (PERSON_GARMENT, the release's file names), in sub-folders, one
    # of them missing: the same numbers for the rest, and the missing one named.
    import webdataset as wds
    from tryon_ds.inference import safe_name
    ladi = tmp_path / "ladi"
    tests = list(wds.WebDataset(sorted(str(p) for p in dresscode_test.parent.glob(dresscode_test.name)),
                                shardshuffle=False))
    for sample in tests[1:]:
        meta = json.loads(sample["json"])
        person, garment = (Path(meta["source"][role]).stem for role in ("person", "garment"))
        target = ladi / meta["category"] / f"{person}_{garment}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "a" / f"{safe_name(sample['__key__'])}.png", target)
    theirs, _ = _evaluate(ladi, dresscode_test, tmp_path / "l.json", extra=["--results"])
    assert sum(row["paired"]["n"] + row["unpaired"]["n"] for row in [theirs["field"]["all"]["64x64"]]) == 7
    assert any(f"1 test sample(s) have no result in {ladi}" in note and tests[0]["__key__"] in note
               for note in theirs["skipped"])
    images = tmp_path / "b"
    cmd = [sys.executable, "tools/evaluate.py", "--checkpoint", str(bundle), "--shards", str(dresscode_test),
           "--steps", "2", "--sampler", "dpmpp", "--batch_size", "1", "--eval-size", "64x64", "--json",
           str(tmp_path / "b.json"), "--save-images", str(images)]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(list(images.glob("*.png"))) < 2:
        assert proc.poll() is None, "the evaluation ended before it saved two try-ons"
        time.sleep(0.05)
    # Frozen first, then looked at, then killed: what the killed run left is what the resumed run finds,
    # however far it got meanwhile (the report is written only after the last try-on, so it never is).
    os.killpg(proc.pid, signal.SIGSTOP)
    kept = {p.name: p.stat().st_mtime_ns for p in images.glob("*.png")}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(kept) >= 2 and not (tmp_path / "b.json").exists()
    resumed, _ = _evaluate(bundle, dresscode_test, tmp_path / "b.json", extra=["--save-images", str(images)])
    assert all(images.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    assert len(list(images.glob("*.png"))) == 8
    # Per rank the networks see other batches, whose float sums (convolutions, the Inception) differ in the
    # last bits: a try-on pixel may round the other way.
    assert_reports_close(resumed["field"], whole["field"], rel=1e-3, abs_=1e-3)
    assert_reports_close(resumed["rows"], whole["rows"], rel=1e-3, abs_=1e-3)


def test_torchrun_passes_the_flags_a_user_adds_to_an_evaluation_on_2_ranks(trained, dresscode_test, tmp_path):
    """The README's torchrun command with the subset flags (``--num`` was taken by torchrun as a prefix of its
    own ``--numa-binding``): both ranks measure, the report counts what was asked."""
    _, bundle = trained
    report, _ = _evaluate(bundle, dresscode_test, tmp_path / "t.json", ranks=2, launcher="torchrun",
                          extra=["--max-samples", "3", "--max-unpaired", "1", "--lpips-net", "squeeze"])
    row = report["field"]["all"]["64x64"]
    assert (row["paired"]["n"], row["unpaired"]["n"]) == (3, 1) and report["lpips_net"] == "squeeze"
    assert any("LPIPS (squeeze) skipped: no squeezenet1_1-b8a52dc0.pth" in note for note in report["skipped"])


def test_the_python_api_reads_pictures_and_poses_as_make_shards_does(trained, shards, tmp_path):
    """TryOnPipeline takes images as PIL, (H, W, 3) uint8 arrays or paths, and poses as files or in memory
    (arrays, nested lists, OpenPose's flat list, BODY_25), through make_shards' own readers: the same pair
    in any of these forms gives the same picture; a NaN on a detected joint and a pose of another shape are
    errors naming the argument; a joint far outside the image is dropped as make_shards drops it; an RGBA
    image is composited on white."""
    from tryon_ds.data.keypoints import BODY25_TO_COCO18
    from tryon_ds.errors import UserError
    from tryon_ds.inference import TryOnPipeline
    _, bundle = trained
    pipe = TryOnPipeline.from_pretrained(bundle)
    pair = _val_pair(shards, tmp_path)
    ca, garment = Image.open(pair["ca"]).convert("RGB"), Image.open(pair["garment"]).convert("RGB")
    coco = np.load(pair["person_pose"])
    body25 = np.zeros((25, 3), np.float32)
    body25[list(BODY25_TO_COCO18)] = coco
    options = dict(steps=(1,), sampler="ddim", seed=3)

    def run(*args):
        return np.asarray(pipe(*args, **options))

    reference = run(str(pair["ca"]), str(pair["garment"]), str(pair["person_pose"]))
    for form in (coco, coco.tolist(), body25, body25.flatten().tolist(), {"people": [{"pose_keypoints_2d":
                                                                                      body25.flatten().tolist()}]}):
        assert np.array_equal(run(ca, np.asarray(garment), form), reference)
    xy = coco[:, :2] * (coco[:, 2:] > 0)  # (18, 2): (0, 0) marks a joint not detected
    assert np.array_equal(run(ca, garment, xy), reference)

    bad = coco.copy()
    bad[np.flatnonzero(coco[:, 2] > 0)[0], 0] = np.nan
    with pytest.raises(UserError, match="person_pose: pose has NaN or infinite values"):
        pipe(ca, garment, bad, **options)
    with pytest.raises(UserError, match=r"garment_pose: pose of shape \(5, 3\), expected \(18, 2\), \(18, 3\)"):
        pipe(ca, garment, coco, np.zeros((5, 3)), **options)
    far, invalid = coco.copy(), coco.copy()
    joint = np.flatnonzero(coco[:, 2] > 0)[-1]
    far[joint, :2] = (ca.width * 3, ca.height * 3)
    invalid[joint] = 0
    assert np.array_equal(run(ca, garment, far), run(ca, garment, invalid))

    top = ca.crop((0, 0, ca.width, ca.height // 2))
    clear, on_white = Image.new("RGBA", ca.size, (0, 0, 0, 0)), Image.new("RGB", ca.size, (255, 255, 255))
    clear.paste(top.convert("RGBA"), (0, 0))  # the lower half transparent (black underneath)
    on_white.paste(top, (0, 0))
    assert np.array_equal(run(clear, garment, coco), run(on_white, garment, coco))
