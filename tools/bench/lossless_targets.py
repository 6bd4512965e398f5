#!/usr/bin/env python
"""What storing the evaluation's targets as JPEG q95 did to them: each photo (a release's own files, e.g.
VITON-HD's 1024x768 test images) decoded as it is, or letterboxed to ``--shard-size`` as tools/make_shards.py
does, against the same pixels encoded at ``--quality`` and decoded again (what make_shards stored before test
splits became PNG), both brought to each size as tools/evaluate.py brings targets (PIL's Lanczos). A
release's own JPEG re-encoded at its own size loses little (its blocks are already quantised); an image
resized first is a fresh encoding. Prints per size the mean SSIM (the field's convention,
tryon_ds/metrics.py), PSNR and, with the weight files, LPIPS between the two: how far a perfect try-on would
have scored from 1, infinity and 0 against the q95 target.

    python tools/bench/lossless_targets.py person/*.jpg --size 1024x768 --size 512x384 --size 256x192
    python tools/bench/lossless_targets.py person/*.jpg --shard-size 512x384 --size 512x384 --size 256x192
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # a script run from a fresh clone: the repository's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import io

import torch
from PIL import Image

from tryon_ds import metrics
from tryon_ds.data.preprocess import letterbox, pixels
from tryon_ds.evaluation import psnr
from tryon_ds.cli import parse_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+")
    p.add_argument("--size", type=parse_size, action="append", default=[], metavar="HxW")
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--shard-size", type=parse_size, metavar="HxW", help="letterbox to this size first")
    p.add_argument("--lpips-net", choices=tuple(metrics.LPIPS_NETS), default="alex")
    for kind in ("alexnet", "squeezenet", "vgg16", "lpips"):
        p.add_argument(metrics.WEIGHT_FILES[kind].flag)
    args = p.parse_args()
    trunk = metrics.LPIPS_NETS[args.lpips_net].weights
    files = {kind: metrics.weight_path(kind, getattr(args, metrics.WEIGHT_FILES[kind].flag.lstrip("-")))
             for kind in (trunk, "lpips")}
    lpips = (metrics.LPIPS.from_files(args.lpips_net, files[trunk], files["lpips"], torch.device("cpu"))
             if all(files.values()) else None)
    originals, stored = [], []
    for path in args.images:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        if args.shard_size:
            rgb = letterbox(rgb, args.shard_size)[0]
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=args.quality)
        originals.append(pixels(rgb))
        stored.append(pixels(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    shapes = {tuple(x.shape) for x in originals}
    if len(shapes) > 1:
        raise SystemExit(f"the photos differ in size ({sorted(shapes)}); give photos of one size")
    sizes = args.size or [tuple(originals[0].shape[-2:])]
    print(f"{len(originals)} photo(s) of {originals[0].shape[-2]}x{originals[0].shape[-1]}, JPEG q{args.quality} "
          f"against the photo itself; LPIPS {args.lpips_net if lpips else 'skipped (no weight files given)'}")
    print(f"{'size':>10}{'SSIM':>10}{'1 - SSIM':>10}{'PSNR dB':>10}{'LPIPS':>10}")
    real, q = torch.stack(originals), torch.stack(stored)
    for size in sizes:
        a, b = metrics.to_unit(metrics.resize_to(real, size)), metrics.to_unit(metrics.resize_to(q, size))
        ssim = float(metrics.ssim(b, a).mean())
        db = float(psnr(b, a, torch.ones_like(a[:, :1])).mean())
        lp = f"{float(lpips(b * 2 - 1, a * 2 - 1).mean()):10.4f}" if lpips else f"{'-':>10}"
        print(f"{size[0]:>5}x{size[1]:<4}{ssim:10.4f}{1 - ssim:10.4f}{db:10.2f}{lp}")


if __name__ == "__main__":
    main()
