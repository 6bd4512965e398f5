"""Our Parallel-UNet beside the closest public implementation, fashn-AI/tryondiffusion, at one architecture:
the training step (forward and backward of the diffusion loss) and the memory it takes: theirs as they ship
it, ours attending on every pixel (the paper's, our default) and on 2x2 patches at the highest attending
level (``attn_patch: 2``, their choice), eager; with --compile each of ours compiled too, with
--channels-last each of ours on NHWC activations too, with --compile-theirs theirs compiled.

Their code is not part of this project: clone it and name the folder (it needs torch and einops; their
package's other imports, of their trainer and of torchvision's image transforms, are not loaded).

    git clone https://github.com/fashn-AI/tryondiffusion /tmp/fashn-tryondiffusion
    python tools/bench/reference.py --theirs /tmp/fashn-tryondiffusion               # 64 px, dim 64, batch 4
    python tools/bench/reference.py --theirs /tmp/fashn-tryondiffusion --dim 128 --size 128

The architecture: person- and garment-UNets of three levels (widths dim x 1/2/4) at --size, two residual
blocks per level, self-attention (with the pose tokens) and cross-attention to the garment at the two lowest
levels, 18 keypoints, 4 heads of 32, conditioning width 256. They attend on 2x2 patches at 32 px (their
patch size is the level's side / 16), we on every pixel unless attn_patch says otherwise. Each model runs
in a process of its own with --threads threads: the step time is the mean of --reps steps after two warm-up
steps (the first compiles); the memory is the peak of the tensors allocated during one more step above what was
allocated before it (CUDA: the allocator's counter; CPU: torch.profiler's record of allocations and frees).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # a script run from a fresh clone: the repository's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import json
import subprocess
import tempfile
import time
import types

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

HEADS, DIM_HEAD, COND_DIM, POSE_DIM, KEYPOINTS = 4, 32, 256, 128, 18


def peak_memory_gib(step, device: torch.device) -> float:
    """The most memory allocated at once during one ``step()`` above what was allocated before it: CUDA's
    allocator counter; on a CPU the allocations and frees torch.profiler records (the resident set would
    count what the C allocator keeps cached)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**30
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    # each allocation and free is an event carrying the running total since the profile started
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0) / 2**30


def ours(dim: int, size: int, batch: int, device: torch.device, compiled: bool, patch: int = 1,
         channels_last: bool = False):
    from tryon_ds.cascade import CascadeUNet
    from tryon_ds.config import build_config, read_config_file
    from tryon_ds.cascade import random_batch

    unet = {"preset": "tiny", "dim": dim, "dim_mults": [1, 2, 4], "num_res_blocks": [2, 2, 2],
            "attn_levels": [False, True, True], "attn_heads": HEADS, "attn_dim_head": DIM_HEAD,
            "cond_dim": COND_DIM, "pose_dim": POSE_DIM, "num_keypoints": KEYPOINTS, "compile": compiled,
            "attn_patch": patch, "channels_last": channels_last}
    repo = Path(__file__).resolve().parents[2]
    config = build_config({**read_config_file(repo / "configs" / "tiny.yaml"), "base_image_size": [size, size],
                           "unet1": unet})
    model = CascadeUNet(config, 1).to(device)
    model.compile_unet()
    data = {k: v.to(device) for k, v in random_batch(config, 1, batch, torch.Generator().manual_seed(0)).items()}
    return model, lambda: model(data)


