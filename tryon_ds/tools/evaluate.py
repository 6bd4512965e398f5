"""The quality table of a cascade bundle on held-out validation pairs.

    python tools/evaluate.py --checkpoint bundle/ --shards 'shards/val-*.tar' --num 64
    python tools/evaluate.py ... --inception_weights pt_inception-2015-12-05.pth    # adds FID/KID

PSNR and SSIM against the target, over the whole image and inside the garment region, for the cascade and
for two baselines (the ca image; the ca image with the region filled with the garment's mean colour).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import atomic
from ..cli import exit_on_user_error
from ..data.pipeline import ValDataset, collate, resolve_shards
from ..errors import UserError
from ..evaluation import QualityTable, fid_kid
from ..inference import TryOnPipeline


def evaluate(pipe: TryOnPipeline, shards: str, num: int, batch_size: int, options: dict):
    urls = resolve_shards(shards, "validation")
    iterators = {n: iter(ValDataset(urls, pipe.configs[n], n, 0, 1)) for n in pipe.unets}
    last = pipe.last
    table, real, fake = QualityTable(), [], []
    while table.count < num:
        n = min(batch_size, num - table.count)
        samples = {u: [x for _, x in zip(range(n), it)] for u, it in iterators.items()}
        if not samples[1]:
            break
        conds = {u: collate(batch) for u, batch in samples.items()}
        result = pipe.generate(conds, **options)[last].cpu()
        table.add(result, conds[last])
        real.append(conds[last]["person"])
        fake.append(result)
        print(f"evaluated {table.count}/{num} pairs", flush=True)
    if table.count == 0:
        raise UserError(f"no validation sample could be read from {shards}")
    return table, real, fake


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a bundle folder")
    p.add_argument("--shards", required=True, help="validation shards (held out from training)")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--sampler", choices=("ddpm", "ddim"))
    p.add_argument("--steps", type=int, nargs="+", metavar="N")
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inception_weights", help="local FID Inception weights file (FID/KID are skipped without)")
    p.add_argument("--json", help="also write the table as JSON here")
    args = p.parse_args(argv)
    pipe = TryOnPipeline.from_pretrained(args.checkpoint, args.device, ema=args.ema)
    steps = None if args.steps is None else (args.steps[0], args.steps[-1])
    options = {"sampler": args.sampler, "steps": steps, "guidance": args.guidance, "seed": args.seed}
    table, real, fake = evaluate(pipe, args.shards, args.num, args.batch_size, options)
    print(table.format())
    fid = fid_kid(args.inception_weights, real, fake)
    print(fid)
    margins = table.margins()
    print(f"inside the garment region the cascade is ahead of the better baseline by "
          f"{margins['psnr_region']:+.2f} dB PSNR and {margins['ssim_region']:+.3f} SSIM")
    if args.json:
        atomic.write_json(Path(args.json), {"rows": table.rows(), "margins": margins, "pairs": table.count,
                                            "region_pixels": table.region_pixels, "fid_kid": fid,
                                            "seed": args.seed, "bundle": str(args.checkpoint)})


if __name__ == "__main__":
    main()
