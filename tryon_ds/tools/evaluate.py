"""The quality table of a cascade bundle on held-out validation pairs.

    python tools/evaluate.py --checkpoint bundle/ --shards 'shards/val-*.tar' --num 64
    python tools/evaluate.py ... --inception_weights pt_inception-2015-12-05.pth    # adds FID/KID

PSNR and SSIM against the target, over the whole image and inside the garment region, for the cascade and
for two baselines (the ca image; the ca image with the region filled with the garment's mean colour).
``--sr-alone N`` adds UNet 2 alone on N pairs: given the true low-res target, against plain bilinear
upsampling of it (what a super-resolution UNet must at least match).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import atomic
from ..cli import exit_on_user_error
from ..data.pipeline import ValDataset, collate, resolve_shards
from ..data.preprocess import image_grid
from ..errors import UserError
from ..evaluation import SR_METHODS, QualityTable, fid_kid, tryon_candidates
from ..inference import TryOnPipeline
from ..model import COND_KEYS


def _select(batch: dict, keep: list[bool]) -> dict:
    index = [i for i, k in enumerate(keep) if k]
    return {k: v[index] if torch.is_tensor(v) else [v[i] for i in index] for k, v in batch.items()}


def evaluate(pipe: TryOnPipeline, shards: str, num: int, batch_size: int, options: dict, unpaired: int = 0):
    """The quality table over ``num`` paired samples, their try-ons and targets (for FID/KID), and the
    try-on grid rows of up to ``unpaired`` unpaired samples (no target exists for those: pictures only)."""
    last = pipe.last
    table, real, fake, pictures = QualityTable(), [], [], []
    for conds in pipe.shard_batches(shards, batch_size):
        result = pipe.generate(conds, **options)[last].cpu()
        pair = conds[last]["pair"]
        paired = [p == "paired" and table.count + sum(q == "paired" for q in pair[:i]) < num for i, p in enumerate(pair)]
        if any(paired):
            batch = _select({**conds[last], "result": result}, paired)
            table.add(tryon_candidates(batch["result"], batch), batch)
            real.append(batch["person"])
            fake.append(batch["result"])
        for i, p in enumerate(pair):
            if p == "unpaired" and len(pictures) < unpaired:
                pictures.append([conds[last]["ca"][i], conds[last]["garment"][i], result[i]])
        print(f"evaluated {table.count}/{num} paired samples" + (f", {len(pictures)} unpaired" if unpaired else ""),
              flush=True)
        if table.count >= num and len(pictures) >= unpaired:
            break
    if table.count == 0:
        raise UserError(f"no paired sample (with a ground truth) could be read from {shards}")
    return table, real, fake, pictures


@torch.no_grad()
def evaluate_sr_alone(pipe: TryOnPipeline, shards: str, num: int, batch_size: int, options: dict) -> QualityTable:
    if 2 not in pipe.unets:
        raise UserError("--sr-alone needs a bundle with unet2/")
    samples = iter(ValDataset(resolve_shards(shards, "validation"), pipe.configs[2], 2, 0, 1))
    generator = torch.Generator(pipe.device).manual_seed(options["seed"])
    steps = options["steps"][1] if options["steps"] else None
    table = QualityTable()
    while table.count < num:
        batch = [x for _, x in zip(range(min(batch_size, num - table.count)), samples)]
        if not batch:
            break
        batch = collate(batch)
        cond = {k: batch[k].to(pipe.device) for k in COND_KEYS}
        sr = pipe.unets[2].sample(cond, lowres=batch["lowres"].to(pipe.device), steps=steps, sampler=options["sampler"],
                                  guidance=options["guidance"], generator=generator).cpu()
        bilinear = pipe.unets[2].upsample(batch["lowres"])  # what UNet 2 starts from
        table.add(dict(zip(SR_METHODS, (sr, bilinear))), batch)
    return table


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
    p.add_argument("--inception_weights", help="local FID Inception as TorchScript (StyleGAN2-ADA's / clean-fid's "
                                               "inception-2015-12-05.pt); FID/KID are skipped without")
    p.add_argument("--unpaired", type=int, default=0, metavar="N",
                   help="also try N unpaired samples (a test split's) on, for pictures: unpaired.png beside --json")
    p.add_argument("--sr-alone", type=int, default=0, metavar="N",
                   help="also: UNet 2 from the true low-res image vs bilinear upsampling, on N pairs")
    p.add_argument("--json", help="also write the table as JSON here")
    args = p.parse_args(argv)
    pipe = TryOnPipeline.from_pretrained(args.checkpoint, args.device, ema=args.ema)
    steps = None if args.steps is None else (args.steps[0], args.steps[-1])
    options = {"sampler": args.sampler, "steps": steps, "guidance": args.guidance, "seed": args.seed}
    table, real, fake, pictures = evaluate(pipe, args.shards, args.num, args.batch_size, options, args.unpaired)
    print(table.format())
    if pictures:
        grid = Path(args.json).with_name("unpaired.png") if args.json else Path("unpaired.png")
        atomic.save_image(image_grid([torch.stack(column) for column in zip(*pictures)]), grid)
        print(f"{len(pictures)} unpaired try-on(s) (ca | garment | try-on; no ground truth) in {grid}")
    fid = fid_kid(args.inception_weights, real, fake)
    print(fid)
    margins = table.margins()
    print(f"inside the garment region the cascade is ahead of the better baseline by "
          f"{margins['psnr_region']:+.2f} dB PSNR and {margins['ssim_region']:+.3f} SSIM")
    report = {"rows": table.rows(), "margins": margins, "pairs": table.count, "region_pixels": table.region_pixels,
              "fid_kid": fid, "seed": args.seed, "bundle": str(args.checkpoint)}
    if args.sr_alone:
        sr = evaluate_sr_alone(pipe, args.shards, args.sr_alone, args.batch_size, options)
        print(sr.format())
        report["sr_alone"] = {"rows": sr.rows(), "pairs": sr.count, "region_pixels": sr.region_pixels,
                              "margins": sr.margins(("psnr", "ssim"))}
        print(f"UNet 2 alone is {report['sr_alone']['margins']['psnr']:+.2f} dB PSNR and "
              f"{report['sr_alone']['margins']['ssim']:+.3f} SSIM from bilinear upsampling (whole image)")
    if args.json:
        atomic.write_json(Path(args.json), report)


if __name__ == "__main__":
    main()
