"""The planner's step time (tryon_ds/scaling.py, tryon_ds/comms.py) against real DeepSpeed engines on 1, 2
and 4 CPU ranks of this machine: what can be checked of the node table without a cluster.

    python tools/bench/scaling.py                           # tiny UNet 1, ZeRO-2 and ZeRO-3, micro-batch 8 and 2
    python tools/bench/scaling.py --ranks 1 2 --zero 2 --micro-batch 8 --steps 10

For each world size the launcher starts the ranks once; they first measure gloo's all-reduce (sizes from
4 KiB to 32 MiB, ten calls each: its latency and bus bandwidth, fitted), then train the tiny config's UNet 1
as the trainer builds it (cpu_zero2.json / cpu_zero3.json), timing --steps optimizer steps after two of
warm-up. The prediction for N ranks takes the FLOPs per sample (perf.py), the efficiency one rank on one
thread reached against its fp32 matmul peak (a separate run: the "one GPU" the planner's --mfu-from reads),
the peak each of the N ranks gets (all measuring at once, as they share the machine's cores: the trainer
gives each cores / N threads), and each collective of comms.py over the measured gloo link; the CPU configs
do not overlap communication.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # a script run from a fresh clone: the repository's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

import torch

REPO = Path(__file__).resolve().parents[2]
SIZES = [1 << k for k in range(12, 26, 2)]  # bytes of fp32 all-reduced: 4 KiB .. 16 MiB


def measure_gloo(calls: int = 10) -> tuple[float, float]:
    """(bus bandwidth in bytes/s, latency in s) of this world's all-reduce, a least-squares line through the
    median time of each size against the bytes each rank sends (2 (p-1)/p of the tensor)."""
    import torch.distributed as dist

    from tryon_ds.scaling import volume

    p, xs, ys = dist.get_world_size(), [], []
    for size in SIZES:
        tensor = torch.ones(size // 4)
        dist.all_reduce(tensor)
        times = []
        for _ in range(calls):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - start)
        xs.append(volume("all_reduce", size, p))
        ys.append(statistics.median(times))
    # the slowest rank's view is the collective's: every rank takes each rank's maximum
    measured = torch.tensor(ys, dtype=torch.float64)
    dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    slope, intercept = statistics.linear_regression(xs, measured.tolist())
    return 1 / slope, max(intercept, 0.0)


def worker(args) -> None:
    import torch.distributed as dist

    from tryon_ds.cascade import random_batch
    from tryon_ds.config import build_config, deep_merge, read_config_file
    from tryon_ds.perf import measured_matmul_peak
    from tryon_ds.training import distributed, engine as ds_engine
    from tryon_ds.training.ds_config import build_ds_config

    world = distributed.setup()
    link = measure_gloo() if world.size > 1 else (None, None)
    # every rank at once, as they will train: what each gets of the machine's cores
    dist.barrier()
    peak = torch.tensor(measured_matmul_peak(1.0), dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MIN)
    results = []
    for zero in args.zero:
        for micro in args.micro_batch:
            config = build_config(deep_merge(read_config_file(REPO / "configs" / "tiny.yaml"),
                                             {"batch_size": micro, "warmup_steps": 0, "sample_freq": 0}))
            ds = build_ds_config(REPO / "ds_configs" / f"cpu_zero{zero}.json", config, world.size)
            model, engine, _, ema = ds_engine.build(config, ds)
            batches = [random_batch(config, 1, micro, torch.Generator().manual_seed(world.rank * 1000 + s))
                       for s in range(args.steps + 2)]
            times = []
            for step, batch in enumerate(batches):
                dist.barrier()
                start = time.perf_counter()
                loss, _ = ds_engine.train_step(engine, ema, [batch], step)
                loss.item()
                times.append(time.perf_counter() - start)
            measured = torch.tensor(times[2:], dtype=torch.float64)
            dist.all_reduce(measured, op=dist.ReduceOp.MAX)
            results.append({"zero": zero, "micro": micro, "ds": ds, "step_s": statistics.median(measured.tolist())})
            del model, engine, ema
    if world.is_main:
        Path(args.out).write_text(json.dumps({"ranks": world.size, "threads": torch.get_num_threads(),
                                              "link": link, "peak": peak.item(), "results": results}))


def launch(ranks: int, args, threads: int | None = None) -> dict:
    """One world of ``ranks`` (each with ``threads`` threads; the trainer's choice, cores / ranks, if None)."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), __file__, "--worker",
               "--out", str(out), "--steps", str(args.steps), "--zero", *map(str, args.zero), "--micro-batch",
               *map(str, args.micro_batch)]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        if r.returncode:
            sys.exit(f"{ranks} ranks failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--zero", type=int, nargs="+", default=[2, 3], choices=(0, 2, 3))
    p.add_argument("--micro-batch", type=int, nargs="+", default=[8, 2])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from tryon_ds import comms
    from tryon_ds.config import build_config, read_config_file
    from tryon_ds.perf import step_flops
    from tryon_ds.scaling import MeasuredLink, step_time

    config = build_config(read_config_file(REPO / "configs" / "tiny.yaml"))
    layout, flops = comms.layout(config, 1), step_flops(config, 1)
    # the efficiency is measured on one core, as each of 2 or 4 ranks on this 2-core machine gets at most one
    one = launch(1, args, threads=1)
    runs = {n: launch(n, args) for n in sorted(args.ranks)}
    print(f"tiny UNet 1 ({layout.total:,} parameters, {flops / 1e9:.2f} GFLOP a sample), fp32; efficiency (MFU) "
          f"measured by one rank on one thread (fp32 matmul peak {one['peak'] / 1e9:.1f} GFLOP/s)")
    print(f"{'ranks':>5} {'threads':>7} {'peak/rank':>9} {'gloo GB/s':>9} {'latency':>8}  {'ZeRO':>4} {'micro':>5} "
          f"{'MFU(1)':>7} {'compute':>8} {'comm':>7} {'predicted':>9} {'measured':>9} {'ratio':>6}")
    for n, run in runs.items():
        bw, latency = run["link"]
        link = MeasuredLink(bw, latency) if n > 1 else MeasuredLink(1.0, 0.0)
        for result, base in zip(run["results"], one["results"]):
            micro = result["micro"]
            mfu = micro * flops / base["step_s"] / one["peak"]  # one rank: its step is all compute
            calls = comms.per_step(layout, result["ds"], "fp32", n, 1)
            t = step_time(calls, link, n, micro * flops / (run["peak"] * mfu), 1, result["ds"])
            print(f"{n:5d} {run['threads']:7d} {run['peak'] / 1e9:9.1f} {bw / 1e9 if bw else 0:9.2f} "
                  f"{1e3 * (latency or 0):6.2f}ms  {result['zero']:4d} {micro:5d} {100 * mfu:6.1f}% {t.compute:7.3f}s "
                  f"{t.exposed:6.3f}s {t.total:8.3f}s {result['step_s']:8.3f}s {result['step_s'] / t.total:6.2f}")


if __name__ == "__main__":
    main()
