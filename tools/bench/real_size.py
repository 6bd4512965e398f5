#!/usr/bin/env python
"""A shipped preset at its real size, end to end, beside the memory planner: what the tiny presets of the
tests cannot show.

For a preset at its place in the cascade: synthetic shards at the UNet's size, then the trainer as a user runs
it (``deepspeed --num_gpus R tryon_ds/train.py``, ZeRO-3 with the buckets given) for ``--steps`` steps with a
checkpoint at the last, resumed for one step more (``--resume auto``), the checkpoint consolidated into a
bundle (tools/consolidate_checkpoint.py), and one sampling step at the UNet's size from the bundle. Prints per
rank the peak memory (the largest resident set seen, polled every 0.2 s: what a CPU rank holds; on a GPU
node, host memory only) beside tools/plan_memory.py's figure for the same settings (preset, micro-batch,
ZeRO stage, precision, ranks, EMA, checkpointing, the DeepSpeed config's buckets), the checkpoint's size on
disk, and the seconds each stage took.

    python tools/bench/real_size.py --preset sr1024 --ranks 1 --set use_ema=false
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # a script run from a fresh clone: the repository's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import dataclasses
import json
import os
import subprocess
import tempfile
import threading
import time

import psutil
import torch
import yaml

from tryon_ds.cascade import CascadeUNet, random_batch
from tryon_ds.bundle import read_unet
from tryon_ds.config import Config, build_config, deep_merge, parse_override
from tryon_ds.model.presets import POSITION
from tryon_ds.tools.plan_memory import GIB, peak, plan, preset_config
from tryon_ds.training.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]


class PeakMemory:
    """The largest resident set of each rank process under ``pid`` (a launcher), polled in a thread."""

    def __init__(self, pid: int):
        self.root, self.peak, self._done = psutil.Process(pid), {}, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._done.wait(0.2):
            try:
                for p in self.root.children(recursive=True):
                    # a rank: not the launchers (whose command lines name the script too), nor a rank's data-loader
                    # workers (forks whose resident pages are mostly the rank's own, shared: they would count twice)
                    line, parent = " ".join(p.cmdline()), " ".join(p.parent().cmdline())
                    if "train.py" in line and "deepspeed.launcher" not in line and "deepspeed.launcher" in parent:
                        rank = p.environ().get("RANK", "?")
                        self.peak[rank] = max(self.peak.get(rank, 0), p.memory_info().rss)
            except psutil.Error:
                pass

    def stop(self) -> dict:
        self._done.set()
        self._thread.join()
        return self.peak


def timed(cmd: list[str], env: dict) -> tuple[float, dict, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = PeakMemory(proc.pid)
    out, _ = proc.communicate()
    peak = memory.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{out[-4000:]}")
    return time.perf_counter() - start, peak, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True)
    p.add_argument("--unet", type=int, help="its place in the cascade (default: the preset's own)")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--bucket", type=float, default=2e7, help="reduce and prefetch bucket sizes (elements)")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--samples", type=int, default=8, help="synthetic samples to train on")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--work", help="a folder for the shards, checkpoints and bundle (default: a temporary one)")
    args = p.parse_args()
    number = args.unet or POSITION[args.preset]
    config, _ = preset_config(Config(), args.preset, number)
    config = config.with_unet(number, dataclasses.replace(config.unet(number), checkpointing=args.checkpointing))
    work = Path(args.work or tempfile.mkdtemp(prefix="real_size_"))
    size = config.image_size(number)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.ranks))}
    py = sys.executable

    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        subprocess.run([py, "tools/make_shards.py", "--synthetic", str(args.samples), "--out", str(shards),
                        "--image-size", f"{size[0]}x{size[1]}", "--val-fraction", "0.25"], cwd=ROOT, check=True,
                       capture_output=True)
    overrides = {"data_dir": str(shards), "checkpoint_dir": str(work / "ckpt"), "output_dir": str(work / "out"),
                 "log_dir": str(work / "logs"), "batch_size": args.micro_batch, "train_unet_number": number,
                 "mixed_precision": args.precision if args.precision != "fp32" else "no",
                 "log_freq": 1, "validation_freq": 10 ** 6, "sample_freq": 10 ** 6, "checkpoint_freq": args.steps,
                 # the preview at the last step runs, for its memory, at one image and one DDIM step: a 1024 px
                 # image takes sr1024 about a minute per step on two CPU cores
                 "logging": {"sample_count": 1, "preview_steps": 1},
                 "data": {"num_workers": 0}}  # the model's memory: no loader worker (a fork of the rank)
    for item in args.set:
        overrides = deep_merge(overrides, parse_override(item))
    settings = deep_merge(config.to_dict(), overrides)
    (work / "config.yaml").write_text(yaml.safe_dump(settings))
    ds = json.loads((ROOT / "ds_configs" / ("cpu_zero3.json" if args.precision == "fp32" else "zero3_bf16.json"))
                    .read_text())
    ds["zero_optimization"].update(reduce_bucket_size=int(args.bucket), stage3_prefetch_bucket_size=int(args.bucket),
                                   overlap_comm=False)
    (work / "ds.json").write_text(json.dumps(ds))
    config = build_config(settings)
    planned = peak(plan(config, number, args.micro_batch, 3, args.precision, args.ranks, args.checkpointing, ds))

    train = [py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), "--master_port", str(free_port()),
             "tryon_ds/train.py",
             "--config", str(work / "config.yaml"), "--deepspeed_config", str(work / "ds.json")]
    first, held, _ = timed([*train, "--max_steps", str(args.steps)], env)
    ckpt = work / "ckpt" / f"unet{number}" / f"step{args.steps:08d}"
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    resumed, held_resumed, _ = timed([*train, "--max_steps", str(args.steps + 1), "--resume", "auto"], env)
    bundle = work / "bundle"
    start = time.perf_counter()
    subprocess.run([py, "tools/consolidate_checkpoint.py", str(work / "ckpt" / f"unet{number}"), "--out",
                    str(bundle)], cwd=ROOT, check=True, capture_output=True)
    consolidated = time.perf_counter() - start
    start = time.perf_counter()
    cfg, weights, _ = read_unet(bundle, number, ema=config.use_ema)
    model = CascadeUNet(cfg, number).eval()
    model.unet.load_state_dict({k: v.float() for k, v in weights.items()})  # as TryOnPipeline loads a bundle
    cond = {k: v for k, v in random_batch(cfg, number, 1).items() if k in model.conditioning.keys}
    with torch.no_grad():
        image = model.sample(cond, steps=1, sampler="ddim")
    sampled = time.perf_counter() - start

    print(f"{args.preset} as UNet {number} ({size[0]}x{size[1]}), {args.ranks} rank(s), ZeRO-3, {args.precision}, "
          f"micro-batch {args.micro_batch}, EMA {'on' if config.use_ema else 'off'}, checkpointing "
          f"{'on' if args.checkpointing else 'off'}, buckets {args.bucket:g}; torch {torch.__version__}")
    print(f"  planned per rank: {planned / GIB:.2f} GiB")
    for rank in sorted(set(held) | set(held_resumed)):
        most = max(held.get(rank, 0), held_resumed.get(rank, 0))
        print(f"  rank {rank}: peak {held.get(rank, 0) / GIB:.2f} GiB (resumed run: {held_resumed.get(rank, 0) / GIB:.2f}), "
              f"{most / planned:.2f}x the plan")
    print(f"  checkpoint on disk: {ckpt_bytes / GIB:.2f} GiB")
    print(f"  seconds: build + {args.steps} steps + save {first:.0f}; load + 1 step + save {resumed:.0f}; "
          f"consolidation {consolidated:.0f}; bundle load + 1 sampling step {sampled:.0f} "
          f"(sample {tuple(image.shape)})")


if __name__ == "__main__":
    main()
