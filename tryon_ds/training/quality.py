"""The quality pass: every ``quality_freq`` steps the UNet being trained samples a fixed held-out set, the
first ``quality_samples`` validation samples (whole images, the same at every pass), and is measured with the
evaluation's own code (tryon_ds/evaluation/): PSNR and SSIM over the whole image and in the garment region
always; paired LPIPS, and FID/KID against the same samples' ground truth, where their weight files are given
(``--inception_weights``, ``--alexnet_weights`` and ``--lpips_weights`` of the trainer, or the environment,
as tools/evaluate.py takes them). A diffusion loss says little about samples: the demo's UNet 2 has the lowest
loss of the three and is the one that loses to bilinear upsampling.

The samples are split over the ranks (sample i on rank i mod world size), each one's noise seeded by its
key, with the run's sampler and the UNet's sampling steps; a super-resolution UNet starts from the true
low-res input, as tools/evaluate.py's ``--sr-alone`` does. Every rank builds the sampling model in the run's
precision and loads the EMA (the raw weights without one) as it is gathered, a bucket at a time, so the pass
holds one model copy per rank, as a preview does on rank 0. Rank 0 gathers the per-sample values and
features, not images, and averages them in key order: the same samples, noise and figures whatever the
number of ranks (up to the rounding of a batch of another size).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..batch import CA, MASK, PERSON
from ..compat import shutdown_workers
from ..config import Config
from ..data.pipeline import Data
from ..data.preprocess import as_uint8, image_grid, to_device
from ..errors import UserError
from ..evaluation.field import FieldMetrics, ReferenceSet, summarise
from ..evaluation.quality import QualityTable, size_name
from ..model import DTYPES, LOWRES
from ..seeding import seed_for
from .previews import sampling_model

SAMPLE = "sample"


class QualityPass:
    def __init__(self, config: Config, data: Data, world, precision: str, weights: dict[str, Path | None]):
        self.config, self.data, self.world = config, data, world
        self.number = config.train_unet_number
        self.dtype = DTYPES[precision]
        self.size = config.image_size(self.number)
        self.field = FieldMetrics([self.size], weights, world.device)  # the networks, loaded once
        self.notes = self.field.notes  # what the pass leaves out for want of weights, said once at start
        self.share = None  # this rank's samples (a batch as the pipeline makes it), read at the first pass
        self.measured = 0  # samples the last pass measured, over every rank (on rank 0)
        trained = config.crop_size(self.number) or self.size  # no forward holds more pixels than a micro-batch
        self.chunk = max(1, config.batch_size * trained[0] * trained[1] // (self.size[0] * self.size[1]))

    def _read_share(self) -> dict:
        """The first ``quality_samples`` validation samples, every rank reading the same ones, keeping its
        own: sample i on rank i mod world size."""
        wanted, batches, got = self.config.quality_samples, [], 0
        # the ca image and the mask besides the UNet's inputs: the garment region, as the evaluation finds it
        loader = iter(self.data.val(min(wanted, 16), whole=True, extra=(CA, MASK)))
        for batch in loader:
            batches.append(batch)
            got += len(batch["key"])
            if got >= wanted:
                break
        shutdown_workers(loader)
        if not batches:
            raise UserError(f"quality_freq is {self.config.quality_freq} but {self.config.data_dir} has no validation "
                            "samples to measure: write shards with --val-fraction > 0, or set quality_freq: 0")
        keys = [k for b in batches for k in b["key"]][:wanted]
        mine = list(range(self.world.rank, len(keys), self.world.size))
        joined = {k: (torch.cat([b[k] for b in batches])[:len(keys)] if torch.is_tensor(batches[0][k])
                      else [v for b in batches for v in b[k]][:len(keys)]) for k in batches[0]}
        return {k: v[mine] if torch.is_tensor(v) else [v[i] for i in mine] for k, v in joined.items()}

    @torch.no_grad()
    def run(self, gather: Callable[[Callable[[dict], None]], None]):
        """One pass. ``gather(into)`` brings the weights to every rank, a bucket at a time (a collective).
        Returns ({quality/* key: value}, a grid of rank 0's samples) on rank 0, (None, None) elsewhere."""
        start = time.perf_counter()
        model = sampling_model(self.config, self.world.device, self.dtype, gather, "quality pass")
        if self.share is None:
            self.share = self._read_share()
        raw = self.share
        batch = to_device(raw, self.world.device)
        cond = {k: batch[k].to(self.dtype) if batch[k].is_floating_point() else batch[k]
                for k in model.conditioning.keys}
        keys, out = raw["key"], []
        for i in range(0, len(keys), self.chunk):
            generators = [torch.Generator(self.world.device).manual_seed(seed_for(self.config.seed, key))
                          for key in keys[i:i + self.chunk]]
            out.append(model.sample({k: v[i:i + self.chunk] for k, v in cond.items()},
                                    generator=generators).float())
        samples = torch.cat(out) if out else batch[PERSON][:0]
        table = QualityTable()
        on_cpu = to_device(raw, torch.device("cpu"))
        if keys:
            table.add({SAMPLE: samples.cpu()}, on_cpu)
        self.field.records = {}
        made = as_uint8(samples)
        self.field.add(keys, ["paired"] * len(keys), raw.get("category") or [""] * len(keys), made, raw[PERSON])
        real = {}
        if self.field.inception is not None and keys:  # the pass's own ground truth is its reference set
            features = self.field.inception(raw[PERSON]).float().numpy()
            real = {key: ("", {size_name(self.size): f}) for key, f in zip(keys, features)}
        shown = [model.upsample(cond[LOWRES]).float() if name == LOWRES else batch[name].float()
                 for name in model.conditioning.preview]
        del model
        mine = (table, self.field.records, real)
        parts = [None] * self.world.size
        if self.world.size > 1:
            dist.all_gather_object(parts, mine)
        else:
            parts = [mine]
        if not self.world.is_main:
            return None, None
        for other, _, _ in parts[1:]:
            table.merge(other)
        self.measured = table.count
        size = size_name(self.size)
        figures = {f"quality/{k}": v for k, v in table.rows().get(SAMPLE, {}).items()}
        records = {k: v for _, part, _ in parts for k, v in part.items()}
        reference = ReferenceSet.merge([r for _, _, r in parts], [size]) if self.field.inception is not None else None
        paired = summarise(records, [size], reference, self.config.seed)["all"][size]["paired"]
        figures.update({f"quality/{k}": paired[k] for k in ("lpips", "fid", "kid_x1000") if paired.get(k) is not None})
        figures["quality/seconds"] = time.perf_counter() - start
        grid = image_grid([*shown, samples, batch[PERSON]]) if keys else None
        return figures, grid
