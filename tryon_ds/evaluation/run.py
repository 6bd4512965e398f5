"""An evaluation run, as tools/evaluate.py starts it: a bundle's try-ons sampled (or another method's read from
a folder) on a test split, measured by the field's protocol (field.py) and in the garment region (quality.py),
split over the ranks; rank 0 writes the report (JSON and a Markdown table).

Each try-on is written as a PNG named by its sample's key before it is measured: a killed evaluation run again
with the same settings measures those instead of sampling them again. Each sample's noise comes from its key,
so the report is the same at any world size and batch size. Ranks send per-sample values and Inception
features to rank 0, never images.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from .. import atomic
from ..batch import CA, GARMENT, LOWRES, MASK, PERSON
from ..config import DataConfig
from ..data.pipeline import Quota, ValDataset, collate, resolve_shards
from ..data.preprocess import as_uint8, at_size, from_uint8, image_grid, picture, pixels, resize, to_device
from ..errors import UserError
from ..inference import TryOnPipeline, safe_name
from ..metrics import WEIGHT_FILES, weight_path
from ..metrics import resize_to as metrics_resize
from ..training import distributed
from .field import FieldMetrics, ReferenceSet, markdown, summarise
from .quality import QualityTable, size_name, sr_methods, tryon_candidates


@dataclass
class Settings:
    """What an evaluation measures and how (tools/evaluate.py's flags)."""
    shards: str
    json: str
    checkpoint: str | None = None  # a bundle: its try-ons are sampled
    results: str | None = None  # or a folder of try-ons
    max_samples: int | None = None
    max_unpaired: int | None = None
    eval_size: list[tuple[int, int]] = field(default_factory=list)
    batch_size: int = 16
    sampler: str | None = None
    compile: bool | None = None
    steps: list[int] | None = None
    guidance: float | None = None
    seed: int = 0
    ema: bool = True
    lpips_net: str = "alex"
    weights: dict[str, str | None] = field(default_factory=dict)  # by WEIGHT_FILES kind, as given
    reference_cache: str | None = None
    sr_alone: int = 0
    save_images: str | None = None


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
                atomic.save_image(picture(image), paths[i])
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
    samples = iter(ValDataset(resolve_shards(shards, "test"), NO_POSES, (CA, GARMENT, MASK, "source"),
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
    persons = iter(ValDataset(urls, NO_POSES, (), lambda s: (s["category"], resize(pixels(s[PERSON]), base)),
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
        bilinear = model.upsample(batch[LOWRES])  # what the UNet starts from
        table.add(dict(zip(sr_methods(number), (sr, bilinear))), batch)
    return table


def gather(obj, world: distributed.World) -> list:
    """Every rank's ``obj`` on rank 0 (a list in rank order), None elsewhere."""
    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def run(args: Settings, world: distributed.World) -> None:
    """The evaluation ``args`` describes, on this rank's share of the test set; rank 0 writes the report."""
    weights = {kind: weight_path(kind, args.weights.get(kind)) for kind in WEIGHT_FILES}
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
                          batch[PERSON])
        batch = to_device(batch, torch.device("cpu"))
        paired = [i for i, p in enumerate(batch["pair"]) if p == "paired"]
        if paired:
            chosen = _select(batch, paired)
            tryon = from_uint8(made[paired])
            region.add(tryon_candidates(tryon, chosen), chosen)
        pictures += [[batch[CA][i], batch[GARMENT][i], from_uint8(made[i])]
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


def report(args: Settings, records: dict, reference: ReferenceSet | None, region: QualityTable, alone: dict[str, QualityTable],
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


