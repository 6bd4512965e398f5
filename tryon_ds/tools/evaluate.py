"""Evaluate a cascade bundle, or a folder of another method's results, as the field does, on a test split
(VITON-HD's, DressCode's, or held-out shards).

    python tools/evaluate.py --checkpoint bundle/ --shards 'shards/test-*.tar' --json quality.json \\
        --eval-size 512x384 --inception_weights inception-2015-12-05.pt \\
        --alexnet_weights alexnet-owt-7be5be79.pth --lpips_weights alex.pth --sampler dpmpp --steps 25
    torchrun --nproc_per_node 8 tools/evaluate.py ...        # or deepspeed / srun: the test set split across ranks
    python tools/evaluate.py --results their_results/ --shards 'shards/test-*.tar' --json theirs.json ...

The field's table (tryon_ds/evaluation/, tryon_ds/metrics.py): on the paired samples (each person in their
own garment) SSIM, LPIPS, FID and KID; on the unpaired ones (another person's garment) FID and KID; FID and
KID against the reference set, every test person's ground truth in the shards (cached under
``--reference-cache``); at the output size and each ``--eval-size`` (HxW), per DressCode category and over
all; into ``--json`` and a Markdown table beside it. Beside it, ours: PSNR and SSIM over the whole image and
in the garment region, against two baselines (the ca image; the ca image with the region filled with the
garment's mean colour); ``--sr-alone N`` adds each super-resolution UNet alone on N pairs, from the true
low-res image, against bilinear upsampling of it.

Each try-on is written as a PNG named by its sample's key (into ``--save-images DIR``, kept; else a work
folder beside the JSON, removed at the end) before it is measured: a killed evaluation run again with the
same arguments measures those instead of sampling them again (tryon_ds/evaluation/run.py).

``--results DIR`` measures a folder of try-ons instead of sampling them, through the same code: each test
sample's result is ``KEY.png`` (as ``--save-images`` writes them), ``PERSON_GARMENT.ext`` (the release's file
names, as LaDI-VTON saves its results) or ``PERSON.ext`` (as CatVTON does, in separate paired and unpaired
folders: measure one at a time, with ``--max-unpaired 0`` or ``--max-samples 0``), anywhere under DIR; the
results' size is the output size. Samples without a result are left out and counted in the notes.

Flags are named so that no launcher takes them: torchrun's and deepspeed's parsers accept any prefix of
their own options even after the script's name (``--num`` would be ``--num_gpus``'s).
"""
from __future__ import annotations

import argparse

from ..cli import exit_on_user_error, parse_size
from ..diffusion import SAMPLERS
from ..errors import UserError
from ..evaluation.run import Settings, run
from ..metrics import LPIPS_NETS, WEIGHT_FILES
from ..training import distributed, lifecycle


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="a bundle folder: its try-ons are sampled and measured")
    what.add_argument("--results", metavar="DIR", help="a folder of try-ons to measure instead (see above)")
    p.add_argument("--shards", required=True, help="the test shards (held out from training)")
    p.add_argument("--max-samples", type=int, metavar="N",
                   help="paired samples to measure: the first N in the shards (default: all)")
    p.add_argument("--max-unpaired", type=int, metavar="N",
                   help="unpaired samples: the first N (default: all the shards have)")
    p.add_argument("--eval-size", type=parse_size, action="append", default=[], metavar="HxW",
                   help="also measure at this size (repeatable), e.g. 512x384; results and targets are resized "
                        "with PIL's Lanczos filter")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile every UNet (or --no-compile: none); default: as each was trained")
    p.add_argument("--steps", type=int, nargs="+", metavar="N", help="one number for every UNet, or one per UNet")
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--lpips-net", choices=tuple(LPIPS_NETS), default="alex",
                   help="LPIPS's trunk: alex (LaDI-VTON, the default), squeeze (CatVTON) or vgg")
    for kind, spec in WEIGHT_FILES.items():
        p.add_argument(spec.flag, help=f"{spec.name} for {spec.metrics} (or {spec.env}); from {spec.source}")
    p.add_argument("--reference-cache", metavar="DIR",
                   help="where the reference set's features are kept (default: ~/.cache/tryon_ds/reference)")
    p.add_argument("--sr-alone", type=int, default=0, metavar="N",
                   help="also: each super-resolution UNet from the true low-res image vs bilinear upsampling, on N pairs")
    p.add_argument("--save-images", metavar="DIR", help="keep every try-on here as KEY.png")
    p.add_argument("--json", required=True, help="the report; the Markdown table goes beside it (.md)")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = p.parse_args(argv)
    if args.results and (args.sr_alone or args.save_images):
        p.error("--sr-alone and --save-images need --checkpoint (a folder of results has no UNets to run)")
    return args


def settings(args: argparse.Namespace) -> Settings:
    return Settings(shards=args.shards, json=args.json, checkpoint=args.checkpoint, results=args.results,
                    max_samples=args.max_samples, max_unpaired=args.max_unpaired, eval_size=args.eval_size,
                    batch_size=args.batch_size, sampler=args.sampler, compile=args.compile, steps=args.steps,
                    guidance=args.guidance, seed=args.seed, ema=args.ema, lpips_net=args.lpips_net,
                    weights={kind: getattr(args, spec.flag.lstrip("-")) for kind, spec in WEIGHT_FILES.items()},
                    reference_cache=args.reference_cache, sr_alone=args.sr_alone, save_images=args.save_images)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    world = distributed.setup()
    try:
        run(settings(args), world)
    except UserError as err:
        lifecycle.fail(str(err), world.rank, world.size)
    distributed.teardown()


if __name__ == "__main__":
    main()
