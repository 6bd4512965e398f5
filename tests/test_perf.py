"""tryon_ds/perf.py: a step's FLOPs counted on the meta device are those of the real step, and the peaks a run's
MFU is taken against."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT, run_tool
from tryon_ds.cascade import CascadeUNet, random_batch
from tryon_ds.config import build_config, read_config_file
from tryon_ds.perf import Throughput, datasheet_peak, device_peak, measured_matmul_peak, step_flops


@pytest.mark.parametrize("unet", [1, 2, 3])
def test_the_meta_count_is_the_real_steps_and_grows_with_the_batch(unet):
    """Counted without memory or compute, every op's FLOPs are those a real forward and backward on the CPU
    counts, and a batch of 3 costs 3 samples. The meta count also has attention, which the counter cannot see
    on a CPU (its CPU kernel has no FLOP formula; the GPU kernels and the meta one have)."""
    config = build_config(read_config_file(ROOT / "configs" / "tiny.yaml"))
    torch.manual_seed(0)
    model = CascadeUNet(config, unet)
    counted = []
    for batch_size in (1, 3):
        with FlopCounterMode(display=False) as counter:
            model(random_batch(config, unet, batch_size)).backward()
        counted.append({str(op): n for op, n in counter.get_flop_counts()["Global"].items()})
    # A few matmuls do not scale with the batch (embeddings of what every sample shares): within 0.1%.
    assert counted[1].keys() == counted[0].keys()
    assert all(abs(counted[1][op] - 3 * n) <= 1e-3 * counted[1][op] for op, n in counted[0].items())
    with torch.device("meta"):
        meta_model = CascadeUNet(config, unet)
    with FlopCounterMode(display=False) as counter:
        meta_model({k: v.to("meta") for k, v in random_batch(config, unet, 1).items()}).backward()
    meta = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = {op: n for op, n in meta.items() if "scaled_dot_product" in op}
    assert {op: n for op, n in meta.items() if op not in attention} == counted[0]
    assert bool(attention) == any(getattr(config.unet(unet), "attn_levels", ()))  # the Efficient-UNet has none
    assert step_flops(config, unet) == sum(meta.values())


def test_datasheet_peaks_by_device_name_and_precision():
    assert datasheet_peak("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert datasheet_peak("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)  # not the SXM part's
    assert datasheet_peak("NVIDIA H200", "fp16") == datasheet_peak("NVIDIA H200", "bf16")
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", "tf32") == pytest.approx(156e12)
    assert datasheet_peak("NVIDIA A10", "bf16") == pytest.approx(125e12)  # not an A100
    assert datasheet_peak("NVIDIA L40S", "bf16") == pytest.approx(362.1e12)
    assert datasheet_peak("Tesla V100-SXM2-32GB", "tf32") is None  # Volta has no TF32
    assert datasheet_peak("Some Future GPU", "bf16") is None


def test_a_cpu_peak_is_measured_and_an_override_wins():
    measured = measured_matmul_peak(0.1, 256)
    assert 1e8 < measured < 1e14
    assert device_peak(torch.device("cpu"), "fp32", 2.5) == (2.5e12, "given")
    peak, source = device_peak(torch.device("cpu"), "fp32")
    assert peak > 0 and source == "measured fp32 matmul"


def test_samples_per_second_become_tflops_per_rank_and_mfu():
    figures = Throughput(flops_per_sample=2e12, ranks=4, peak=100e12).figures(samples_per_s=20.0)
    assert figures == {"perf/tflops": pytest.approx(10.0), "perf/mfu": pytest.approx(0.1)}
    assert Throughput(2e12, 4, None).figures(20.0) == {"perf/tflops": pytest.approx(10.0)}  # no peak, no MFU


def test_model_info_prints_the_flops_of_a_sample():
    config = build_config(read_config_file(ROOT / "configs" / "tiny.yaml"))
    r = run_tool(["tools/model_info.py", "--config", "configs/tiny.yaml", "--unet", "2"])
    assert r.returncode == 0, r.stderr
    assert f"training FLOPs per sample at 64x64: {step_flops(config, 2) / 1e9:,.1f} GFLOP" in r.stdout


def test_a_run_counts_its_flops_once_and_the_cache_follows_the_model(tiny_config, tmp_path, monkeypatch):
    """The trainer's cached count equals the count; another UNet, a damaged file or a cache folder that cannot
    be written are counted past, never trusted."""
    import dataclasses

    from tryon_ds.perf import cached_step_flops, step_flops

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    counted = step_flops(tiny_config, 1)
    assert cached_step_flops(tiny_config, 1) == counted
    [entry] = (tmp_path / "cache" / "tryon_ds" / "flops").glob("*.json")
    assert json.loads(entry.read_text())["flops"] == counted
    wider = tiny_config.with_unet(1, dataclasses.replace(tiny_config.unet(1), dim=48))
    assert cached_step_flops(wider, 1) == step_flops(wider, 1) != counted
    entry.write_text('{"flops": ')  # a torn file
    assert cached_step_flops(tiny_config, 1) == counted
    (tmp_path / "blocked").write_text("")  # a file where the cache folder would be
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "blocked"))
    assert cached_step_flops(tiny_config, 1) == counted
