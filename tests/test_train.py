"""The DeepSpeed trainer: real engines on 2 CPU ranks (gloo), the tiny preset, synthetic shards."""
import json
import os
import re
import shutil
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, STEPS, command, losses, run, wait_for

# Real multi-rank or multi-process runs: the full suite, not the fast tier (-m "not slow").
pytestmark = pytest.mark.slow


def val_losses(stdout):
    return [float(line.rsplit(" ", 1)[1]) for line in stdout.splitlines() if "validation loss" in line]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """One process, no ZeRO, 2 accumulation steps: the same global batches as 2 ranks x 1."""
    run_dir = tmp_path_factory.mktemp("single")
    r = run(command(run_dir, shards, ranks=1, ds="cpu_zero0", extra=["--set", "gradient_accumulation_steps=2"]))
    return run_dir, r


@pytest.fixture(scope="module")
def zero_runs(shards, tmp_path_factory):
    runs = {}
    for ds in ("cpu_zero2", "cpu_zero3"):
        run_dir = tmp_path_factory.mktemp(ds)
        runs[ds] = (run_dir, run(command(run_dir, shards, ds=ds, launcher="torchrun")))
    return runs


@pytest.mark.parametrize("ds", ["cpu_zero2", "cpu_zero3"])
def test_zero_matches_single_process_and_validation_loss_falls(zero_runs, reference, ds):
    run_dir, result = zero_runs[ds]
    ref = losses(reference[0])
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, 6):
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), step
    val = val_losses(result.stdout)
    # Below the untrained model's loss (step 1's); between validations 10 steps apart the change is within
    # the noise of 16 validation samples at random timesteps.
    assert len(val) == 3 and max(val) < got[1], (val, got[1])
    # Every logged scalar reaches metrics_unet1.jsonl, validation's too, by TensorBoard's names.
    entries = [json.loads(line) for line in (run_dir / "out" / "metrics_unet1.jsonl").read_text().splitlines()]
    logged = {e["step"]: e["val/loss"] for e in entries if "val/loss" in e}
    assert sorted(logged) == [10, 20, 30] and [round(v, 4) for v in logged.values()] == val
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "memory/peak_gib"} <= set(entries[0])
    # How close to the machine's limit: at every log step, from the step's FLOPs and this CPU's measured peak.
    steps = [e for e in entries if "train/loss" in e]
    assert len(steps) == STEPS and all(e["perf/tflops"] > 0 and e["perf/mfu"] > 0 for e in steps)
    assert re.search(r"GFLOP per training sample; peak per rank \S+ TFLOP/s \(measured fp32 matmul\)", result.stdout)
    assert 0.1 < entries[0]["memory/peak_gib"] < 8  # a tiny UNet's CPU rank: its libraries and a little more
    assert (run_dir / "ckpt" / "unet1" / f"step{STEPS:08d}" / "COMPLETE").is_file()
    assert "2 rank(s) x micro-batch 4" in result.stdout
    assert "unet1: 1.89M parameters" in result.stdout  # the whole model's, also once ZeRO-3 has partitioned it


