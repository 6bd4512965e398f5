"""Running the cascade: UNet 1 at its size, then every later UNet of the bundle super-resolving the one before
(the default cascade: 128 -> 256; with UNet 3: -> 1024).

    pipe = TryOnPipeline.from_pretrained("bundle/")                 # EMA weights, fp32, CPU
    image = pipe(ca_image, garment_image, person_pose, garment_pose, seed=0)   # PIL in, PIL out

Inputs are prepared by the functions that prepare training data (tryon_ds/data/preprocess.py): padded to the
cascade's aspect at their own resolution, keypoints normalised to the padded image, then resized to each
UNet's size by the function training resizes with; the result is cropped back to the ca image's aspect ratio.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from .bundle import read_unet
from .cascade import CascadeUNet
from .batch import CA, GARMENT, INPUTS
from .config import Config
from .data.pipeline import Quota, ValDataset, collate, resolve_shards
from .data.preprocess import normalise_pose, pad_to_aspect, pose_tensors, to_device, to_image, unet_inputs
from .data.sources import read_image, read_pose
from .errors import UserError
from .model import LOWRES
from .seeding import seed_for


def safe_name(key: str) -> str:
    """A sample key from a shard as a file name that stays inside the output folder."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", key).lstrip(".")
    return name or "sample"


