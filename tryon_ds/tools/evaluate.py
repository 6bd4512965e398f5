"""Evaluate a cascade bundle as the field does, on a test split (VITON-HD's, DressCode's, or held-out shards).

    python tools/evaluate.py --checkpoint bundle/ --shards 'shards/test-*.tar' --json quality.json \\
        --eval-size 512x384 --inception_weights inception-2015-12-05.pt \\
        --alexnet_weights alexnet-owt-7be5be79.pth --lpips_weights alex.pth --sampler dpmpp --steps 25
    torchrun --nproc_per_node 8 tools/evaluate.py ...        # or deepspeed / srun: the test set split across ranks

The field's table (tryon_ds/evaluation.py, tryon_ds/metrics.py): on the paired samples (each person in their
own garment) SSIM, LPIPS, FID and KID; on the unpaired ones (another person's garment) FID and KID against the
real test images; at the cascade's output size and each ``--eval-size`` (HxW), per DressCode category and
over all; into ``--json`` and a Markdown table beside it. Beside it, ours: PSNR and SSIM over the whole
image and in the garment region, against two baselines (the ca image; the ca image with the region filled
with the garment's mean colour); ``--sr-alone N`` adds each super-resolution UNet alone on N pairs, from
the true low-res image, against bilinear upsampling of it.

Each try-on is written as a PNG named by its sample's key (into ``--save-images DIR``, kept; else a work
folder beside the JSON, removed at the end) before it is measured: a killed evaluation run again with the
same arguments measures those instead of sampling them again. Each sample's noise comes from its key, so the
report is the same at any world size and batch size. Ranks send per-sample values and Inception features
to rank 0, never images.
"""
from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from .. import atomic
from ..cli import exit_on_user_error
from ..data.preprocess import image_grid, to_device
from ..diffusion import SAMPLERS
from ..errors import UserError
from ..evaluation import (FieldMetrics, QualityTable, Quota, markdown, size_name, sr_methods, summarise,
                          tryon_candidates)
from ..inference import TryOnPipeline
from ..metrics import WEIGHT_FILES, as_uint8, weight_path
from ..training import distributed, lifecycle
from .infer import safe_name


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW in pixels, e.g. 512x384")
    return int(m.group(1)), int(m.group(2))


def _select(batch: dict, index: list[int]) -> dict:
    return {k: v[index] if torch.is_tensor(v) else [v[i] for i in index] for k, v in batch.items()}


