#!/usr/bin/env python
"""A shipped preset at its real size, end to end, beside the memory planner: what the tiny presets of the
tests cannot show.

For a preset at its place in the cascade: synthetic shards at the UNet's size, then the trainer as a user runs
it (``deepspeed --num_gpus R tryon_ds/train.py``, ZeRO-3 with the buckets given) for ``--steps`` steps with a
checkpoint at the last, resumed for one step more (``--resume auto``), the checkpoint consolidated into a
bundle (tools/consolidate_checkpoint.py), and one sampling step at the UNet's size from the bundle. Prints per
rank the peak memory beside tools/plan_memory.py's figure for the same settings (preset, micro-batch, ZeRO
stage, precision, ranks, EMA, checkpointing, the DeepSpeed config's buckets and sub-groups, an offloaded
optimizer): on CPU ranks the largest private memory seen (anonymous and shared-memory pages, polled every
0.2 s; the resident set besides) against the planner's CPU-rank total, on a GPU the allocator's peak the
trainer logs (``memory/peak_gib``, rank 0); the checkpoint's size on disk; and the seconds of a step (the
first, the last, the first after the resume), each save, the load, the consolidation and the sampling step.

    python tools/bench/real_size.py --preset sr1024 --ranks 1 --set use_ema=false
    python tools/bench/real_size.py --preset base --sub-group 1e8 --checkpointing --set use_ema=false  # 24 GiB
    python tools/bench/real_size.py --preset sr --sub-group 1e8 --checkpointing --set use_ema=false --set sample_freq=0
    python tools/bench/real_size.py --preset sr --precision bf16                                      # a GPU
    python tools/bench/real_size.py --preset base --sub-group 1e8 --checkpointing --set use_ema=false \
        --zero stage3_max_live_parameters=1e8 --zero stage3_max_reuse_distance=1e8  # #43's configuration
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # a script run from a fresh clone: the repository's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import dataclasses
import json
import os
import re
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
from tryon_ds.planner import GIB, peak, plan, preset_config
from tryon_ds.training.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]


def private_bytes(pid: int) -> int:
    """A process's anonymous and shared-memory resident pages: its resident set less the pages mapped from
    files (libraries, a checkpoint a resume reads mapped), which the kernel can drop rather than go out of memory."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return sum(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssShmem"))


class PeakMemory:
    """The largest private memory (``private_bytes``) and resident set of each rank process under ``pid`` (a
    launcher), polled in a thread."""

    def __init__(self, pid: int):
        self.root, self.peak, self.rss, self._done = psutil.Process(pid), {}, {}, threading.Event()
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
                        self.peak[rank] = max(self.peak.get(rank, 0), private_bytes(p.pid))
                        self.rss[rank] = max(self.rss.get(rank, 0), p.memory_info().rss)
            except (psutil.Error, OSError):
                pass

    def stop(self) -> "PeakMemory":
        self._done.set()
        self._thread.join()
        return self


