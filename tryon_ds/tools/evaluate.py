"""Evaluate a cascade bundle, or a folder of another method's results, as the field does, on a test split
(VITON-HD's, DressCode's, or held-out shards).

    python tools/evaluate.py --checkpoint bundle/ --shards 'shards/test-*.tar' --json quality.json \\
        --eval-size 512x384 --inception_weights inception-2015-12-05.pt \\
        --alexnet_weights alexnet-owt-7be5be79.pth --lpips_weights alex.pth --sampler dpmpp --steps 25
    torchrun --nproc_per_node 8 tools/evaluate.py ...        # or deepspeed / srun: the test set split across ranks
    python tools/evaluate.py --results their_results/ --shards 'shards/test-*.tar' --json theirs.json ...

The field's table (tryon_ds/evaluation.py, tryon_ds/metrics.py): on the paired samples (each person in their
own garment) SSIM, LPIPS, FID and KID; on the unpaired ones (another person's garment) FID and KID; FID and
KID against the reference set, every test person's ground truth in the shards (cached under
``--reference-cache``); at the output size and each ``--eval-size`` (HxW), per DressCode category and over
all; into ``--json`` and a Markdown table beside it. Beside it, ours: PSNR and SSIM over the whole image and
in the garment region, against two baselines (the ca image; the ca image with the region filled with the
garment's mean colour); ``--sr-alone N`` adds each super-resolution UNet alone on N pairs, from the true
low-res image, against bilinear upsampling of it.

Each try-on is written as a PNG named by its sample's key (into ``--save-images DIR``, kept; else a work
folder beside the JSON, removed at the end) before it is measured: a killed evaluation run again with the
same arguments measures those instead of sampling them again. Each sample's noise comes from its key, so the
report is the same at any world size and batch size. Ranks send per-sample values and Inception features
to rank 0, never images.

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
import hashlib
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from .. import atomic
from ..cli import exit_on_user_error
from ..config import DataConfig
from ..data.pipeline import ValDataset, collate, resolve_shards
from ..data.preprocess import at_size, image_grid, pixels, resize, to_device
from ..diffusion import SAMPLERS
from ..errors import UserError
from ..evaluation import (FieldMetrics, QualityTable, Quota, ReferenceSet, markdown, size_name, sr_methods,
                          summarise, tryon_candidates)
from ..inference import TryOnPipeline
from ..metrics import LPIPS_NETS, WEIGHT_FILES, as_uint8, weight_path
from ..metrics import resize_to as metrics_resize
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
            image = pixels(img.convert("RGB"))
    except (OSError, ValueError):
        return None
    return image if tuple(image.shape[-2:]) == tuple(size) else None


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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
NO_POSES = 0  # the walks below read images only: no pose is decoded


class ResultsFolder:
    """Another method's try-ons (or ours, from --save-images), found by name anywhere under ``root``."""

    def __init__(self, root: Path):
        if not root.is_dir():
            raise UserError(f"--results {root}: not a folder")
        self.root, self.by_stem = root, {}
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                self.by_stem.setdefault(path.stem, []).append(path)
        if not self.by_stem:
            raise UserError(f"--results {root}: no image ({', '.join(IMAGE_SUFFIXES)}) in it")
        first = self.by_stem[min(self.by_stem)][0]
        self.size = self._read(first).shape[-2:]

    def find(self, key: str, source: tuple[str, str]) -> Path | None:
        person, garment = source
        for stem in (safe_name(key), f"{person}_{garment}" if person and garment else None, person or None):
            paths = self.by_stem.get(stem) if stem else None
            if paths and len(paths) > 1:
                raise UserError(f"--results {self.root}: {len(paths)} results named {stem!r} "
                                f"({', '.join(str(p.relative_to(self.root)) for p in paths[:3])}); give one folder "
                                "(paired or unpaired) at a time")
            if paths:
                return paths[0]
        return None

    def _read(self, path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as img:
                return pixels(img.convert("RGB"))
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: not a readable image ({type(err).__name__})") from None

    def read(self, path: Path) -> torch.Tensor:
        image = self._read(path)
        if tuple(image.shape[-2:]) != tuple(self.size):
            raise UserError(f"{path}: {size_name(image.shape[-2:])}, expected {size_name(self.size)} as the other "
                            "results (one output size per folder)")
        return image


def results(folder: ResultsFolder, shards: str, quota: Quota, batch_size: int, data: DataConfig,
            world: distributed.World, missing: list[str]):
    """As ``tryons``, from a folder: (this rank's batch at the results' size, their try-ons as uint8) over the
    quota's samples that have a result; the keys of those that have none go to ``missing``."""
    size = tuple(folder.size)
    samples = iter(ValDataset(resolve_shards(shards, "test"), NO_POSES, ("ca", "garment", "mask", "source"),
                              lambda sample: at_size(sample, size), world.rank, world.size, quota, data))
    while chunk := [s for _, s in zip(range(batch_size), samples)]:
        found = [(s, folder.find(s["key"], s["source"])) for s in chunk]
        missing += [s["key"] for s, path in found if path is None]
        kept = [(s, path) for s, path in found if path is not None]
        if kept:
            yield collate([s for s, _ in kept]), torch.stack([folder.read(path) for _, path in kept])


def reference_cache(given: str | None) -> Path:
    if given:
        return Path(given)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tryon_ds" / "reference"


@torch.no_grad()
def reference_set(shards: str, sizes: list[tuple[int, int]], base: tuple[int, int], metrics_: FieldMetrics,
                  network: Path | None, cache: Path, batch_size: int, data: DataConfig,
                  world: distributed.World) -> ReferenceSet | None:
    """The reference set on rank 0 (None elsewhere, and wherever FID is skipped): read from ``cache`` when
    made before for these shards, sizes and network; else each rank computes the features of its share of
    the test persons (at ``base``, the size the try-ons' targets are brought to, then at each size as they
    are) and rank 0 merges them and writes the cache."""
    if metrics_.inception is None or network is None:
        return None
    urls = resolve_shards(shards, "test")
    names = [size_name(s) for s in sizes]
    paths = ReferenceSet.cache_paths(cache, urls, sizes, base, network)
    reference = ReferenceSet.load(paths) if world.is_main else None
    cached = torch.tensor([1.0 if reference is not None else 0.0])
    dist.broadcast(cached, src=0)
    if cached.item():
        if world.is_main:
            print(f"reference set: {len(reference.categories)} test person(s), from {cache}", flush=True)
        return reference
    part = {}
    persons = iter(ValDataset(urls, NO_POSES, (), lambda s: (s["category"], resize(pixels(s["person"]), base)),
                              world.rank, world.size, data=data))
    while chunk := [p for _, p in zip(range(batch_size), persons)]:
        images = torch.stack([image for _, image in chunk])
        features = {name: metrics_.inception(metrics_resize(images, size)).numpy() for name, size in zip(names, sizes)}
        for i, (category, image) in enumerate(chunk):
            digest = hashlib.sha256(image.numpy().tobytes()).hexdigest()
            part[digest] = (category, {name: features[name][i] for name in names})
    parts = gather(part, world)
    if not world.is_main:
        return None
    reference = ReferenceSet.merge(parts, names)
    reference.save(paths)
    print(f"reference set: {len(reference.categories)} test person(s), computed and kept in {cache}", flush=True)
    return reference


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


def run(args: argparse.Namespace, world: distributed.World) -> None:
    weights = {kind: weight_path(kind, getattr(args, spec.flag.lstrip("-"))) for kind, spec in WEIGHT_FILES.items()}
    out = Path(args.json)
    quota, missing = Quota(args.max_samples, args.max_unpaired), []
    if args.results:
        pipe, folder = None, ResultsFolder(Path(args.results))
        base, data = tuple(folder.size), DataConfig()
        measured = results(folder, args.shards, quota, args.batch_size, data, world, missing)
    else:
        pipe = TryOnPipeline.from_pretrained(args.checkpoint, world.device, ema=args.ema, compile=args.compile)
        options = {"sampler": args.sampler, "steps": pipe.steps_per_unet(args.steps), "guidance": args.guidance,
                   "seed": args.seed}
        base, data = pipe.output_size, pipe.configs[pipe.last].data
        work = Path(args.save_images) if args.save_images else out.with_name(out.name + ".tryons")
        work.mkdir(parents=True, exist_ok=True)
        measured = tryons(pipe, args.shards, quota, args.batch_size, options, work, world)
    sizes = [base] + [s for s in args.eval_size if s != base]
    for size in sizes[1:]:
        if size[0] * base[1] != size[1] * base[0]:
            raise UserError(f"--eval-size {size_name(size)}: another aspect ratio than the "
                            f"{size_name(base)} {'results' if args.results else 'cascade output'}")

    field_metrics = FieldMetrics(sizes, weights, world.device, args.lpips_net)
    region, pictures = QualityTable(), []
    for batch, made in measured:
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

    reference = reference_set(args.shards, sizes, base, field_metrics, weights["inception"],
                              reference_cache(args.reference_cache), args.batch_size, data, world)
    records, tables, missing = gather(field_metrics.records, world), gather(region, world), gather(missing, world)
    alone = {}
    if args.sr_alone and world.is_main:
        for number in list(pipe.unets)[1:]:
            alone[f"unet{number}"] = evaluate_sr_alone(pipe, number, args.shards, args.sr_alone, args.batch_size,
                                                       options)
    if world.is_main:
        merged = {k: v for part in records for k, v in part.items()}
        for table in tables[1:]:
            tables[0].merge(table)
        notes = list(field_metrics.notes)
        missing = sorted(k for part in missing for k in part)
        if missing:
            notes.append(f"{len(missing)} test sample(s) have no result in {args.results} and are left out "
                         f"(first: {missing[0]}; looked for KEY.png, PERSON_GARMENT.ext and PERSON.ext)")
        report(args, merged, reference, tables[0], alone, [size_name(s) for s in sizes], notes, pictures, out)
        if pipe is not None and not args.save_images:
            shutil.rmtree(work)


def report(args, records: dict, reference: ReferenceSet | None, region: QualityTable, alone: dict[str, QualityTable],
           sizes: list[str], notes: list[str], pictures: list, out: Path) -> None:
    if not records:
        raise UserError(f"no test sample could be measured from {args.shards}"
                        + (f" with the results in {args.results}" if args.results else ""))
    field = summarise(records, sizes, reference, args.seed)
    table = markdown(field, notes, args.lpips_net)
    result = {"field": field, "skipped": notes, "shards": args.shards, "lpips_net": args.lpips_net,
              "ssim": "gaussian 11, sigma 1.5, border of 5 px cropped (torchmetrics <= 1.4.1, LaDI-VTON, skimage)"}
    if args.results:
        result["results"] = str(args.results)
    else:
        result.update(bundle=str(args.checkpoint), seed=args.seed, sampler=args.sampler, steps=args.steps,
                      guidance=args.guidance)
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
