"""Samplers side by side on one bundle: the cascade's garment-region PSNR/SSIM (and whole-image PSNR) on the
same held-out pairs, with the same per-sample noise, for DDIM and DPM-Solver++(2M) at several step counts,
and the seconds each took.

    python tools/bench/sampling.py --checkpoint runs/demo/bundle --shards 'runs/demo/shards/val-*.tar' \\
        --pairs 32 --steps 10 25 50
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # a script run from a fresh clone: the repository's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import time

import torch

from tryon_ds.cli import exit_on_user_error
from tryon_ds.data.preprocess import to_device
from tryon_ds.evaluation import QualityTable, tryon_candidates
from tryon_ds.inference import TryOnPipeline


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50], help="steps for every UNet")
    p.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp"])
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pipe = TryOnPipeline.from_pretrained(args.checkpoint)
    batches = list(pipe.shard_batches(args.shards, args.batch_size, limit=args.pairs))
    last = pipe.last
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.pairs} pairs at "
          f"{'x'.join(map(str, pipe.output_size))}, UNets {list(pipe.unets)}")
    print(f"{'sampler':<8}{'steps':>6}{'seconds':>9}{'PSNR':>8}{'region PSNR':>13}{'region SSIM':>13}")
    for steps in args.steps:
        for sampler in args.samplers:
            table = QualityTable()
            start = time.perf_counter()
            for conds in batches:
                made = pipe.generate(conds, sampler=sampler, steps=(steps,), guidance=args.guidance, seed=args.seed,
                                     keys=conds[last]["key"])[last]
                batch = to_device(conds[last], torch.device("cpu"))
                table.add({"try-on": made, **dict(list(tryon_candidates(made, batch).items())[1:])}, batch)
            seconds = time.perf_counter() - start
            row = table.rows()["try-on"]
            print(f"{sampler:<8}{steps:>6}{seconds:>9.1f}{row['psnr']:>8.2f}{row['psnr_region']:>13.2f}"
                  f"{row['ssim_region']:>13.3f}", flush=True)


if __name__ == "__main__":
    main()
