"""ZeRO-3's parameters gathered outside a training step (a preview's, a checkpoint's) after forwards no backward
followed (validation), over the knobs real DeepSpeed configs set: issue #43, where a real-size run with
``stage3_param_persistence_threshold: 0`` and no EMA died at its first preview after a validation, and lost that
step's checkpoint. The tests' tiny model meets it once the prefetch bucket and live-parameter limits are small
against the model, as a real-size run's are against base."""
import itertools
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import ROOT, command, free_port, run

pytestmark = pytest.mark.slow

SMALL = {"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 20_000,
         "stage3_max_live_parameters": 100_000, "stage3_max_reuse_distance": 100_000, "sub_group_size": 100_000,
         "reduce_bucket_size": 20_000}


# The knobs that decide what ZeRO-3 prefetches and keeps gathered, each set small or left at DeepSpeed's
# default (the live-parameter limit and the reuse distance move together, as configs set them).
PREFETCH = [("stage3_param_persistence_threshold",), ("stage3_prefetch_bucket_size",),
            ("stage3_max_live_parameters", "stage3_max_reuse_distance")]


def every_setting():
    """Every combination of the prefetch knobs at DeepSpeed's default or small against the tiny UNet (1.9M
    parameters), exhaustive where a sample could miss the one that fails; then the optimizer's sub-groups and
    the reduce bucket small, alone and with everything else small (they split the step, not the gathers, and
    cost the most time here)."""
    prefetch = [{k: SMALL[k] for group, small in zip(PREFETCH, pick) if small for k in group}
                for pick in itertools.product((False, True), repeat=len(PREFETCH))]
    return prefetch + [{"sub_group_size": SMALL["sub_group_size"], "reduce_bucket_size": SMALL["reduce_bucket_size"]},
                       SMALL]


@pytest.mark.parametrize("unet", [1, 3])
def test_gathers_after_validation_forwards_hold_the_weights_for_every_zero3_setting(tmp_path, unet):
    """A real engine per setting on 2 ranks: a step, validation forwards, a preview's bucketed gather and the
    EMA's gather, a step. Every setting gathers the same weights, equal to the EMA (decay 0: the optimizer's
    weights), and trains on to the same loss (the knobs move memory, never the arithmetic)."""
    settings = every_setting() if unet == 1 else [{}, SMALL]
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                        str(free_port()), "tests/helpers/zero3_gather_probe.py", "--settings", json.dumps(settings),
                        "--unet", str(unet), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert len(report) == len(settings) == (10 if unet == 1 else 2)
    failed = [(e["setting"], e["error"]) for e in report if "error" in e]
    assert not failed, failed
    assert all(e["equals_ema"] for e in report)
    assert len({e["weights"] for e in report}) == 1
    assert len({tuple(e["losses"]) for e in report}) == 1


def first_samples(shard: Path, n: int, out: Path) -> Path:
    """A shard of the first ``n`` samples of ``shard``, member for member."""
    with tarfile.open(shard) as src, tarfile.open(out, "w") as dst:
        keys: list[str] = []
        for member in src.getmembers():
            key = member.name.split(".", 1)[0]
            if key not in keys:
                keys.append(key)
            if len(keys) > n:
                break
            dst.addfile(member, src.extractfile(member))
    return out


@pytest.mark.parametrize("ema", [False, True])
def test_a_step_that_validates_previews_and_saves_under_zero3_runs_through(shards, tmp_path, ema):
    """The reproduction of #43 on the tiny UNet: ZeRO-3 with the small knobs, validation, a preview and a
    checkpoint due at step 2 and again at the last step, 3. The run ends 0 with both checkpoints and both
    previews, and each step's checkpoint was written before its validation and preview. Without the EMA the
    validation set is one sample: rank 1 holds none, and runs a stand-in batch for each of rank 0's forwards."""
    ds = tmp_path / "zero3_small.json"
    config = json.loads((ROOT / "ds_configs" / "cpu_zero3.json").read_text())
    config["zero_optimization"].update(SMALL)
    ds.write_text(json.dumps(config))
    val = [] if ema else ["--set", f"data.val_shards=[{first_samples(next(shards.glob('val-*.tar')), 1, tmp_path / 'one.tar')}]"]
    cmd = command(tmp_path, shards, ds="cpu_zero3", steps=3,
                  extra=["--set", "validation_freq=2", "--set", "sample_freq=2", "--set", "checkpoint_freq=2",
                         "--set", f"use_ema={str(ema).lower()}", *val], launcher="torchrun")
    cmd[cmd.index("--deepspeed_config") + 1] = str(ds)
    result = run(cmd)
    for step in (2, 3):
        assert (tmp_path / "ckpt" / "unet1" / f"step{step:08d}" / "COMPLETE").is_file()
        assert (tmp_path / "out" / "samples" / f"unet1_step{step:08d}.png").is_file()
        actions = re.findall(rf"^step {step}: (checkpoint|validation|samples)", result.stdout, re.M)
        assert actions == ["checkpoint", "validation", "samples"], (step, result.stdout[-2000:])
    assert ("EMA sample" in result.stdout) == ema
    assert len(re.findall(r"^step \d: validation loss \d+\.\d{4}$", result.stdout, re.M)) == 2
