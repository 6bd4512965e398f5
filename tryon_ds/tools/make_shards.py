"""Convert a try-on data set into WebDataset tar shards for training.

    python tools/make_shards.py data/ --out shards/                  # the folders layout (README)
    python tools/make_shards.py VITON-HD/ --out shards/ --workers 8  # the VITON-HD release
    python tools/make_shards.py DressCode/ --out shards/ --categories upper_body dresses  # DressCode
    python tools/make_shards.py --synthetic 2000 --out shards/       # a procedural set, no download
    python tools/make_shards.py photos/ --out shards/ --category upper_body    # your photos, parsed (README)

Writes OUT/train-NNNNNN.tar, OUT/val-NNNNNN.tar, OUT/test-NNNNNN.tar (a release's own test split) and
OUT/manifest.json. Every sample is checked first: any
problem is listed with its file and nothing is written (exit 2), unless --skip-bad. Re-running into the
same folder keeps the shards already finished.

On many machines at once (slurm/make_shards.sh runs one part per array task):

    python tools/make_shards.py VITON-HD/ --out shards/ --part 3 --parts 16   # 1/16 of the samples, by key hash
    python tools/make_shards.py --merge --out shards/                         # once every part is done

Each part writes split-pNNNN-MMMMMM.tar and manifest.part-NNNN.json; the splits do not depend on the
number of parts, and a failed part re-run into the same folder redoes only itself.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..cli import exit_on_user_error, parse_bytes, parse_size
from ..errors import UserError
from ..data import agnostic, sources
from ..data.shards import SPLITS, Part, ShardOptions, merge_parts, preview_sheet, write_shards


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="input folder (the folders layout, VITON-HD or DressCode)")
    p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--layout", choices=("auto", *sources.LAYOUTS), default="auto")
    p.add_argument("--categories", nargs="+", choices=agnostic.CATEGORIES, default=list(agnostic.CATEGORIES),
                   help="DressCode categories to convert (default: all three)")
    p.add_argument("--category", choices=agnostic.CATEGORIES,
                   help="the parsed layout: every garment's category, where pairs.txt has no third column")
    p.add_argument("--label-set", choices=sorted(agnostic.LABEL_SETS),
                   help="the parsed layout: the human parser's labels (ATR: 18, LIP/CIHP: 20); default: from the maps")
    p.add_argument("--synthetic", type=int, metavar="N", help="write N procedural samples instead of a folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic set")
    p.add_argument("--image-size", type=parse_size, default=(256, 256), help="SIZE or HxW (default 256)")
    p.add_argument("--jpeg-quality", type=int, default=95, choices=range(1, 101), metavar="1..100")
    p.add_argument("--num-keypoints", type=int, default=18)
    p.add_argument("--val-fraction", type=float, default=0.05, help="of the training split (default 0.05)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--shard-bytes", type=parse_bytes, default=parse_bytes("1G"), help="bytes per shard (1G)")
    p.add_argument("--workers", type=int, default=1, help="processes converting in parallel")
    p.add_argument("--skip-bad", action="store_true", help="write the good samples and report the bad ones")
    p.add_argument("--preview", metavar="PNG", help="also draw the first samples (person | ca | garment) here")
    p.add_argument("--part", type=int, help="write only this part (0-based) of --parts, by key hash")
    p.add_argument("--parts", type=int, help="how many parts the conversion is split into")
    p.add_argument("--merge", action="store_true", help="write OUT/manifest.json from the parts written there")
    args = p.parse_args(argv)
    if args.merge:
        if args.source or args.synthetic is not None or args.part is not None:
            raise UserError("--merge takes only --out: the folder the parts were written into")
        merge_parts(Path(args.out))
        return
    if (args.part is None) != (args.parts is None):
        raise UserError("give --part and --parts together (e.g. --part 0 --parts 4)")
    part = Part(args.part, args.parts) if args.parts is not None else None
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction}: expected a fraction in [0, 1)")
    if args.shard_size < 1:
        raise UserError(f"--shard-size {args.shard_size}: expected at least 1 sample per shard")

    if args.synthetic is not None:
        if args.source:
            raise UserError("give either a source folder or --synthetic N, not both")
        if args.synthetic < 1:
            raise UserError(f"--synthetic {args.synthetic}: expected at least 1 sample")
        layout, source = "synthetic", f"synthetic(seed={args.seed})"
        # Rendered at 256 px or more and letterboxed down, so small shards are anti-aliased.
        scan = sources.Scan(sources.synthetic_samples(args.synthetic, args.seed, max(256, *args.image_size)), [],
                            sources={"train": source})
    else:
        if not args.source:
            raise UserError("give a source folder, or --synthetic N")
        root = Path(args.source)
        if not root.is_dir():
            raise UserError(f"source folder {root} does not exist")
        if args.layout == "auto":
            layout, evidence = sources.detect_layout(root)
            print(f"layout: {layout} (found {evidence})")
        else:
            layout = args.layout
        source = str(root.resolve())
        scan = {"folders": sources.scan_folders, "viton-hd": sources.scan_viton_hd,
                "dresscode": lambda r: sources.scan_dresscode(r, tuple(args.categories)),
                "parsed": lambda r: sources.scan_parsed(r, args.category, args.label_set)}[layout](root)
        for note in scan.notes:
            print(f"note: {note}")
    opts = ShardOptions(image_size=args.image_size, jpeg_quality=args.jpeg_quality,
                        num_keypoints=args.num_keypoints, val_fraction=args.val_fraction,
                        shard_samples=args.shard_size, shard_bytes=args.shard_bytes, layout=layout, source=source)
    start = time.perf_counter()
    manifest = write_shards(Path(args.out), scan.samples, opts, workers=args.workers, skip_bad=args.skip_bad,
                            validate=layout != "synthetic", scan_problems=scan.problems, sources=scan.sources,
                            part=part)
    elapsed = time.perf_counter() - start
    n = sum(manifest["samples"].values())
    counts = ", ".join(f"{manifest['samples'][s]} {s}" for s in SPLITS if manifest["samples"].get(s))
    test = manifest["splits"]["test"]["pairs"]
    print(f"{n} samples ({counts}" + (f"; test: {test['paired']} paired, {test['unpaired']} unpaired" if any(test.values())
                                      else "") + f") in {sum(len(v) for v in manifest['shards'].values())} shards "
          f"under {args.out} ({elapsed:.1f} s, {n / max(elapsed, 1e-9):.1f} samples/s)"
          + (f"; part {part.index} of {part.count}: merge with --merge once all are done" if part else ""))
    if args.preview:
        preview_sheet(Path(args.out), Path(args.preview))
        print(f"preview (person | ca | garment) in {args.preview}")


if __name__ == "__main__":
    main()
