"""Training-step benchmark with real DeepSpeed engines, built and stepped as the trainer does (its EMA too).

    python tools/bench/train.py --ranks 2 --steps 8                 # CPU: tiny and small presets, ZeRO-0/2/3
    python tools/bench/train.py --gpu --steps 60 --json out.json    # GPU: the matrix of tools/gpu_check.sh

CPU: step time, samples/s and the bytes each rank really holds after a backward (its parameters, a ZeRO-3
rank only its partition; the gradients it keeps; the optimizer's fp32 master copy; Adam's moments; the EMA),
beside tools/plan_memory.py's estimate of the same. GPU: UNet 1 (base preset, micro-batch 16), UNet 2 (sr
preset, micro-batch 8) and UNet 3 (sr1024 on 256 px crops, micro-batch 16) in bf16 and fp16 under ZeRO-2
and ZeRO-3, with each attention backend that runs
there, channels_last for one case, and each UNet compiled (a UNet's ``compile``, in bf16 under ZeRO-2 and
ZeRO-3, its warm-up time in the JSON): it/s, samples/s, peak memory beside the planner's estimate,
model-FLOPs utilisation (a step's FLOPs counted by tryon_ds/perf.py against the GPU's dense peak at the
case's precision) and whether every loss was finite. Every ``--log-freq`` steps it reads the loss scale and gradient
norm as the trainer's log step does. Each case runs in its own process, on random batches (the input
pipeline is measured by tools/bench/data.py).
"""
from __future__ import annotations

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
import time

import torch

REPO = Path(__file__).resolve().parents[2]

CPU_CASES = [("tiny", 8), ("small", 4)]
# "small": a CPU-sized Parallel-UNet between tiny and base, at the tiny config's 32/64 px.
SMALL = {"dim": 64, "num_res_blocks": (2, 2, 2), "attn_heads": 4, "attn_dim_head": 32,
         "cond_dim": 256, "pose_dim": 128}


def case_config(case: dict):
    """The tiny config with the case's UNet in its place (at the case's size: crops, for a UNet trained on them)."""
    from tryon_ds.config import build_config, preset, read_config_file

    over = {"batch_size": case["batch"], "mixed_precision": case["precision"] if case["precision"] != "fp32" else "no",
            "train_unet_number": case["unet"], "use_ema": True}
    config = build_config({**read_config_file(REPO / "configs" / "tiny.yaml"), **over})
    unet = dataclasses.replace(preset("tiny"), **SMALL) if case["preset"] == "small" else preset(case["preset"])
    unet = dataclasses.replace(unet, checkpointing=case.get("checkpointing", False),
                               compile="compile" in case, compile_backend=case.get("compile", "inductor"))
    size = case.get("size")
    return config.with_unet(case["unet"], unet, (size, size) if size else None)


def _set_variant(engine, backend: str, channels_last: bool) -> None:
    """A variant on the built engine (a compiled UNet is a case of its own: under ZeRO-3 the engine is built
    differently for it)."""
    from tryon_ds.model.parallel_unet import Attention

    for m in engine.module.modules():
        if isinstance(m, Attention):
            m.backend = backend
    engine.module.unet.cfg = dataclasses.replace(engine.module.unet.cfg, channels_last=channels_last)