def timed(cmd: list[str], env: dict) -> tuple[float, PeakMemory, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = PeakMemory(proc.pid)
    out, _ = proc.communicate()
    memory.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{out[-4000:]}")
    return time.perf_counter() - start, memory, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True)
    p.add_argument("--unet", type=int, help="its place in the cascade (default: the preset's own)")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--bucket", type=float, default=2e7, help="reduce and prefetch bucket sizes (elements)")
    p.add_argument("--sub-group", type=float,
                   help="ZeRO-3's sub_group_size: elements stepped at a time (DeepSpeed: 1e9)")
    p.add_argument("--zero", action="append", default=[], metavar="KEY=VALUE",
                   help="another zero_optimization setting, e.g. stage3_max_live_parameters=1e8")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--offload", action="store_true",
                   help="the optimizer offloaded to the CPU (DeepSpeed's CPU Adam, in place: no step temporaries)")
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
    if args.sub_group:
        ds["zero_optimization"]["sub_group_size"] = int(args.sub_group)
    for item in args.zero:
        key, _, value = item.partition("=")
        try:
            ds["zero_optimization"][key] = int(float(value))  # 1e8, which YAML reads as a string
        except ValueError:
            ds["zero_optimization"][key] = yaml.safe_load(value)
    if args.offload:  # DeepSpeed takes its CPU Adam only where torch's AdamW is not asked for
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        ds["optimizer"]["params"].pop("torch_adam", None)
    (work / "ds.json").write_text(json.dumps(ds))
    config = build_config(settings)
    cpu = not torch.cuda.is_available()
    rows = plan(config, number, args.micro_batch, 3, args.precision, args.ranks, args.checkpointing, ds, cpu=cpu)
    planned = peak(rows, cpu)

    train = [py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), "--master_port", str(free_port()),
             "tryon_ds/train.py",
             "--config", str(work / "config.yaml"), "--deepspeed_config", str(work / "ds.json")]
    first, first_memory, first_out = timed([*train, "--max_steps", str(args.steps)], env)
    ckpt = work / "ckpt" / f"unet{number}" / f"step{args.steps:08d}"
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    resumed, resumed_memory, resumed_out = timed([*train, "--max_steps", str(args.steps + 1), "--resume", "auto"], env)
    bundle = work / "bundle"
    start = time.perf_counter()
    subprocess.run([py, "tools/consolidate_checkpoint.py", str(work / "ckpt" / f"unet{number}"), "--out",
                    str(bundle)], cwd=ROOT, check=True, capture_output=True)
    consolidated = time.perf_counter() - start
    start = time.perf_counter()
    cfg, weights, _ = read_unet(bundle, number, ema=config.use_ema)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = CascadeUNet(cfg, number).eval()
    model.unet.load_state_dict({k: v.float() for k, v in weights.items()})  # as TryOnPipeline loads a bundle
    model.to(device)
    cond = {k: v.to(device) for k, v in random_batch(cfg, number, 1).items() if k in model.conditioning.keys}
    with torch.no_grad():
        image = model.sample(cond, steps=1, sampler="ddim")
    sampled = time.perf_counter() - start

    # The trainer's own figures: a step's seconds from the rate it logs at every step (log_freq 1), the save and
    # the load from its messages; on a GPU the allocator's peak, which rank 0 logs (at its last step: before
    # the save and the preview).
    rates, logged_peak = {}, {}
    for line in (work / "out" / f"metrics_unet{number}.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/samples_per_s" in record:
            rates[record["step"]] = args.micro_batch * args.ranks / record["train/samples_per_s"]
            logged_peak[record["step"]] = record["memory/peak_gib"] * GIB
    if cpu:
        held, held_resumed = first_memory.peak, resumed_memory.peak
        rss = {r: max(first_memory.rss.get(r, 0), resumed_memory.rss.get(r, 0)) for r in set(held) | set(held_resumed)}
    else:
        held, held_resumed, rss = {"0": logged_peak[args.steps]}, {"0": logged_peak[args.steps + 1]}, {}
    saved = re.findall(r"step \d+: checkpoint \S+ \(([\d.]+) s\)", first_out + resumed_out)
    loaded = re.search(r"\(loaded in ([\d.]+) s\)", resumed_out)

    print(f"{args.preset} as UNet {number} ({size[0]}x{size[1]}), {args.ranks} {'CPU ' if cpu else 'GPU '}rank(s), "
          f"ZeRO-3, {args.precision}, micro-batch {args.micro_batch}, EMA {'on' if config.use_ema else 'off'}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, buckets {args.bucket:g}, sub-groups "
          f"{ds['zero_optimization'].get('sub_group_size', 1e9):g}, optimizer "
          f"{'offloaded (CPU Adam)' if args.offload else 'torch AdamW'}; torch {torch.__version__}")
    print(f"  planned per rank: {planned / GIB:.2f} GiB ("
          + ", ".join(f"{k} {v / GIB:.2f}" for k, v in rows.items() if v) + ")")
    what = "private memory" if cpu else "allocator's peak"
    for rank in sorted(set(held) | set(held_resumed)):
        most = max(held.get(rank, 0), held_resumed.get(rank, 0))
        print(f"  rank {rank}: {what} {held.get(rank, 0) / GIB:.2f} GiB (resumed run: "
              f"{held_resumed.get(rank, 0) / GIB:.2f}), {most / planned:.2f}x the plan"
              + (f"; largest resident set {rss[rank] / GIB:.2f} GiB" if rank in rss else ""))
    print(f"  checkpoint on disk: {ckpt_bytes / GIB:.2f} GiB")
    print(f"  seconds: first step {rates[1]:.0f}, step {args.steps} {rates[args.steps]:.0f}, first step after the "
          f"resume {rates[args.steps + 1]:.0f}; save {' and '.join(saved)}; load {loaded.group(1)}; "
          f"consolidation {consolidated:.0f}; bundle load + 1 sampling step {sampled:.0f} (sample {tuple(image.shape)})")
    print(f"  whole runs: build + {args.steps} steps + save {first:.0f}, build + load + 1 step + save {resumed:.0f}")


if __name__ == "__main__":
    main()