def theirs(repo: Path, dim: int, size: int, batch: int, device: torch.device, compiled: bool):
    try:
        import torchvision  # noqa: F401  (their module imports its transforms for TryOnImagen's resizing)
    except Exception:  # not installed, or (as beside a CPU torch build) it fails to load
        transforms = types.ModuleType("torchvision.transforms")
        transforms.ToPILImage = None
        sys.modules["torchvision"] = types.SimpleNamespace(transforms=transforms)
        sys.modules["torchvision.transforms"] = transforms
    package = types.ModuleType("tryondiffusion")  # their __init__ imports their trainer (accelerate, ...)
    package.__path__ = [str(repo / "tryondiffusion")]
    sys.modules["tryondiffusion"] = package
    from tryondiffusion.tryondiffusion import ParallelUNet

    model = ParallelUNet(image_size=(size, size), dim=dim, feature_channels=(dim, 2 * dim, 4 * dim),
                         num_blocks=(2, 2, 2), layer_attns=(False, True, True), layer_cross_attns=(False, True, True),
                         attn_heads=(None, HEADS, HEADS), attn_dim_head=(None, DIM_HEAD, DIM_HEAD),
                         context_dim=COND_DIM, time_cond_dim=COND_DIM, pose_num_latents=KEYPOINTS,
                         max_keypoints_len=KEYPOINTS).to(device)
    g = torch.Generator().manual_seed(0)

    def image():
        return (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)

    def times():
        return torch.rand(batch, generator=g).to(device)

    inputs = dict(noisy_images=image(), time=times(), ca_images=image(), ca_noise_times=times(),
                  garment_images=image(), garment_noise_times=times(),
                  person_poses=torch.rand(batch, KEYPOINTS, 2, generator=g).to(device),
                  garment_poses=torch.rand(batch, KEYPOINTS, 2, generator=g).to(device))
    noise = image()
    unet = torch.compile(model) if compiled else model
    return model, lambda: F.mse_loss(unet(**inputs), noise)


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker == "ours":
        model, loss_fn = ours(args.dim, args.size, args.batch, device, args.compiled, args.attn_patch,
                              args.channels_last_worker)
    else:
        model, loss_fn = theirs(Path(args.theirs), args.dim, args.size, args.batch, device, args.compiled)

    def step():
        model.zero_grad(set_to_none=False)  # gradients kept between steps, as a trainer's are
        loss = loss_fn()
        loss.backward()
        return loss

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    step()
    start = time.perf_counter()
    for _ in range(args.reps):
        loss = step()
    float(loss)
    seconds = (time.perf_counter() - start) / args.reps
    peak = peak_memory_gib(step, device)
    with FlopCounterMode(display=False) as counter:  # the convolutions: what the two architectures differ in most
        step()
    conv = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    name = {"theirs": "theirs"}.get(args.worker, "ours, 2x2 patches" if args.attn_patch == 2 else "ours")
    name += " compiled" * args.compiled + " channels_last" * args.channels_last_worker
    return {"model": name, "step_s": seconds, "first_step_s": first,
            "peak_gib": peak, "conv_gflop": conv / 1e9, "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--theirs", required=True, help="a clone of github.com/fashn-AI/tryondiffusion")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also each of ours under torch.compile")
    p.add_argument("--channels-last", action="store_true", help="also each of ours on channels-last activations")
    p.add_argument("--compile-theirs", action="store_true", help="also their UNet under torch.compile")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--attn-patch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--channels-last-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if not (Path(args.theirs) / "tryondiffusion" / "tryondiffusion.py").is_file():
        raise SystemExit(f"--theirs {args.theirs}: no tryondiffusion/tryondiffusion.py there; expected a clone of "
                         "github.com/fashn-AI/tryondiffusion")
    ours_runs = [["--attn-patch", str(patch)] + ["--compiled"] * compiled + ["--channels-last-worker"] * nhwc
                 for compiled in (False, True)[:1 + args.compile]
                 for nhwc in (False, True)[:1 + args.channels_last] for patch in (1, 2)]
    runs = [["--worker", "theirs"]] + [["--worker", "ours"] + r for r in ours_runs]
    runs += [["--worker", "theirs", "--compiled"]] * args.compile_theirs
    rows = []
    for run in runs:
        cmd = [sys.executable, __file__, *run, "--theirs", args.theirs, "--dim", str(args.dim), "--size",
               str(args.size), "--batch", str(args.batch), "--threads", str(args.threads), "--reps", str(args.reps)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(run)} failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{row['model']:<34} {row['params'] / 1e6:6.2f}M params  step {row['step_s']:.3f} s  "
              f"(first {row['first_step_s']:.1f} s)  peak {row['peak_gib']:.3f} GiB  convolutions "
              f"{row['conv_gflop']:.1f} GFLOP", flush=True)
    reference = rows[0]
    for row in rows[1:]:
        print(f"{row['model']:<34} / theirs: step {row['step_s'] / reference['step_s']:.2f}x, "
              f"peak memory {row['peak_gib'] / reference['peak_gib']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
