"""A training step of every shipped preset on this machine: seconds per step, the model FLOP/s it achieves
(tryon_ds/perf.py counts a step's FLOPs), that against the machine's dense matmul throughput measured in the
same run, eager and compiled, channels_last off and on, and where the time goes by kind of op.

    python tools/bench/step.py                                  # every preset, batch 1 (CPU) or 4 (GPU)
    python tools/bench/step.py --presets tiny tiny-sr tiny-sr3 --steps 5 --compile
    python tools/bench/step.py --presets base --batch 8 --precision bf16 --json runs/step.json
    python tools/bench/step.py --presets tiny tiny-sr --attn-patch 2      # and attending on 2x2 patches

A step is what the trainer's is without DeepSpeed: forward and backward of the diffusion loss at the preset's
place and size in the cascade (tools/model_info.py --presets), and torch's AdamW (fused on a GPU); bf16 runs
under autocast. Each variant warms up for two steps (the first compiles), then --steps are timed; one more
step runs under torch.profiler, whose self time per op is summed by kind: convolution, attention, matmul
(linear layers), normalisation, elementwise, copies (layout changes, concatenation), the rest.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # a script run from a fresh clone: the repository's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import contextlib
import dataclasses
import json
import re
import time

import torch

from tryon_ds.cascade import CascadeUNet, random_batch
from tryon_ds.config import Config
from tryon_ds.model.presets import POSITION
from tryon_ds.perf import measured_matmul_peak, step_flops
from tryon_ds.planner import preset_config

# An op's kind by its name (torch.profiler's, aten::...); the first that matches wins.
KINDS = (("convolution", r"conv|mkldnn_convolution"), ("attention", r"scaled_dot_product|attention"),
         ("matmul", r"::(mm|addmm|bmm|matmul|linear|baddbmm)\b"),
         ("normalisation", r"group_norm|layer_norm|batch_norm|native_norm"),
         ("copies", r"copy_|contiguous|::cat\b|clone|::to\b|_to_copy|permute|transpose|reshape|view|expand|stack"),
         ("elementwise", r"add|mul|sub|div|silu|gelu|sigmoid|tanh|exp|sqrt|rsqrt|pow|where|fill|lerp|sum|mean|"
                         r"neg|clamp|sin|cos|softmax|cumprod|masked|foreach|fused"))
COLUMNS = [k for k, _ in KINDS] + ["other"]


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


def time_by_kind(step, device: torch.device) -> dict[str, float]:
    """The share of one step's self time (device time on a GPU) spent in each kind of op."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    totals = dict.fromkeys(COLUMNS, 0.0)
    for event in prof.key_averages():
        self_time = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        totals[kind_of(event.key)] += self_time
    whole = sum(totals.values()) or 1.0
    return {k: v / whole for k, v in totals.items()}


def bench(config: Config, number: int, batch: int, steps: int, device: torch.device, precision: str,
          compiled: bool, channels_last: bool, patch: int = 1) -> dict:
    unet = dataclasses.replace(config.unet(number), compile=compiled, channels_last=channels_last)
    if patch > 1:
        unet = dataclasses.replace(unet, attn_patch=patch)
    config = config.with_unet(number, unet)
    torch.manual_seed(0)
    model = CascadeUNet(config, number).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = {k: v.to(device) for k, v in random_batch(config, number, batch).items()}
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def step():
        with autocast:
            loss = model(data)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    for _ in range(2):
        step()
    sync()
    warm_up_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    step_s = (time.perf_counter() - start) / steps
    flops = step_flops(config, number) * batch
    return {"preset": unet.preset, "unet": number, "batch": batch, "compiled": compiled,
            "channels_last": channels_last, "attn_patch": patch, "precision": precision, "warm_up_s": warm_up_s,
            "step_s": step_s, "flops_per_step": flops, "tflops": flops / step_s / 1e12,
            "loss_finite": bool(torch.isfinite(loss)), "by_kind": time_by_kind(step, device)}


def table(results: list[dict], matmul_peak: float) -> str:
    head = (f"{'preset':<11}{'UNet':>4} {'variant':<34}{'s/step':>8}{'TFLOP/s':>9}{'of matmul':>10}  "
            + "".join(f"{k[:11]:>12}" for k in COLUMNS))
    lines = [head]
    for r in results:
        variant = ("compiled" if r["compiled"] else "eager") + (", channels_last" if r["channels_last"] else "") \
            + (f", {r['attn_patch']}x{r['attn_patch']} patches" if r["attn_patch"] > 1 else "")
        lines.append(f"{r['preset']:<11}{r['unet']:>4} {variant:<34}{r['step_s']:8.3f}{r['tflops']:9.3f}"
                     f"{100 * r['tflops'] * 1e12 / matmul_peak:9.1f}%  "
                     + "".join(f"{100 * r['by_kind'][k]:11.1f}%" for k in COLUMNS))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=list(POSITION), choices=list(POSITION))
    p.add_argument("--batch", type=int, help="samples per step (default: 1 on a CPU, 4 on a GPU)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant, after two warm-up steps")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--compile", action="store_true", help="also each preset compiled (torch.compile, inductor)")
    p.add_argument("--attn-patch", type=int, default=1, metavar="P",
                   help="also each Parallel-UNet preset attending on PxP patches at its highest attending level")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    batch = args.batch or (4 if device.type == "cuda" else 1)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    matmul_peak = measured_matmul_peak(1.0, 8192 if device.type == "cuda" else 1024, device, dtype)
    print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {precision}, batch {batch}; dense {precision} matmul measured: "
          f"{matmul_peak / 1e12:.3f} TFLOP/s", flush=True)
    results = []
    for name in args.presets:
        number = POSITION[name]
        config, _ = preset_config(Config(), name, number)
        patches = (1, args.attn_patch) if args.attn_patch > 1 and hasattr(config.unet(number), "attn_patch") else (1,)
        for compiled in (False, True) if args.compile else (False,):
            for channels_last in (False, True):
                for patch in patches:
                    results.append(bench(config, number, batch, args.steps, device, precision, compiled,
                                         channels_last, patch))
                    print(table(results[-1:], matmul_peak).splitlines()[1], flush=True)
    print()
    print(table(results, matmul_peak))
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_peak": matmul_peak, "results": results}, indent=1))


if __name__ == "__main__":
    main()