def test_ema_under_zero3_equals_single_rank_ema(zero_runs, reference):
    """The EMA kept partitioned on 2 ZeRO-3 ranks equals the single process's. The two runs' own weights
    differ a little after 30 steps at lr 2e-3 (another summation order over ranks, up to ~7e-5 here); the
    EMA, an average of those weights, must agree at least as closely as they do."""
    step = f"step{STEPS:08d}"
    ema3 = load_file(str(zero_runs["cpu_zero3"][0] / "ckpt" / "unet1" / step / "ema.safetensors"))
    ref = load_file(str(reference[0] / "ckpt" / "unet1" / step / "ema.safetensors"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    weights3 = get_fp32_state_dict_from_zero_checkpoint(str(zero_runs["cpu_zero3"][0] / "ckpt" / "unet1"), tag=step)
    # The ZeRO-0 reference keeps its weights in DeepSpeed's own (pickled) module file; this test's data.
    weights = torch.load(reference[0] / "ckpt" / "unet1" / step / "mp_rank_00_model_states.pt",
                         weights_only=False)["module"]
    assert ema3.keys() == ref.keys()
    for name, tensor in ref.items():
        assert ema3[name].shape == tensor.shape
        apart = (weights3[name] - weights[name]).abs().max().item()
        torch.testing.assert_close(ema3[name], tensor, rtol=1e-4, atol=max(1e-5, apart), msg=name)


def test_kill_then_resume_auto_reproduces_losses_and_resumes_at_another_world_size(zero_runs, shards, tmp_path):
    """SIGKILL a ZeRO-3 run after its step-10 checkpoint; --resume auto must give the uninterrupted losses
    (fp32: 1e-6) for the next 20 steps. Then resume the same checkpoint on 1 rank (universal checkpoint)."""
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed, shards, ds="cpu_zero3", steps=STEPS), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(killed / "ckpt" / "unet1" / "step00000010" / "COMPLETE", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    snapshot = tmp_path / "step10"
    shutil.copytree(killed / "ckpt" / "unet1" / "step00000010", snapshot)

    resumed = run(command(killed, shards, ds="cpu_zero3", extra=["--resume", "auto"], launcher="torchrun"))
    assert "resumed from" in resumed.stdout
    uninterrupted = losses(zero_runs["cpu_zero3"][0])
    got = losses(killed)
    resumed_at = int(re.search(r"resumed from \S*step(\d{8}) \(loaded in \d+\.\d s\)", resumed.stdout).group(1))
    assert resumed_at >= 10 and STEPS - resumed_at >= 10
    assert re.search(rf"step {STEPS}: checkpoint \S*step{STEPS:08d} \(\d+\.\d s\)", resumed.stdout)
    for step in range(resumed_at + 1, STEPS + 1):
        assert abs(got[step] - uninterrupted[step]) <= 1e-6, (step, got[step], uninterrupted[step])

    # 2 ranks -> 1 rank with 2 accumulation steps: same global batches, DeepSpeed's universal checkpoint.
    one = tmp_path / "one"
    (one / "ckpt" / "unet1").mkdir(parents=True)
    shutil.copytree(snapshot, one / "ckpt" / "unet1" / "step00000010")
    r = run(command(one, shards, ranks=1, ds="cpu_zero3", extra=["--resume", "auto",
                                                                 "--set", "gradient_accumulation_steps=2"]))
    assert "(universal)" in r.stdout
    got = losses(one)
    for step in range(11, STEPS + 1):
        assert got[step] == pytest.approx(uninterrupted[step], rel=1e-4, abs=1e-5), step


def test_sr_stage_trains_on_ground_truth_lowres(shards, tmp_path):
    r = run(command(tmp_path, shards, steps=3, extra=["--train_unet", "2", "--set", "sample_freq=3"], launcher="torchrun"))
    assert (tmp_path / "ckpt" / "unet2" / "step00000003" / "COMPLETE").is_file()
    from PIL import Image
    grid = Image.open(next((tmp_path / "out" / "samples").glob("unet2_*.png")))
    assert grid.size == (4 * 64, 4 * 64)  # ca | garment | sample | target, sample_count rows of 64 px
    assert all(v == v for v in losses(tmp_path, unet=2).values())
    assert "ZeRO-2" in r.stdout


def test_batch_contradiction_and_missing_data_are_clear_errors(shards, tmp_path):
    ds = tmp_path / "ds.json"
    config = json.loads((ROOT / "ds_configs" / "cpu_zero2.json").read_text())
    config["train_batch_size"] = 999
    ds.write_text(json.dumps(config))
    cmd = command(tmp_path, shards, ranks=1)
    cmd[cmd.index("--deepspeed_config") + 1] = str(ds)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{ds} sets train_batch_size=999 but batch_size 4 x gradient_accumulation_steps 1 x world size 1 = 4" \
        in r.stderr

    r = subprocess.run(command(tmp_path, tmp_path / "no-such-shards", ranks=1), cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no-such-shards' holds no train shards (train-*.tar)" in r.stderr
