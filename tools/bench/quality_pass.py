"""What a quality pass (tryon_ds/training/quality.py) costs per held-out sample, per UNet of a cascade: the
FLOPs of sampling one image (tryon_ds/perf.py's ``sample_flops``: the UNet's sampling steps, a forward of the
denoiser each at the whole image size, two with classifier-free guidance), its seconds on a GPU at an
efficiency of the datasheet peak, and, where the UNet is small enough to run here, the seconds it takes on
this machine (sampling a chunk of ``batch_size`` images as the pass does, random weights and inputs).

    python tools/bench/quality_pass.py                                   # tiny cascade measured, the paper's counted
    python tools/bench/quality_pass.py --configs configs/tiny.yaml --repeats 3
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # a script run from a fresh clone: the repository's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import statistics
import time

import torch

from tryon_ds.cascade import CascadeUNet, random_batch
from tryon_ds.config import build_config, find_config_file, read_config_file
from tryon_ds.perf import datasheet_peak, sample_flops

MEASURABLE = 1e11  # sampling FLOPs per image below which this machine measures the UNet too


def seconds_per_sample(config, number: int, repeats: int) -> float:
    """Median seconds per image of sampling a chunk of ``batch_size`` images, eager, fp32, on the CPU."""
    model = CascadeUNet(config, number).eval()
    batch = random_batch(config, number, config.batch_size, torch.Generator().manual_seed(0))
    cond = {k: batch[k] for k in model.conditioning.keys}  # a low-res input at the previous UNet's whole size
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model.sample(cond, generator=torch.Generator().manual_seed(1))
            times.append((time.perf_counter() - start) / config.batch_size)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["configs/tiny.yaml", "configs/cascade1024.yaml"])
    p.add_argument("--gpu", default="H100 SXM")
    p.add_argument("--mfu", type=float, default=0.35, help="efficiency of the GPU estimate (an assumption)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    peak = datasheet_peak(args.gpu, "bf16")
    print(f"per held-out sample; GPU: {args.gpu} bf16 at {100 * args.mfu:.0f}% of its {peak / 1e12:g} TFLOP/s "
          f"(assumed); CPU: this machine, {torch.get_num_threads()} threads, fp32, eager")
    print(f"{'config':<24} {'UNet':>4} {'preset':<9} {'size':>9} {'steps':>5} {'guided':>6} {'GFLOP':>9} "
          f"{'GPU ms':>8} {'CPU s':>8}")
    for path in args.configs:
        config = build_config(read_config_file(find_config_file(path)))
        for number in config.unet_numbers:
            flops = sample_flops(config, number)
            guided = config.conditioning(number).guided and config.diffusion.guidance != 1.0
            cpu = seconds_per_sample(config, number, args.repeats) if flops < MEASURABLE else None
            size = "x".join(map(str, config.image_size(number)))
            print(f"{path:<24} {number:>4} {config.unet(number).preset:<9} {size:>9} "
                  f"{config.unet(number).sample_steps:>5} {'yes' if guided else 'no':>6} {flops / 1e9:9.1f} "
                  f"{1e3 * flops / (peak * args.mfu):8.2f} " + (f"{cpu:8.3f}" if cpu is not None else f"{'-':>8}"))


if __name__ == "__main__":
    main()