def _load_png(path: Path, size: tuple[int, int]) -> torch.Tensor | None:
    """A saved try-on as uint8 (3, H, W), or None if it is missing or not a whole image of that size."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    except (OSError, ValueError):
        return None
    if array.shape[:2] != tuple(size):
        return None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tryons(pipe: TryOnPipeline, shards: str, quota: Quota, batch_size: int, options: dict, work: Path,
           world: distributed.World):
    """(this rank's batch at the output size, its try-ons as uint8) over the quota's samples, this rank's
    share of them: each try-on sampled once, with noise seeded by its key, and saved as a PNG in ``work``
    before it is used; one found there already (an earlier, killed run) is read instead."""
    last = pipe.last
    for conds in pipe.shard_batches(shards, batch_size, select=quota, rank=world.rank, world_size=world.size):
        keys = conds[last]["key"]
        paths = [work / f"{safe_name(k)}.png" for k in keys]
        done = [_load_png(p, pipe.output_size) for p in paths]
        todo = [i for i, image in enumerate(done) if image is None]
        if todo:
            part = {n: _select(c, todo) for n, c in conds.items()}
            made = as_uint8(pipe.generate(part, keys=part[last]["key"], **options)[last])
            for i, image in zip(todo, made):
                atomic.save_image(Image.fromarray(image.permute(1, 2, 0).numpy()), paths[i])
                done[i] = image
        yield conds[last], torch.stack(done)


@torch.no_grad()
def evaluate_sr_alone(pipe: TryOnPipeline, number: int, shards: str, num: int, batch_size: int,
                      options: dict) -> QualityTable:
    """UNet ``number`` alone on ``num`` pairs: from the true low-res image, against bilinear upsampling of it."""
    model = pipe.unets[number]
    steps = options["steps"][number - 1] if options["steps"] else None
    table = QualityTable()
    for conds in pipe.shard_batches(shards, batch_size, limit=num):
        batch = to_device(conds[number], torch.device("cpu"))
        cond = {k: batch[k].to(pipe.device) for k in model.conditioning.keys}
        sr = model.sample(cond, steps=steps, sampler=options["sampler"], guidance=options["guidance"],
                          generator=pipe.generators(batch["key"], options["seed"])).cpu()
        bilinear = model.upsample(batch["lowres"])  # what the UNet starts from
        table.add(dict(zip(sr_methods(number), (sr, bilinear))), batch)
    return table


def gather(obj, world: distributed.World) -> list:
    """Every rank's ``obj`` on rank 0 (a list in rank order), None elsewhere."""
    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a bundle folder")
    p.add_argument("--shards", required=True, help="the test shards (held out from training)")
    p.add_argument("--num", type=int, help="paired samples to measure: the first N in the shards (default: all)")
    p.add_argument("--unpaired", type=int, help="unpaired samples: the first N (default: all the shards have)")
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
    for kind, spec in WEIGHT_FILES.items():
        p.add_argument(spec.flag, help=f"{spec.name} for {spec.metrics} (or {spec.env}); from {spec.source}")
    p.add_argument("--sr-alone", type=int, default=0, metavar="N",
                   help="also: each super-resolution UNet from the true low-res image vs bilinear upsampling, on N pairs")
    p.add_argument("--save-images", metavar="DIR", help="keep every try-on here as KEY.png")
    p.add_argument("--json", required=True, help="the report; the Markdown table goes beside it (.md)")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def run(args: argparse.Namespace, world: distributed.World) -> None:
    weights = {kind: weight_path(kind, getattr(args, spec.flag.lstrip("-"))) for kind, spec in WEIGHT_FILES.items()}
    pipe = TryOnPipeline.from_pretrained(args.checkpoint, world.device, ema=args.ema, compile=args.compile)
    options = {"sampler": args.sampler, "steps": pipe.steps_per_unet(args.steps), "guidance": args.guidance,
               "seed": args.seed}
    out = Path(args.json)
    sizes = [pipe.output_size] + [s for s in args.eval_size if s != pipe.output_size]
    for size in sizes[1:]:
        if size[0] * pipe.output_size[1] != size[1] * pipe.output_size[0]:
            raise UserError(f"--eval-size {size_name(size)}: another aspect ratio than the cascade's "
                            f"{size_name(pipe.output_size)} output")
    work = Path(args.save_images) if args.save_images else out.with_name(out.name + ".tryons")
    work.mkdir(parents=True, exist_ok=True)

    field_metrics = FieldMetrics(sizes, weights, world.device)
    region, pictures = QualityTable(), []
    for batch, made in tryons(pipe, args.shards, Quota(args.num, args.unpaired), args.batch_size, options, work,
                              world):
        field_metrics.add(batch["key"], batch["pair"], batch.get("category") or [""] * len(made), made,
                          batch["person"])
        batch = to_device(batch, torch.device("cpu"))
        paired = [i for i, p in enumerate(batch["pair"]) if p == "paired"]
        if paired:
            chosen = _select(batch, paired)
            tryon = made[paired].float() / 127.5 - 1
            region.add(tryon_candidates(tryon, chosen), chosen)
        pictures += [[batch["ca"][i], batch["garment"][i], made[i].float() / 127.5 - 1]
                     for i, p in enumerate(batch["pair"]) if p == "unpaired"][:max(0, 8 - len(pictures))]
        print(f"rank {world.rank}: {len(field_metrics.records)} sample(s) measured", flush=True)

    records, tables = gather(field_metrics.records, world), gather(region, world)
    alone = {}
    if args.sr_alone and world.is_main:
        for number in list(pipe.unets)[1:]:
            alone[f"unet{number}"] = evaluate_sr_alone(pipe, number, args.shards, args.sr_alone, args.batch_size,
                                                       options)
    if world.is_main:
        merged = {k: v for part in records for k, v in part.items()}
        for table in tables[1:]:
            tables[0].merge(table)
        report(args, merged, tables[0], alone, [size_name(s) for s in sizes], field_metrics.notes, pictures, out)
        if not args.save_images:
            shutil.rmtree(work)


def report(args, records: dict, region: QualityTable, alone: dict[str, QualityTable], sizes: list[str],
           notes: list[str], pictures: list, out: Path) -> None:
    if not records:
        raise UserError(f"no test sample could be read from {args.shards}")
    field = summarise(records, sizes, args.seed)
    table = markdown(field, notes)
    result = {"field": field, "skipped": notes, "bundle": str(args.checkpoint), "shards": args.shards,
              "seed": args.seed, "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance}
    print(table)
    if region.count:
        margins = region.margins()
        print(region.format())
        print(f"inside the garment region the cascade is ahead of the better baseline by "
              f"{margins['psnr_region']:+.2f} dB PSNR and {margins['ssim_region']:+.3f} SSIM")
        result.update(rows=region.rows(), margins=margins, pairs=region.count, region_pixels=region.region_pixels)
    if alone:
        result["sr_alone"] = {}
        for name, sr in alone.items():
            print(sr.format())
            entry = result["sr_alone"][name] = {"rows": sr.rows(), "pairs": sr.count, "region_pixels": sr.region_pixels,
                                                "margins": sr.margins(("psnr", "ssim"))}
            print(f"{name.replace('unet', 'UNet ')} alone is {entry['margins']['psnr']:+.2f} dB PSNR and "
                  f"{entry['margins']['ssim']:+.3f} SSIM from bilinear upsampling (whole image)")
    if pictures:
        grid = out.with_name(out.stem + "_unpaired.png")
        atomic.save_image(image_grid([torch.stack(column) for column in zip(*pictures)]), grid)
        print(f"{len(pictures)} unpaired try-on(s) (ca | garment | try-on; no ground truth) in {grid}")
    atomic.write_json(out, result)
    atomic.write_bytes(out.with_suffix(".md"), (table + "\n").encode())
    print(f"report: {out} and {out.with_suffix('.md')}")


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    world = distributed.setup()
    try:
        run(args, world)
    except UserError as err:
        lifecycle.fail(str(err), world.rank, world.size)
    distributed.teardown()


if __name__ == "__main__":
    main()
