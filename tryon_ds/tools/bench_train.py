"""Training-step benchmark: step time, samples/s and per-rank memory of the model states, for ZeRO-0/2/3
and activation checkpointing on/off, with real DeepSpeed engines.

    python tools/bench_train.py --ranks 2 --steps 8                 # CPU: tiny and small presets
    python tools/bench_train.py --ranks 1 --gpu --steps 20          # GPU: base (batch 16) and sr (batch 8)

Each configuration runs in its own ``deepspeed`` launch on random batches (the data pipeline is measured by
tools/bench_data.py). "states" counts the bytes each rank really holds after a step: its parameters (a
ZeRO-3 rank only its partition), the gradients it keeps, and the optimizer's fp32 master copy and Adam
moments; on GPU also the peak allocated memory and the model-FLOPs utilisation from torch's FLOP counter.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..model import parameter_count
from ..training.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
CPU_CASES = [("tiny", "tiny", 8), ("small", "small", 4)]
GPU_CASES = [("base", "base", 16), ("sr", "sr", 8)]
# "small": a CPU-sized Parallel-UNet between tiny and base, at the tiny config's 32/64 px.
SMALL = {"preset": "tiny", "dim": 64, "num_res_blocks": [2, 2, 2], "attn_heads": 4, "attn_dim_head": 32,
         "cond_dim": 256, "pose_hidden": 256}
H100_BF16_PEAK = 989e12  # dense bf16 TFLOP/s of an H100 SXM; fp16 is the same


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def state_bytes(engine) -> dict:
    params = [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in engine.module.parameters()]
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    moments = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    master = []
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        master += list(getattr(opt, name, []) or [])
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    for name in ("averaged_gradients",):
        held = getattr(opt, name, None)
        if isinstance(held, dict):
            grads += [g for group in held.values() for g in (group or [])]
    grads += [m.grad for m in master if m.grad is not None]
    return {"params": _tensor_bytes(params), "grads": _tensor_bytes(grads), "master": _tensor_bytes(master),
            "moments": _tensor_bytes(moments)}


def worker(args) -> None:
    """One configuration, inside a deepspeed launch."""
    import deepspeed

    from tryon_ds.config import build_config, deep_merge, read_config_file
    from tryon_ds.stage import CascadeStage
    from tryon_ds.tools.bench_model import random_batch
    from tryon_ds.training import distributed
    from tryon_ds.training.ds_config import build_ds_config

    world = distributed.setup()
    case = json.loads(args.worker)
    unet = SMALL if case["preset"] == "small" else {"preset": case["preset"]}
    over = {"batch_size": case["batch"], "mixed_precision": case["precision"] if case["precision"] != "fp32" else "no",
            "unet1": {**unet, "checkpointing": case["checkpointing"]},
            "unet2": {**unet, "checkpointing": case["checkpointing"]}}
    if case["preset"] in ("base", "sr"):
        over.update(base_image_size=[128, 128], sr_image_size=[256, 256])
    config = build_config(deep_merge(read_config_file(REPO / "configs" / "tiny.yaml"), over))
    ds = build_ds_config(REPO / "ds_configs" / case["ds"], config, world.size)
    torch.manual_seed(0)
    model = CascadeStage(config, case["stage"])
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    batch = {k: v.to(world.device) for k, v in random_batch(config, case["stage"], case["batch"]).items()}
    flops = None
    if world.device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            engine.backward(engine(batch))
        engine.step()
        flops = counter.get_total_flops() * world.size
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps + 2):
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.backward(engine(batch))
        engine.step()
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[2:])
    engine.backward(engine(batch))
    states = state_bytes(engine)  # between backward and step: the gradients are held
    engine.step()
    result = {"step_s": step, "samples_per_s": case["batch"] * world.size / step, "states": states,
              "params_total": parameter_count(model)}
    if flops is not None:
        result.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30, flops_per_step=flops,
                      mfu=flops / step / (H100_BF16_PEAK * world.size))
    if world.is_main:
        Path(args.out).write_text(json.dumps(result))


def launch(case: dict, ranks: int, steps: int) -> dict:
    port = free_port()
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(port),
           str(REPO / "tools" / "bench_train.py"), "--worker", json.dumps(case), "--out", str(out),
           "--steps", str(steps)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if r.returncode != 0:
        raise SystemExit(f"benchmark case {case} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--gpu", action="store_true", help="the base/sr presets in fp16 and bf16 with ZeRO-2")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    mib = 2 ** 20
    if args.gpu:
        print("preset  stage  batch  precision  step s   it/s   samples/s  peak GiB  TFLOP/step  MFU")
        for name, preset_name, batch in GPU_CASES:
            stage = 2 if name == "sr" else 1
            for prec in ("fp16", "bf16"):
                case = {"preset": preset_name, "stage": stage, "batch": batch, "precision": prec,
                        "ds": f"zero2_{prec}.json", "checkpointing": False}
                r = launch(case, args.ranks, args.steps)
                print(f"{name:<7} {stage:>5}  {batch:>5}  {prec:<9}  {r['step_s']:6.3f}  {1 / r['step_s']:5.2f}  "
                      f"{r['samples_per_s']:9.1f}  {r['peak_gib']:8.1f}  {r['flops_per_step'] / 1e12:10.1f}  "
                      f"{100 * r['mfu']:4.1f}%")
        return
    print(f"{args.ranks} rank(s), CPU, fp32; states = MiB per rank: params + grads + fp32 master + Adam moments")
    print("preset  params   ZeRO  ckpt   step s  samples/s   params  grads  master  moments  total MiB")
    for name, preset_name, batch in CPU_CASES:
        for zero in (0, 2, 3):
            for ckpt in (False, True):
                case = {"preset": preset_name, "stage": 1, "batch": batch, "precision": "fp32",
                        "ds": f"cpu_zero{zero}.json", "checkpointing": ckpt}
                r = launch(case, args.ranks, args.steps)
                s = r["states"]
                print(f"{name:<7} {r['params_total'] / 1e6:5.2f}M  {zero:>4}  {str(ckpt):<5}  {r['step_s']:6.3f}  "
                      f"{r['samples_per_s']:9.1f}  {s['params'] / mib:6.1f}  {s['grads'] / mib:5.1f}  "
                      f"{s['master'] / mib:6.1f}  {s['moments'] / mib:7.1f}  {sum(s.values()) / mib:9.1f}")


if __name__ == "__main__":
    main()
