"""A cascade of four UNets is a config change: configs/tiny4.yaml (16 -> 32 -> 64 -> 128 px, three
Parallel-UNets and an Efficient-UNet) trains each UNet, consolidates each into one bundle, and samples the
four in turn, through the same commands as the shipped two- and three-UNet cascades."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import command, make_synthetic_shards, run, run_tool

# Real multi-rank or multi-process runs: the full suite, not the fast tier (-m "not slow").
pytestmark = pytest.mark.slow


def test_four_unets_train_consolidate_and_sample(tmp_path):
    shards = make_synthetic_shards(tmp_path / "shards", samples=40, shard_size=20, image_size=128)
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    for unet in (1, 2, 3, 4):
        r = run(command(run_dir, shards, ranks=1, steps=2, extra=[
            "--config", "configs/tiny4.yaml", "--train_unet", str(unet), "--set", "diffusion.sample_steps=[2,2,2,2]",
            "--set", "sample_freq=2"]))
        assert f"done: unet{unet} at step 2" in r.stdout, r.stdout[-2000:]
        r = run_tool(["tools/consolidate_checkpoint.py", str(run_dir / "ckpt" / f"unet{unet}"), "--out", str(bundle)])
        assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((bundle / "unet4" / "config.json").read_text())
    assert [u["preset"] for u in meta["config"]["unets"]] == ["tiny", "tiny-sr", "tiny-sr", "tiny-sr3"]
    r = run_tool(["tools/infer.py", "--checkpoint", str(bundle), "--shards", str(shards / "val-*.tar"), "--max-samples", "2",
                  "--steps", "2", "--sampler", "ddim", "--output_dir", str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr[-2000:]
    results = sorted((tmp_path / "out").glob("*.png"))
    assert results, r.stdout
    from tryon_ds.inference import TryOnPipeline
    pipe = TryOnPipeline.from_pretrained(bundle)
    assert list(pipe.unets) == [1, 2, 3, 4] and pipe.output_size == (128, 128)
    batch = next(pipe.shard_batches(str(shards / "val-*.tar"), batch_size=1, limit=1))
    stages = pipe.generate(batch, steps=(2,), sampler="ddim")
    assert {n: tuple(v.shape[-2:]) for n, v in stages.items()} == {1: (16, 16), 2: (32, 32), 3: (64, 64),
                                                                    4: (128, 128)}
    assert all(np.isfinite(v.numpy()).all() for v in stages.values())
    assert Image.open(results[0]).size[0] >= 128
