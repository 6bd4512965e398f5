#!/usr/bin/env python
"""The planner's activation estimate against what a real forward and backward keep, per shipped preset.

tools/plan_memory.py traces one micro-batch's forward on the ``meta`` device and sums what autograd saves for
backward (with activation checkpointing: each block's input, and one block's activations again while it is
recomputed). Here the same UNet runs forward and backward on real tensors on this machine, under PyTorch's
memory profiler (``torch.profiler`` with ``profile_memory``; its ``_memory_profiler.MemoryProfile`` sorts every
allocation into parameters, gradients, activations, temporaries, ...), and prints per preset the peak of the
bytes the step holds other than the parameters' gradients (which the planner counts as model states):
activations, and the temporaries and recomputed activations of backward (with checkpointing the profiler
classes a block's recomputed activations as temporaries); the peak of what it classes as activations alone;
the peak of everything the step allocated; the planner's figure beside them.

    python tools/bench/activations.py --preset base --preset sr --preset sr1024 --checkpointing off on
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # a script run from a fresh clone: the repository's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import dataclasses
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action, MemoryProfile

from tryon_ds.cascade import CascadeUNet, random_batch
from tryon_ds.config import Config
from tryon_ds.model import DTYPES, parameter_count
from tryon_ds.model.presets import POSITION
from tryon_ds.planner import GIB, activations, preset_config


def measure(config: Config, number: int, micro_batch: int, precision: str) -> dict[str, float]:
    """Peak bytes by the memory profiler's categories over one forward and backward of real tensors."""
    model = CascadeUNet(config, number).to(DTYPES[precision]).train()
    batch = {k: v.to(DTYPES[precision]) if v.is_floating_point() else v
             for k, v in random_batch(config, number, micro_batch, torch.Generator().manual_seed(0)).items()}
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        model(batch).backward()
    seconds = time.perf_counter() - start
    memory = MemoryProfile(prof.profiler.kineto_results)
    live, peak, total, total_peak, held_peak = defaultdict(int), defaultdict(int), 0, 0, 0
    for _, action, (key, version), size in memory.timeline:
        if action not in (Action.CREATE, Action.DESTROY):
            continue  # PREEXISTING: the parameters and the batch, there before the step
        category = memory._categories.get(key, version)
        name = category.name if category is not None else "unknown"
        change = size if action == Action.CREATE else -size
        live[name] += change
        total += change
        peak[name] = max(peak[name], live[name])
        total_peak = max(total_peak, total)
        held_peak = max(held_peak, total - live["GRADIENT"])
    return {"held": held_peak, "activations": peak["ACTIVATION"], "step peak": total_peak, "seconds": seconds,
            "parameters": parameter_count(model)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", default=[], help="repeatable (default: base, sr, sr1024)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--precision", choices=sorted(DTYPES), default="fp32",
                   help="the dtype of parameters and inputs (bf16 on a CPU without bf16 instructions is slow)")
    p.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"])
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.precision}, micro-batch "
          f"{args.micro_batch}; GiB")
    print(f"{'preset':<10}{'UNet':>5}{'ckpt':>6}{'planned':>10}{'measured':>10}{'planned/measured':>18}"
          f"{'activations':>13}{'step peak':>11}{'seconds':>9}")
    for name in args.preset or ["base", "sr", "sr1024"]:
        for checkpointing in args.checkpointing:
            config, number = preset_config(Config(), name, POSITION[name])
            on = checkpointing == "on"
            config = config.with_unet(number, dataclasses.replace(config.unet(number), checkpointing=on))
            planned = activations(config, number, args.micro_batch, args.precision, on)
            got = measure(config, number, args.micro_batch, args.precision)
            print(f"{name:<10}{number:>5}{checkpointing:>6}{planned / GIB:10.3f}{got['held'] / GIB:10.3f}"
                  f"{planned / max(got['held'], 1):18.3f}{got['activations'] / GIB:13.3f}{got['step peak'] / GIB:11.3f}"
                  f"{got['seconds']:9.1f}", flush=True)


if __name__ == "__main__":
    main()
