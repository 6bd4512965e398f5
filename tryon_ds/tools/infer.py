"""Try a garment on a person with a trained cascade bundle.

One pair (the original training guide's command line):
    python tools/infer.py --checkpoint bundle/ --ca_image ca.jpg --garment_image garment.jpg \\
        --person_pose person.npy --garment_pose garment.npy --output result.jpg
Validation samples from shards, in batches, with a grid (ca | garment | result | target):
    python tools/infer.py --checkpoint bundle/ --shards 'shards/val-*.tar' --max-samples 8 --output_dir results/

Poses are .npy arrays (K, 2) or (K, 3) or OpenPose JSON, in the pixels of their image; leave out
--garment_pose for a flat product image. Runs UNet 1, then every later UNet the bundle holds (UNet 2 to
256 px, UNet 3 to 1024 px), each super-resolving the one before.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from PIL import Image

from .. import atomic
from ..batch import CA, GARMENT, PERSON
from ..cli import exit_on_user_error
from ..data.preprocess import image_grid, to_device, to_image
from ..diffusion import SAMPLERS
from ..errors import UserError
from ..inference import TryOnPipeline, safe_name


def run_shards(pipe: TryOnPipeline, args, options: dict) -> None:
    out_dir = Path(args.output_dir)
    last = pipe.last
    rows, done = [], 0
    for conds in pipe.shard_batches(args.shards, args.batch_size, limit=args.max_samples):
        results = pipe.generate(conds, **options)
        for i, key in enumerate(conds[last]["key"]):
            atomic.save_image(to_image(results[last][i]), out_dir / f"{safe_name(key)}.png")
        c = to_device(conds[last], torch.device("cpu"))
        rows.append(image_grid([c[CA], c[GARMENT], results[last].cpu(), c[PERSON]]))
        done += len(conds[last]["key"])
    if not rows:
        raise UserError(f"no sample could be read from {args.shards}")
    grid = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)))
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    atomic.save_image(grid, out_dir / "grid.png")
    print(f"{done} try-on result(s) at {pipe.output_size} in {out_dir}; grid (ca | garment | "
          f"result | target) in {out_dir / 'grid.png'}")


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a bundle folder from tools/consolidate_checkpoint.py")
    p.add_argument("--config", help="accepted for the original training guide's command line; the bundle's own config is used")
    p.add_argument("--ca_image")
    p.add_argument("--garment_image")
    p.add_argument("--person_pose")
    p.add_argument("--garment_pose")
    p.add_argument("--output", help="result image (one pair)")
    p.add_argument("--shards", help="validation shards to try on, instead of one pair")
    p.add_argument("--max-samples", type=int, default=8, metavar="N", help="with --shards: the first N samples")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--output_dir", default="results")
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile every UNet (or --no-compile: none); default: as each was trained")
    p.add_argument("--steps", type=int, nargs="+", metavar="N",
                   help="sampling steps: one number for every UNet, or one per UNet (--steps 256 128 32)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance weight (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.config:
        warnings.warn("--config is ignored: the bundle carries the config it was trained with")
    pipe = TryOnPipeline.from_pretrained(args.checkpoint, args.device, ema=args.ema, compile=args.compile)
    options = {"sampler": args.sampler, "steps": pipe.steps_per_unet(args.steps), "guidance": args.guidance,
               "seed": args.seed}
    if args.shards:
        return run_shards(pipe, args, options)
    missing = [f"--{n}" for n in ("ca_image", "garment_image", "person_pose", "output") if not getattr(args, n)]
    if missing:
        raise UserError(f"give {', '.join(missing)} (or --shards for validation samples)")
    result = pipe(args.ca_image, args.garment_image, args.person_pose, args.garment_pose, **options)
    atomic.save_image(result, Path(args.output))
    print(f"wrote {args.output} ({result.width}x{result.height})")


if __name__ == "__main__":
    main()