def worker(args) -> None:
    """One case in its own process: the engine is built once; each variant (attention backend, memory
    format) is measured on it in turn."""
    from tryon_ds.model import parameter_count
    from tryon_ds.model.attention import xops
    from tryon_ds.cascade import random_batch
    from tryon_ds.perf import datasheet_peak, step_flops
    from tryon_ds.planner import peak as planned_peak, plan
    from tryon_ds import compat
    from tryon_ds.training import distributed, engine as ds_engine
    from tryon_ds.training.ds_config import build_ds_config, zero_stage

    world = distributed.setup()
    case = json.loads(args.worker)
    config = case_config(case)
    ds = build_ds_config(REPO / "ds_configs" / case["ds"], config, world.size)
    model, engine, _, ema = ds_engine.build(config, ds)
    cuda = world.device.type == "cuda"
    batch = {k: v.to(world.device) for k, v in random_batch(config, case["unet"], case["batch"]).items()}
    n = case["unet"]

    held = {}

    def train_step(step):
        loss, _ = ds_engine.train_step(engine, ema, [batch], step, seed_of=lambda micro: step,
                                       # between backward and step: the gradients are held
                                       after_backward=lambda: held.update(ds_engine.state_bytes(engine)))
        return loss

    results = []
    for variant in case["variants"]:
        if variant["attention"] == "xformers" and (xops is None or not cuda):
            results.append({**variant, "skipped": "xformers not installed" if xops is None else "no CUDA"})
            continue
        _set_variant(engine, variant["attention"], variant.get("channels_last", False))
        start = time.perf_counter()
        for step in range(3):  # warm-up: cuDNN's autotuner, allocator, first collectives, compilation
            train_step(step)
        warm_up_s = time.perf_counter() - start
        flops = step_flops(config, n) * case["batch"]  # per rank and step (tryon_ds/perf.py)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        losses, scales = [], []
        start = time.perf_counter()
        for step in range(args.steps):
            losses.append(train_step(step))
            if (step + 1) % args.log_freq == 0:  # what the trainer reads at a log step
                scales.append(compat.loss_scale(engine) if engine.fp16_enabled() else None)
                float(engine.get_global_grad_norm() or 0.0)
        if cuda:
            torch.cuda.synchronize()
        step_s = (time.perf_counter() - start) / args.steps
        finite = bool(torch.isfinite(torch.stack(losses)).all())
        planned = planned_peak(plan(dataclasses.replace(config, sample_freq=0),  # steps only: no preview here
                                    n, case["batch"], zero_stage(ds), case["precision"], world.size,
                                    case.get("checkpointing", False), ds))
        r = {**variant, "warm_up_s": warm_up_s, "step_s": step_s, "it_s": 1 / step_s,
             "samples_per_s": case["batch"] * world.size / step_s,
             "losses_finite": finite, "loss_scales": scales, "planned_gib": planned / 2**30,
             "params": parameter_count(model, compat.full_numel)}
        if cuda:
            peak = datasheet_peak(torch.cuda.get_device_name(), "tf32" if case["precision"] == "fp32" else case["precision"])
            r.update(gpu=torch.cuda.get_device_name(), peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                     flops_per_step=flops, mfu=flops / step_s / peak if peak else None)
        else:
            r.update(states=dict(held), flops_per_step=flops)
        results.append(r)
    if world.is_main:
        Path(args.out).write_text(json.dumps(results))
    distributed.teardown()


def launch(case: dict, ranks: int, steps: int, log_freq: int) -> list[dict]:
    from tryon_ds.training.distributed import free_port

    out = Path(tempfile.mkstemp(suffix=".json")[1])
    script = [str(REPO / "tools" / "bench" / "train.py"), "--worker", json.dumps(case), "--out", str(out), "--steps",
              str(steps), "--log-freq", str(log_freq)]
    cmd = ([sys.executable, *script] if ranks == 1 else
           [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
            str(free_port()), *script])
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if r.returncode != 0:
        return [{"case_failed": f"{r.stdout[-1500:]}\n{r.stderr[-1500:]}"}]
    return json.loads(out.read_text())


def gpu_cases(dry_run: bool) -> list[dict]:
    """The device check's matrix. A dry run (CPU) runs three of its cases (each UNet, each ZeRO stage, every
    variant but xformers' under ZeRO-3) at the tiny presets' sizes in bf16, UNet 2 under ZeRO-3 compiled with the
    aot_eager backend (inductor's cold compile takes minutes on a CPU): the plumbing, not the figures."""
    from tryon_ds.config import preset as preset_config

    out = []
    tiny = {1: ("tiny", 32), 2: ("tiny-sr", 64), 3: ("tiny-sr3", 128)}
    # UNet 3 trains on the 256 px crops of its preset, whatever its image size.
    for preset, unet, batch in (("base", 1, 16), ("sr", 2, 8), ("sr1024", 3, 16)):
        for precision in ("bf16", "fp16"):
            for zero in (2, 3):
                variants = [{"attention": "sdpa"}]
                if preset_config(preset).ARCH == "parallel":  # the Efficient-UNet has no attention to vary
                    variants.append({"attention": "xformers"})
                if (preset, precision, zero) == ("base", "bf16", 2):
                    variants.append({"attention": "sdpa", "channels_last": True})
                case = {"preset": preset, "unet": unet, "batch": batch, "precision": precision, "zero": zero,
                        "ds": f"zero{zero}_{precision}.json", "variants": variants, "size": (128, 256, 1024)[unet - 1]}
                if dry_run:
                    if precision == "fp16" or (unet, zero) not in ((1, 2), (2, 3), (3, 2)):
                        continue  # DeepSpeed runs fp16 on GPUs only
                    case.update(preset=tiny[unet][0], batch=2, size=tiny[unet][1], ds=f"cpu_zero{zero}.json")
                # Compiled (a case of its own), against the eager sdpa row beside it.
                compiled = {**case, "compile": "aot_eager" if dry_run else "inductor",
                            "variants": [{"attention": "sdpa", "compile": True}]}
                if dry_run:
                    out.append(compiled if (unet, zero) == (2, 3) else case)
                else:
                    out += [case, compiled] if precision == "bf16" else [case]
    return out