class TryOnPipeline:
    def __init__(self, unets: dict[int, CascadeUNet], configs: dict[int, Config], device: torch.device,
                 meta: dict[int, dict] | None = None):
        """``meta``: each UNet's bundle record (its step, how it was selected), where it came from a bundle."""
        self.unets, self.configs, self.device = unets, configs, device
        self.meta = meta or {}

    @classmethod
    def from_pretrained(cls, bundle: str | Path, device: str | torch.device = "cpu", ema: bool = True,
                        compile: bool | None = None) -> "TryOnPipeline":
        """Every UNet the bundle holds, unet1/ up to the first one missing; ``compile`` True or False compiles
        every UNet or none (in its config's mode), None as each was trained."""
        from .training.checkpoint import consolidate_hint

        bundle = Path(bundle)
        if not (bundle / "unet1" / "config.json").is_file() and (hint := consolidate_hint(bundle)):
            raise UserError(hint)
        if not bundle.is_dir():
            raise UserError(f"bundle folder {bundle} does not exist")
        if not (bundle / "unet1").is_dir():
            raise UserError(f"{bundle} has no unet1/: consolidate the base UNet's checkpoint into it first")
        device = torch.device(device)
        unets, configs, metas = {}, {}, {}
        for number in itertools.count(1):
            if not (bundle / f"unet{number}").is_dir():
                break
            config, weights, metas[number] = read_unet(bundle, number, ema)
            if number > 1:  # it must super-resolve what the UNet before it makes
                want, made = tuple(config.image_size(number - 1)), tuple(configs[number - 1].image_size(number - 1))
                if want != made:
                    raise UserError(f"{bundle}: unet{number} was trained on {list(want)} inputs but unet{number - 1} "
                                    f"makes {list(made)} images")
            if compile is not None:
                config = config.with_unet(number, dataclasses.replace(config.unet(number), compile=compile))
            model = CascadeUNet(config, number)
            model.unet.load_state_dict({k: v.float() for k, v in weights.items()})
            model.compile_unet()
            unets[number], configs[number] = model.to(device).eval(), config
        return cls(unets, configs, device, {n: {k: v for k, v in m.items() if k != "config"} for n, m in metas.items()})

    @property
    def last(self) -> int:
        return max(self.configs)

    @property
    def output_size(self) -> tuple[int, int]:
        return tuple(self.configs[self.last].image_size(self.last))

    def steps_per_unet(self, steps: list[int] | tuple[int, ...] | None) -> tuple[int, ...] | None:
        """Sampling steps: one number for every UNet, or one per UNet of the bundle (None: each config's)."""
        if steps is None or len(steps) == len(self.unets):
            return None if steps is None else tuple(steps)
        if len(steps) == 1:
            return tuple(steps) * len(self.unets)
        raise UserError(f"--steps takes one number, or one per UNet of the bundle ({len(self.unets)}); got {len(steps)}")

    def prepare(self, ca: Image.Image, garment: Image.Image, person_pose: np.ndarray,
                garment_pose: np.ndarray | None) -> tuple[dict[int, dict], tuple[int, int, int, int]]:
        """Each UNet's conditioning (a batch of one), and the box (left, top, right, bottom) of the output that
        holds the ca image. Poses are (K, 3) pixel (x, y, confidence) of their own image; ``garment_pose`` None
        for a flat garment. A picture of the shards' size and aspect is prepared exactly as the training stream
        prepares the shards' own."""
        size = self.output_size
        k = self.configs[self.last].num_keypoints
        ca_padded, pad = pad_to_aspect(ca.convert("RGB"), size)
        garment_padded, garment_pad = pad_to_aspect(garment.convert("RGB"), size)
        sample = {CA: ca_padded, GARMENT: garment_padded}
        for name, pose, image, offset in (("person_pose", person_pose, ca_padded, pad),
                                          ("garment_pose", garment_pose, garment_padded, garment_pad)):
            sample[name], sample[f"{name}_valid"] = pose_tensors(
                normalise_pose(pose, 1.0, offset, (image.height, image.width), k))
        conds = {n: {key: value[None] for key, value in unet_inputs(sample, config, n).items()}
                 for n, config in self.configs.items()}
        sx, sy = size[1] / ca_padded.width, size[0] / ca_padded.height
        return conds, (round(pad[0] * sx), round(pad[1] * sy), round((pad[0] + ca.width) * sx),
                       round((pad[1] + ca.height) * sy))

    def shard_batches(self, shards: str, batch_size: int, limit: int | None = None,
                      select: Callable[[dict], bool] | None = None, rank: int = 0,
                      world_size: int = 1) -> Iterator[dict[int, dict]]:
        """The samples of ``shards`` in order, as ``generate`` takes them: {unet number: the batch prepared
        at that UNet's size (uint8 images, as the training pipeline makes them)}, ``batch_size`` samples at a
        time; the first ``limit`` samples, or those ``select`` (a predicate on the raw sample, called in the
        shards' order) takes; this rank's share of them. Each sample is decoded once for all the UNets."""
        urls = resolve_shards(shards, "validation")

        def prepare(sample: dict) -> dict[int, dict]:
            return {n: unet_inputs(sample, config, n) for n, config in self.configs.items()}

        if limit is not None:
            select = Quota(total=limit)
        samples = iter(ValDataset(urls, self.configs[self.last].num_keypoints, INPUTS, prepare, rank, world_size,
                                  select=select, data=self.configs[self.last].data))
        while batch := list(itertools.islice(samples, batch_size)):
            yield {number: collate([s[number] for s in batch]) for number in self.configs}

    def generators(self, keys: list[str], seed: int) -> list[torch.Generator]:
        """One generator per sample, seeded by its key: its noise does not depend on its batch or rank."""
        return [torch.Generator(self.device).manual_seed(seed_for(seed, key)) for key in keys]

    def generate(self, conds: dict[int, dict], sampler: str | None = None, steps: tuple | None = None,
                 guidance: float | None = None, seed: int = 0, keys: list[str] | None = None) -> dict[int, torch.Tensor]:
        """Samples in [-1, 1] from every UNet of the bundle, {unet number: its output}, each later UNet
        super-resolving the output of the one before. ``steps``: one number for all, or one per UNet. With
        ``keys``, each sample's noise is seeded by its key (the same try-on in any batch), else by ``seed``."""
        return dict(self.stages(conds, sampler, steps, guidance, seed, keys))

    @torch.no_grad()
    def stages(self, conds: dict[int, dict], sampler: str | None = None, steps: tuple | None = None,
               guidance: float | None = None, seed: int = 0, keys: list[str] | None = None,
               on_step: Callable[[int, int, int], None] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """``generate``, one UNet at a time: (unet number, its output) as each finishes, ``on_step(unet number,
        i, n)`` after each sampling step (a page shows each UNet's picture and progress as they come)."""
        steps = self.steps_per_unet(steps)
        generator = (self.generators(keys, seed) if keys is not None
                     else torch.Generator(self.device).manual_seed(seed))
        previous = None
        for number, model in self.unets.items():
            # Each UNet's inputs from the prepared pictures, its low-res input the UNet before's output.
            cond = to_device({k: conds[number][k] for k in model.conditioning.keys if k != LOWRES}, self.device)
            if LOWRES in model.conditioning.keys:
                cond[LOWRES] = previous
            hook = None if on_step is None else functools.partial(on_step, number)
            previous = model.sample(cond, steps=steps[number - 1] if steps else None, sampler=sampler,
                                    guidance=guidance, generator=generator, on_step=hook)
            yield number, previous

    def __call__(self, ca, garment, person_pose, garment_pose=None, **kwargs) -> Image.Image:
        """The try-on of one pair, cropped back to the ca image's aspect. ``ca`` and ``garment``: PIL images,
        (H, W, 3) uint8 arrays or paths (transparency composited on white); poses in the pixels of their image:
        files (.npy, OpenPose or DressCode JSON) or the poses themselves (arrays or nested lists (18|25, 2|3),
        OpenPose's flat list, a parsed JSON dict); ``garment_pose`` None for a flat garment. ``kwargs`` go to
        ``generate``."""
        conds, box = self.prepare(*self.read(ca, garment, person_pose, garment_pose))
        return self.crop(self.generate(conds, **kwargs)[self.last][0], box)

    @staticmethod
    def read(ca, garment, person_pose, garment_pose=None) -> tuple:
        """The pair as ``prepare`` takes it, read by the readers and checks make_shards uses: a UserError
        listing every problem with its file (or argument) otherwise."""
        problems, counted = [], {}

        def name(source, argument):
            return str(source) if isinstance(source, (str, Path)) else argument

        ca = read_image(ca, problems, name(ca, "ca_image"))
        garment = read_image(garment, problems, name(garment, "garment_image"))
        person_pose = read_pose(person_pose, ca.size if ca else None, problems, counted,
                                name(person_pose, "person_pose"))
        if garment_pose is not None:
            garment_pose = read_pose(garment_pose, garment.size if garment else None, problems, counted,
                                     name(garment_pose, "garment_pose"))
        if problems:
            raise UserError("bad input:\n  " + "\n  ".join(problems))
        return ca, garment, person_pose, garment_pose

    def crop(self, image: torch.Tensor, box: tuple[int, int, int, int]) -> Image.Image:
        """One output in [-1, 1], (3, H, W) at any UNet's size, as a picture cropped to ``box`` (``prepare``'s,
        in the cascade's output pixels) scaled to its size."""
        sx, sy = image.shape[-1] / self.output_size[1], image.shape[-2] / self.output_size[0]
        return to_image(image).crop((round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)))
