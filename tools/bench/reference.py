"""Our Parallel-UNet beside the closest public implementation, fashn-AI/tryondiffusion, at one architecture:
the training step (forward and backward of the diffusion loss) and the memory it takes, ours eager and
compiled, theirs as they ship it (and compiled, with --compile-theirs).

Their code is not part of this project: clone it and name the folder (it needs torch and einops; their
package's other imports, of their trainer and of torchvision's image transforms, are not loaded).

    git clone https://github.com/fashn-AI/tryondiffusion /tmp/fashn-tryondiffusion
    python tools/bench/reference.py --theirs /tmp/fashn-tryondiffusion                  # 64 px, dim 64, batch 4
    python tools/bench/reference.py --theirs /tmp/fashn-tryondiffusion --dim 128 --size 128

The architecture: person- and garment-UNets of three levels (widths dim x 1/2/4) at --size, two residual
blocks per level, self-attention (with the pose tokens) and cross-attention to the garment at the two lowest
levels, 18 keypoints, 4 heads of 32, conditioning width 256. They attend on 2x2 patches at 32 px (their
patch size is the level's side / 16), we attend on every pixel (the paper's). Each model runs in a process
of its own with --threads threads: the step time is the mean of --reps steps after two warm-up steps (the
first compiles); the memory is the peak over those steps above what the process held before them (CPU: the
resident set, sampled every millisecond; CUDA: allocated bytes).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # a script run from a fresh clone: the repository's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import json
import subprocess
import threading
import time
import types

import torch
import torch.nn.functional as F

HEADS, DIM_HEAD, COND_DIM, POSE_DIM, KEYPOINTS = 4, 32, 256, 128, 18


class _PeakMemory:
    """Peak memory above the level at entry: CUDA's allocator counter, or the resident set sampled."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        process = psutil.Process()
        self.base = self.peak = process.memory_info().rss
        self.running = True

        def sample():
            while self.running:
                self.peak = max(self.peak, process.memory_info().rss)
                time.sleep(0.001)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()

    @property
    def gib(self) -> float:
        return (self.peak - self.base) / 2**30


def ours(dim: int, size: int, batch: int, device: torch.device, compiled: bool):
    from tryon_ds.cascade import CascadeUNet
    from tryon_ds.config import build_config, read_config_file
    from tryon_ds.cascade import random_batch

    unet = {"preset": "tiny", "dim": dim, "dim_mults": [1, 2, 4], "num_res_blocks": [2, 2, 2],
            "attn_levels": [False, True, True], "attn_heads": HEADS, "attn_dim_head": DIM_HEAD,
            "cond_dim": COND_DIM, "pose_dim": POSE_DIM, "num_keypoints": KEYPOINTS, "compile": compiled}
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
    build = ours if args.worker == "ours" else (lambda *a: theirs(Path(args.theirs), *a))
    model, loss_fn = build(args.dim, args.size, args.batch, device, args.compiled)

    def step():
        model.zero_grad(set_to_none=False)  # gradients kept between steps, as a trainer's are
        loss = loss_fn()
        loss.backward()
        return loss

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    step()
    with _PeakMemory(device) as memory:
        start = time.perf_counter()
        for _ in range(args.reps):
            loss = step()
        float(loss)
        seconds = (time.perf_counter() - start) / args.reps
    return {"model": args.worker, "compiled": args.compiled, "step_s": seconds, "first_step_s": first,
            "peak_gib": memory.gib, "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--theirs", required=True, help="a clone of github.com/fashn-AI/tryondiffusion")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compile-theirs", action="store_true", help="also their UNet under torch.compile")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if not (Path(args.theirs) / "tryondiffusion" / "tryondiffusion.py").is_file():
        raise SystemExit(f"--theirs {args.theirs}: no tryondiffusion/tryondiffusion.py there; expected a clone of "
                         "github.com/fashn-AI/tryondiffusion")
    runs = [("theirs", False), ("ours", False), ("ours", True)] + [("theirs", True)] * args.compile_theirs
    rows = []
    for name, compiled in runs:
        cmd = [sys.executable, __file__, "--worker", name, "--theirs", args.theirs,
               "--dim", str(args.dim), "--size", str(args.size), "--batch", str(args.batch),
               "--threads", str(args.threads), "--reps", str(args.reps)] + ["--compiled"] * compiled
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name}{' compiled' if compiled else ''} failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{name + (' compiled' if compiled else ''):<16} {row['params'] / 1e6:6.2f}M params  step "
              f"{row['step_s']:.3f} s  (first {row['first_step_s']:.1f} s)  peak {row['peak_gib']:.3f} GiB", flush=True)
    reference = rows[0]
    for row in rows[1:]:
        print(f"{row['model'] + (' compiled' if row['compiled'] else ''):<16} / theirs: step "
              f"{row['step_s'] / reference['step_s']:.2f}x, peak memory {row['peak_gib'] / reference['peak_gib']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