def table(rows: list[dict]) -> str:
    head = (f"{'preset':<7}{'unet':>5}{'batch':>6} {'prec':<5}{'ZeRO':>5} {'attention':<20}{'it/s':>7}{'samples/s':>11}"
            f"{'peak GiB':>10}{'planned':>9}{'TFLOP/step':>11}{'MFU':>7}  losses")
    lines = [head]
    for r in rows:
        attn = (r.get("attention", "") + (" channels_last" if r.get("channels_last") else "")
                + (" compiled" if r.get("compile") else ""))
        left = f"{r['preset']:<7}{r['unet']:>5}{r['batch']:>6} {r['precision']:<5}{r['zero']:>5} {attn:<20}"
        if "skipped" in r or "case_failed" in r:
            lines.append(left + (f"skipped: {r['skipped']}" if "skipped" in r else "FAILED (see the JSON)"))
            continue
        peak = f"{r['peak_gib']:10.1f}" if "peak_gib" in r else f"{'-':>10}"
        flops = f"{r['flops_per_step'] / 1e12:11.1f}" if r.get("flops_per_step") else f"{'-':>11}"
        mfu = f"{100 * r['mfu']:6.1f}%" if r.get("mfu") else f"{'-':>7}"
        lines.append(left + f"{r['it_s']:7.2f}{r['samples_per_s']:11.1f}{peak}{r['planned_gib']:9.1f}{flops}{mfu}  "
                     + ("finite" if r["losses_finite"] else "NOT FINITE"))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--log-freq", type=int, default=10)
    p.add_argument("--gpu", action="store_true", help="the GPU matrix (base/sr, bf16/fp16, ZeRO-2/3, attention)")
    p.add_argument("--dry-run", action="store_true", help="with --gpu: the same matrix, tiny and on CPU")
    p.add_argument("--json", help="write every result here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.gpu:
        rows = []
        for case in gpu_cases(args.dry_run):
            base = {k: case[k] for k in ("preset", "unet", "batch", "precision", "zero")}
            rows += [{**base, **r} for r in launch(case, 1 if args.dry_run else args.ranks, args.steps, args.log_freq)]
            print(table(rows).splitlines()[-1], flush=True)
        print(table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        failed = [r for r in rows if "case_failed" in r or not r.get("losses_finite", True)]
        sys.exit(1 if failed else 0)
    mib = 2 ** 20
    print(f"{args.ranks} rank(s), CPU, fp32; MiB per rank as measured (planned by tools/plan_memory.py in brackets)")
    print("preset  params   ZeRO  ckpt   step s  samples/s   params        grads         master        moments")
    for preset_name, batch in CPU_CASES:
        for zero in (0, 2, 3):
            for ckpt in (False, True):
                case = {"preset": preset_name, "unet": 1, "batch": batch, "precision": "fp32", "ds": f"cpu_zero{zero}.json",
                        "checkpointing": ckpt, "variants": [{"attention": "sdpa"}]}
                r = launch(case, args.ranks, args.steps, args.log_freq)[0]
                if "case_failed" in r:
                    raise SystemExit(f"benchmark case {case} failed:\n{r['case_failed']}")
                from tryon_ds.planner import model_states

                planned = list(model_states(r["params"], zero, "fp32", args.ranks,
                                            json.loads((REPO / "ds_configs" / case["ds"]).read_text())).values())
                cells = "".join(f"  {got / mib:5.1f} ({want / mib:5.1f})"
                                for got, want in zip(r["states"].values(), planned))
                print(f"{preset_name:<7} {r['params'] / 1e6:5.2f}M  {zero:>4}  {str(ckpt):<5}  {r['step_s']:6.3f}  "
                      f"{r['samples_per_s']:9.1f} {cells}")


if __name__ == "__main__":
    main()
