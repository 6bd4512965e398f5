"""Running the cascade: UNet 1 (base) at 128, then UNet 2 (super-resolution) at 256 conditioned on its output.

    pipe = TryOnPipeline.from_pretrained("bundle/")                 # EMA weights, fp32, CPU
    image = pipe(ca_image, garment_image, person_pose, garment_pose, seed=0)   # PIL in, PIL out

Inputs are prepared by the functions that prepare training data (tryon_ds/data/preprocess.py): letterboxed
to the last UNet's size, keypoints normalised to the letterboxed image, then resized to each UNet's size;
the result is cropped back to the ca image's aspect ratio.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from .bundle import read_unet
from .cascade import CascadeUNet
from .config import Config
from .data.pipeline import ValDataset, collate, resolve_shards
from .data.preprocess import letterbox, normalise_pose, pose_tensors, to_image, to_tensor, unet_inputs
from .errors import UserError
from .model import COND_KEYS


class TryOnPipeline:
    def __init__(self, unets: dict[int, CascadeUNet], configs: dict[int, Config], device: torch.device):
        self.unets, self.configs, self.device = unets, configs, device

    @classmethod
    def from_pretrained(cls, bundle: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> "TryOnPipeline":
        bundle = Path(bundle)
        if not bundle.is_dir():
            raise UserError(f"bundle folder {bundle} does not exist")
        if not (bundle / "unet1").is_dir():
            raise UserError(f"{bundle} has no unet1/: consolidate the base UNet's checkpoint into it first")
        device = torch.device(device)
        unets, configs = {}, {}
        for number in (1, 2):
            if number == 2 and not (bundle / "unet2").is_dir():
                break
            config, weights, _ = read_unet(bundle, number, ema)
            model = CascadeUNet(config, number)
            model.unet.load_state_dict({k: v.float() for k, v in weights.items()})
            unets[number], configs[number] = model.to(device).eval(), config
        if 2 in configs and tuple(configs[2].base_image_size) != tuple(configs[1].base_image_size):
            raise UserError(f"{bundle}: unet2 was trained on {list(configs[2].base_image_size)} inputs but unet1 "
                            f"makes {list(configs[1].base_image_size)} images")
        return cls(unets, configs, device)

    @property
    def last(self) -> int:
        return max(self.unets)

    @property
    def output_size(self) -> tuple[int, int]:
        return tuple(self.configs[self.last].image_size(self.last))

    def prepare(self, ca: Image.Image, garment: Image.Image, person_pose: np.ndarray,
                garment_pose: np.ndarray | None) -> tuple[dict[int, dict], tuple]:
        """Each UNet's conditioning (a batch of one), and how to crop the result back to the ca image. Poses
        are (K, 3) pixel (x, y, confidence) of their own image; ``garment_pose`` None for a flat garment."""
        size = self.output_size
        k = self.configs[self.last].unet(self.last).num_keypoints
        ca_l, scale, pad = letterbox(ca.convert("RGB"), size)
        g_l, g_scale, g_pad = letterbox(garment.convert("RGB"), size)
        sample = {"ca": to_tensor(ca_l), "garment": to_tensor(g_l)}
        for name, pose, s, p in (("person_pose", person_pose, scale, pad), ("garment_pose", garment_pose, g_scale, g_pad)):
            sample[name], sample[f"{name}_valid"] = pose_tensors(normalise_pose(pose, s, p, size, k))
        conds = {n: {key: value[None] for key, value in unet_inputs(sample, config, n).items()}
                 for n, config in self.configs.items()}
        return conds, (scale, pad, ca.size)

    def shard_batches(self, shards: str, batch_size: int, limit: int | None = None) -> Iterator[dict[int, dict]]:
        """The samples of ``shards`` in order, as ``generate`` takes them: {unet number: the batch prepared
        at that UNet's size}, ``batch_size`` samples at a time (``limit`` samples in all, if given)."""
        urls = resolve_shards(shards, "validation")
        iterators = {n: iter(ValDataset(urls, self.configs[n], n, 0, 1)) for n in self.unets}
        done = 0
        while limit is None or done < limit:
            n = batch_size if limit is None else min(batch_size, limit - done)
            samples = {number: list(itertools.islice(it, n)) for number, it in iterators.items()}
            if not samples[1]:
                return
            done += len(samples[1])
            yield {number: collate(batch) for number, batch in samples.items()}

    @torch.no_grad()
    def generate(self, conds: dict[int, dict], sampler: str | None = None, steps: tuple | None = None,
                 guidance: float | None = None, seed: int = 0) -> dict[int, torch.Tensor]:
        """Samples in [-1, 1] from every UNet of the bundle: {1: base output, 2: super-resolved output}."""
        generator = torch.Generator(self.device).manual_seed(seed)
        out, lowres = {}, None
        for number, model in self.unets.items():
            cond = {k: conds[number][k].to(self.device) for k in COND_KEYS}
            out[number] = lowres = model.sample(cond, lowres=lowres, steps=steps[number - 1] if steps else None,
                                                sampler=sampler, guidance=guidance, generator=generator)
        return out

    def __call__(self, ca: Image.Image, garment: Image.Image, person_pose: np.ndarray,
                 garment_pose: np.ndarray | None = None, **kwargs) -> Image.Image:
        conds, (scale, pad, (w, h)) = self.prepare(ca, garment, person_pose, garment_pose)
        result = to_image(self.generate(conds, **kwargs)[self.last][0])
        return result.crop((pad[0], pad[1], pad[0] + round(w * scale), pad[1] + round(h * scale)))
