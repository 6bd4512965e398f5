"""What the trainer reads from DeepSpeed's engines, on real engines of every ZeRO stage and precision the CPU
runs (tests/helpers/engine_probe.py, 2 ranks): the loss scale, its exhaustion, fp32 reduction in the bf16
configs, the EMA of the fp32 master weights, and the memory planner against the bytes the engines hold."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, free_port, run_tool
from tryon_ds.cascade import CascadeUNet
from tryon_ds.config import build_config, read_config_file
from tryon_ds.errors import ConfigError
from tryon_ds.model import parameter_count
from tryon_ds.training.ds_config import build_ds_config


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "probe.json"
    r = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                        str(free_port()), "tests/helpers/engine_probe.py", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def engines(probe):
    return {k: v for k, v in probe.items() if k != "exhaustion"}


@pytest.mark.slow
def test_loss_scale_is_read_from_every_optimizer_deepspeed_returns(probe):
    """ZeRO-0's wrappers keep it in loss_scale_config, the ZeRO-1/2/3 optimizers as cur_scale: one helper
    reads both (the old direct read crashed the first fp16 log step under ZeRO-2/3)."""
    kinds = {v["optimizer"]: v["loss_scale"] for v in engines(probe).values()}
    assert set(kinds) == {"AdamW", "FP16_UnfusedOptimizer", "DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3"}
    assert kinds["AdamW"] is None  # plain fp32 ZeRO-0: no loss scaler at all
    assert all(kinds[k] == 1.0 for k in kinds if k != "AdamW")


@pytest.mark.slow
def test_loss_scale_exhaustion_becomes_the_trainers_stop(probe):
    """DeepSpeed's own dynamic fp16 scaler, run down from 4 to its minimum 1 by overflowing steps in a real
    ZeRO-2 engine: its bare Exception becomes LossScaleExhausted, which train.py turns into save + stop."""
    ex = probe["exhaustion"]
    assert ex["scales"] == [2.0, 1.0] and ex["final_scale"] == 1.0
    assert ex["outcome"].startswith("LossScaleExhausted at step 2")
    source = (ROOT / "tryon_ds" / "train.py").read_text()
    assert "except ds_engine.LossScaleExhausted:" in source and "save(run, step)" in source


@pytest.mark.slow
def test_bf16_configs_reduce_and_accumulate_gradients_in_fp32_and_skip_non_finite_steps(probe):
    for name in ("zero2_bf16", "zero3_bf16"):
        v = probe[f"{name}/bf16"]
        assert v["grad_accum_dtype"] == "torch.float32" and v["communication_data_type"] == "torch.float32", name
    for name in ("zero2_bf16", "zero3_bf16", "zero3_bf16_offload"):
        ds = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
        assert ds["bf16"]["check_grad_overflow"] is True and ds["communication_data_type"] == "fp32"
        assert ds["data_types"]["grad_accum_dtype"] == "fp32"


def test_a_bf16_config_without_overflow_checks_is_refused(tmp_path):
    config = build_config({**read_config_file(ROOT / "configs" / "tiny.yaml"), "mixed_precision": "bf16"})
    ds = json.loads((ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    ds["bf16"]["check_grad_overflow"] = False
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="bf16.check_grad_overflow=False"):
        build_ds_config(path, config, 2)
    del ds["bf16"]["check_grad_overflow"]  # absent: set on, whatever DeepSpeed's default of the day
    path.write_text(json.dumps(ds))
    assert build_ds_config(path, config, 2)["bf16"]["check_grad_overflow"] is True


@pytest.mark.slow
def test_ema_averages_the_fp32_master_weights_partitioned_like_them(probe):
    """With decay 0 the EMA equals what it averages. Rounded to bf16 it is the module's bf16 weight, yet it
    holds more than bf16 can: it reads the fp32 master copy, not the module. Each rank holds as much EMA as
    master (half of it at 2 ranks under ZeRO-1/2/3)."""
    for name, v in engines(probe).items():
        assert v["ema_dtypes"] == ["torch.float32"] and v["ema_names_match"], name
        assert v["ema_rounds_to_module"], name
        assert v["ema_finer_than_module"] == (v["precision"] == "bf16"), name
        assert v["streamed_equal"] and v["streamed_buckets"] > 1, name  # handed to a preview bucket by bucket
        states = v["states"]
        held = states["master"] if states["master"] else states["params"]  # fp32 ZeRO-0: the weights are the master
        assert states["ema"] == held, name


@pytest.mark.slow
def test_memory_planner_model_states_match_the_engines(probe):
    """tools/plan_memory.py's model-state lines against the bytes each rank of a real engine holds between
    backward and step (tools/bench/train.py's count): within 5% for every ZeRO stage and precision."""
    pairs = {"params": "parameters", "grads": "gradients", "master": "fp32 master",
             "moments": "optimizer (Adam moments)", "ema": "EMA (fp32, like the master)"}
    for name, v in engines(probe).items():
        for measured, planned in pairs.items():
            got, want = v["states"][measured], v["planned"][planned]
            assert abs(got - want) <= 0.05 * max(want, 1), (name, measured, got, want)


def test_plan_memory_cli_says_whether_it_fits_and_what_to_change():
    ok = run_tool(["tools/plan_memory.py", "--preset", "base", "--micro-batch", "16", "--zero", "2", "--precision",
                   "bf16", "--gpus", "16"])
    assert ok.returncode == 0, ok.stderr
    for line in ("parameters", "gradients", "fp32 master", "optimizer (Adam moments)", "EMA", "activations",
                 "DeepSpeed buffers", "total", "fits in 80 GB"):
        assert line in ok.stdout, line
    tight = run_tool(["tools/plan_memory.py", "--preset", "sr", "--micro-batch", "32", "--zero", "2", "--precision",
                      "bf16", "--gpus", "8", "--gpu-memory", "24"])
    assert tight.returncode == 0, tight.stderr
    assert "does NOT fit in 24 GB" in tight.stdout and "activation checkpointing" in tight.stdout
    assert "ZeRO-3" in tight.stdout and "micro-batch" in tight.stdout.split("what would fit instead:")[1]
    # a preset's overrides go over the preset: 2x2-patch attention at its 32 px level plans fewer activations
    base = ["tools/plan_memory.py", "--preset", "tiny", "--micro-batch", "16"]
    paper, patched = run_tool(base), run_tool(base + ["--set", "unets.0.attn_patch=2"])
    assert paper.returncode == patched.returncode == 0, patched.stderr
    activations = [float(re.search(r"activations\s+([\d.]+) GiB", r.stdout).group(1)) for r in (paper, patched)]
    assert activations[1] < activations[0], activations


def test_the_planner_counts_what_rank_0_builds_between_steps():
    """A preview model in the run's dtype where the run previews; on a CPU rank, the whole fp32 EMA gathered
    for a checkpoint where that is more (on a GPU node it is host memory)."""
    from tryon_ds.planner import PREVIEW, plan
    config = build_config({"base_image_size": [128, 128], "unet1": {"preset": "tiny"}})
    quiet = dataclasses.replace(config, sample_freq=0)
    n = parameter_count(CascadeUNet(config, 1))

    def between(cfg, cpu=False):
        return plan(cfg, 1, 1, 3, "bf16", 2, False, {}, activation_bytes=0.0, cpu=cpu)[PREVIEW]

    assert between(config) == 2 * n and between(quiet) == 0.0
    assert between(config, cpu=True) == between(quiet, cpu=True) == 4 * n
    assert between(dataclasses.replace(quiet, use_ema=False), cpu=True) == 0.0


def test_the_planner_counts_an_ema_only_when_the_run_keeps_one():
    from tryon_ds.planner import GIB, plan
    config = build_config({"base_image_size": [128, 128], "unet1": {"preset": "tiny"}})
    ds = {"zero_optimization": {"stage": 3}}
    kept = plan(config, 1, 1, 3, "fp32", 2, False, ds, activation_bytes=0.0)
    dropped = plan(dataclasses.replace(config, use_ema=False), 1, 1, 3, "fp32", 2, False, ds, activation_bytes=0.0)
    ema = "EMA (fp32, like the master)"
    assert kept[ema] == kept["fp32 master"] > 0 and dropped[ema] == 0.0
    assert sum(kept.values()) - sum(dropped.values()) == kept[ema] and kept[ema] < GIB


def test_the_optimizer_steps_temporaries_follow_the_optimizer_and_never_add_to_the_activations():
    """ZeRO's fp32 gradient copy, and torch's single-tensor AdamW's two temporaries where it is not fused (the
    CPU configs): three partition-sized copies measured on real ZeRO-2 and ZeRO-3 engines (BENCHMARKS.md)."""
    from tryon_ds.planner import PREVIEW, STEP, peak, step_transient
    n = 10 ** 6
    configs = {name: json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
               for name in ("cpu_zero3", "zero3_bf16", "zero3_bf16_offload", "cpu_zero0")}
    assert step_transient(n, 3, 2, configs["cpu_zero3"]) == 3 * 4 * n / 2
    assert step_transient(n, 3, 2, configs["zero3_bf16"]) == 4 * n / 2  # fused AdamW: the gradient copy only
    assert step_transient(n, 3, 2, configs["zero3_bf16_offload"]) == 0.0  # the step runs on the host
    assert step_transient(n, 0, 2, configs["cpu_zero0"]) == 2 * 4 * n
    # ZeRO-3 steps one sub-group at a time (5e4 elements here: a tenth of this rank's partition)
    grouped = {**configs["cpu_zero3"], "zero_optimization": {"stage": 3, "sub_group_size": 5e4}}
    assert step_transient(n, 3, 2, grouped) == 3 * 4 * 5e4
    assert step_transient(n, 2, 2, {**grouped, "zero_optimization": {"stage": 2, "sub_group_size": 5e4}}) == 3 * 4 * n / 2
    rows = {"parameters": 5.0, "activations": 3.0, STEP: 2.0}
    assert peak(rows) == 8.0 and peak({**rows, STEP: 4.0}) == 9.0
    assert peak(rows, cpu=True) == 10.0  # a CPU rank's heap keeps the activations' blocks through the step
    previewed = {**rows, PREVIEW: 6.0}  # rank 0's preview model, between steps
    assert peak(previewed) == 11.0 and peak(previewed, cpu=True) == 14.0


def test_an_offloaded_optimizer_is_planned_in_host_memory_and_counted_on_a_cpu_rank():
    """DeepSpeed's CPU Adam keeps the fp32 master, the moments and an fp32 gradient partition on the host
    (stage 3's sub-group gradient buffers), and steps in place; on a CPU rank those bytes are the rank's own."""
    from tryon_ds.planner import STEP, plan, plan_host
    config = build_config({"base_image_size": [64, 64], "unet1": {"preset": "tiny"}, "use_ema": False})
    offload = json.loads((ROOT / "ds_configs" / "zero3_bf16_offload.json").read_text())
    n = 4 * parameter_count(CascadeUNet(config, 1)) / 2  # fp32 bytes of one rank's half
    host = plan_host(config, 1, 3, 2, offload)
    assert host == {"fp32 master (host)": n, "optimizer (Adam moments, host)": 2 * n, "fp32 gradients (host)": n,
                    STEP + " (host)": 0.0}
    gpu = plan(config, 1, 1, 3, "bf16", 2, False, offload, activation_bytes=0.0)
    assert gpu["fp32 master"] == gpu["optimizer (Adam moments)"] == gpu[STEP] == 0.0
    cpu = plan(config, 1, 1, 3, "bf16", 2, False, offload, activation_bytes=0.0, cpu=True)
    assert sum(cpu.values()) == sum(gpu.values()) + sum(host.values())
    torch_adam = {**offload, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
    assert plan_host(config, 1, 3, 2, torch_adam)[STEP + " (host)"] == 2 * n  # torch's AdamW on the host
    assert plan(config, 1, 1, 3, "bf16", 2, False, torch_adam, activation_bytes=0.0, cpu=True)[STEP] == 2 * n
    assert plan_host(config, 1, 3, 2, json.loads((ROOT / "ds_configs" / "zero3_bf16.json").read_text())) == {}


def test_plan_memory_cli_on_cpu_ranks_counts_the_offload_and_offers_sub_groups():
    cpu = run_tool(["tools/plan_memory.py", "--preset", "base", "--micro-batch", "1", "--zero", "3", "--precision",
                    "fp32", "--gpus", "1", "--cpu", "--gpu-memory", "25"])
    assert cpu.returncode == 0, cpu.stderr
    assert "1 CPU rank(s)" in cpu.stdout and "does NOT fit in 25 GB per rank" in cpu.stdout
    options = cpu.stdout.split("what would fit instead:")[1]
    assert '"sub_group_size": 1e8' in options and '"fused": true' in options and "host memory" not in options
    gpu = run_tool(["tools/plan_memory.py", "--preset", "sr", "--micro-batch", "8", "--zero", "3", "--precision",
                    "bf16", "--gpus", "1", "--gpu-memory", "20"])
    assert gpu.returncode == 0, gpu.stderr
    assert re.search(r"optimizer offload to CPU \(\S+, \+ [\d.]+ GiB of host memory per rank\)", gpu.stdout)


def test_checkpointing_shrinks_planned_activations():
    from tryon_ds.planner import activations
    config = build_config({"base_image_size": [128, 128], "unet1": {"preset": "base"}})
    plain, ckpt = (activations(config, 1, 4, "bf16", c) for c in (False, True))
    assert 0 < ckpt < plain / 3


def test_diffusion_tables_follow_the_batch_device():
    """The schedule is indexed on the batch's own device (a host round trip each micro-batch cost a sync):
    on the meta device, where nothing can reach the host, the whole training loss still runs."""
    from tryon_ds.cascade import CascadeUNet
    from tryon_ds.cascade import random_batch
    config = build_config(read_config_file(ROOT / "configs" / "tiny.yaml"))
    with torch.device("meta"):
        model = CascadeUNet(config, 2)
    loss = model({k: v.to("meta") for k, v in random_batch(config, 2, 2).items()})
    assert loss.device.type == "meta" and loss.shape == ()


@pytest.mark.slow
@pytest.mark.network  # the wheels a GPU node lacks come from the package index
def test_gpu_check_dry_run_sets_up_and_runs_its_plumbing(tmp_path):
    """tools/gpu_check.sh --dry-run on CPU: the wheels a GPU node lacks are fetched (from the package
    registry) and fit Python 3.12; the matrix (a compiled UNet under ZeRO-3 among it), the trainer and the
    real-size check run at the tiny size; the JSON and the table are written."""
    env = {**os.environ, "WHEELS_DIR": str(tmp_path / "whl"), "RESULTS": str(tmp_path / "results"),
           "PYTHON": sys.executable}
    fetch = subprocess.run(["tools/gpu_check.sh", "--fetch-wheels"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert fetch.returncode == 0, fetch.stderr[-2000:]
    assert any(p.name.startswith("deepspeed-") for p in (tmp_path / "whl").iterdir())
    r = subprocess.run(["tools/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "results" / "gpu_check.json").read_text())
    ran = [row for row in report["matrix"] if "step_s" in row]
    assert {(row["unet"], row["zero"]) for row in ran} == {(1, 2), (2, 3), (3, 2)}
    assert all(row["losses_finite"] for row in ran)
    assert any(row.get("channels_last") for row in ran)
    assert [(row["unet"], row["zero"]) for row in ran if row.get("compile")] == [(2, 3)]
    assert report["trainer"]["cpu_zero3"]["done"]
    table = (tmp_path / "results" / "gpu_check.txt").read_text()
    assert "planned" in table
    # a step of each preset first (tools/bench/step.py), where its time goes
    step = json.loads((tmp_path / "results" / "step.json").read_text())
    assert [(r["preset"], r["channels_last"]) for r in step["results"]] == [("tiny-sr3", False), ("tiny-sr3", True)]
    assert all(r["loss_finite"] and r["tflops"] > 0 and abs(sum(r["by_kind"].values()) - 1) < 1e-6
               for r in step["results"])
    assert "TFLOP/s" in table and "convolution" in table
    # the real-size check's plumbing, at the tiny size: trained, resumed, consolidated, sampled
    assert re.search(r"tiny as UNet 1 .*\n.*planned per rank.*\n.*rank 0: private memory .*x the plan", table)
    assert "bundle load + 1 sampling step" in table
