"""Convert a try-on data set into WebDataset tar shards for training.

    python tools/make_shards.py data/ --out shards/                  # the folders layout (README)
    python tools/make_shards.py VITON-HD/ --out shards/ --workers 8  # the VITON-HD release
    python tools/make_shards.py --synthetic 2000 --out shards/       # a procedural set, no download

Writes OUT/train-NNNNNN.tar, OUT/val-NNNNNN.tar and OUT/manifest.json. Every sample is checked first: any
problem is listed with its file and nothing is written (exit 2), unless --skip-bad. Re-running into the
same folder keeps the shards already finished.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from ..cli import exit_on_user_error
from ..errors import UserError
from ..data import sources
from ..data.shards import ShardOptions, write_shards


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", text)
    if not m or int(m.group(1)) < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIZE or HxW in pixels, e.g. 256 or 256x192")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 500M or 1G")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()])


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="input folder (the folders layout or VITON-HD)")
    p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--layout", choices=("auto", "folders", "viton-hd"), default="auto")
    p.add_argument("--synthetic", type=int, metavar="N", help="write N procedural samples instead of a folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic set")
    p.add_argument("--image-size", type=parse_size, default=(256, 256), help="SIZE or HxW (default 256)")
    p.add_argument("--jpeg-quality", type=int, default=95, choices=range(1, 101), metavar="1..100")
    p.add_argument("--num-keypoints", type=int, default=18)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--shard-bytes", type=parse_bytes, default=parse_bytes("1G"), help="bytes per shard (1G)")
    p.add_argument("--workers", type=int, default=1, help="processes converting in parallel")
    p.add_argument("--skip-bad", action="store_true", help="write the good samples and report the bad ones")
    args = p.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction}: expected a fraction in [0, 1)")
    if args.shard_size < 1:
        raise UserError(f"--shard-size {args.shard_size}: expected at least 1 sample per shard")

    problems: list[str] = []
    if args.synthetic is not None:
        if args.source:
            raise UserError("give either a source folder or --synthetic N, not both")
        if args.synthetic < 1:
            raise UserError(f"--synthetic {args.synthetic}: expected at least 1 sample")
        layout, source = "synthetic", f"synthetic(seed={args.seed})"
        # Rendered at 256 px or more and letterboxed down, so small shards are anti-aliased.
        samples = sources.synthetic_samples(args.synthetic, args.seed, max(256, *args.image_size))
    else:
        if not args.source:
            raise UserError("give a source folder, or --synthetic N")
        root = Path(args.source)
        if not root.is_dir():
            raise UserError(f"source folder {root} does not exist")
        layout = sources.detect_layout(root) if args.layout == "auto" else args.layout
        source = str(root.resolve())
        scan = sources.scan_viton_hd if layout == "viton-hd" else sources.scan_folders
        samples, problems = scan(root)
        if not samples and not problems:
            raise UserError(f"{root}: no samples found in the {layout} layout")
    opts = ShardOptions(image_size=args.image_size, jpeg_quality=args.jpeg_quality,
                        num_keypoints=args.num_keypoints, val_fraction=args.val_fraction,
                        shard_samples=args.shard_size, shard_bytes=args.shard_bytes, layout=layout, source=source)
    start = time.perf_counter()
    manifest = write_shards(Path(args.out), samples, opts, workers=args.workers, skip_bad=args.skip_bad,
                            validate=layout != "synthetic", scan_problems=problems)
    elapsed = time.perf_counter() - start
    n = sum(manifest["samples"].values())
    print(f"{n} samples ({manifest['samples']['train']} train, {manifest['samples']['val']} val) in "
          f"{sum(len(v) for v in manifest['shards'].values())} shards under {args.out} "
          f"({elapsed:.1f} s, {n / max(elapsed, 1e-9):.1f} samples/s)")


if __name__ == "__main__":
    main()
