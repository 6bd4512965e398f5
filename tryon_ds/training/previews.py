"""Sample grids during training, cheaply: a model built on rank 0 in the run's precision for the preview and
dropped after it, loaded with the weights as they are gathered to rank 0, a bucket at a time, sampled with
a few DDIM steps on the first validation samples (the same held-out samples at every preview, whole images
even for a UNet trained on crops), a few at a time: no forward holds more pixels than a training micro-batch,
so a preview needs no more activation memory than a training step (whole images of a UNet trained on crops,
all at once, are what took rank 0 of a real-size run out of memory; BENCHMARKS.md). A row per sample: what
the UNet is conditioned on (its ``preview`` inputs: ca | garment for a Parallel-UNet, the upsampled low-res
image for UNet 3), then the sample and the target. The other ranks wait meanwhile, so the log says what
each preview cost."""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..batch import PERSON
from ..cascade import CascadeUNet
from ..compat import shutdown_workers
from ..config import Config
from ..data.pipeline import Data
from ..data.preprocess import image_grid, to_device
from ..model import DTYPES, LOWRES


class Previewer:
    def __init__(self, config: Config, data: Data, device: torch.device, precision: str):
        self.config, self.data, self.device = config, data, device
        self.dtype = DTYPES[precision]
        self.batch = None  # read at the first preview: runs that never preview never pay for it
        self.seconds = 0.0
        n = config.train_unet_number
        whole, trained = config.image_size(n), config.crop_size(n) or config.image_size(n)
        self.chunk = max(1, config.batch_size * trained[0] * trained[1] // (whole[0] * whole[1]))

    def columns(self) -> str:
        names = {LOWRES: "low-res input"}
        shown = self.config.conditioning(self.config.train_unet_number).preview
        return " | ".join([names.get(n, n) for n in shown] + ["sample", "target"])

    def _first_batch(self) -> dict:
        batches = iter(self.data.val(self.config.logging.sample_count, whole=True))
        batch = next(batches)
        shutdown_workers(batches)
        return to_device(batch, self.device)

    @torch.no_grad()
    def render(self, gather: Callable[[Callable[[dict], None]], None]):
        """A grid of the first ``logging.sample_count`` validation samples. ``gather(into)`` brings the weights
        (the collective every rank takes part in) and hands them to ``into`` a bucket at a time, which copies
        each straight into the preview model: no whole second copy of the weights is ever held."""
        start = time.perf_counter()
        # Eager even when the UNet trains compiled: a preview is seconds of sampling, its own graph (another
        # module, batch and grad mode) would take longer to compile than all the previews of a run.
        model = sampling_model(self.config, self.device, self.dtype, gather, "preview")
        if self.batch is None:
            self.batch = self._first_batch()
        batch = self.batch
        cond = {k: batch[k].to(self.dtype) if batch[k].is_floating_point() else batch[k]
                for k in model.conditioning.keys}
        generator = torch.Generator(self.device).manual_seed(self.config.seed)
        out = torch.cat([model.sample({k: v[i:i + self.chunk] for k, v in cond.items()},
                                      steps=self.config.logging.preview_steps, sampler="ddim", generator=generator)
                         for i in range(0, len(batch[PERSON]), self.chunk)])
        shown = [model.upsample(cond[LOWRES]) if name == LOWRES else batch[name]
                 for name in model.conditioning.preview]
        grid = image_grid([*shown, out, batch[PERSON]])
        self.seconds = time.perf_counter() - start
        return grid


def sampling_model(config: Config, device: torch.device, dtype: torch.dtype,
                   gather: Callable[[Callable[[dict], None]], None], what: str) -> CascadeUNet:
    """The trained UNet built for sampling (a preview, a quality pass), its weights copied in as ``gather``
    hands them over a bucket at a time: no whole second copy of them is held."""
    model = CascadeUNet(config, config.train_unet_number).to(device, dtype).eval()
    target = model.state_dict()
    missing = set(target)

    def into(bucket: dict) -> None:
        for name, value in bucket.items():
            target[name].copy_(value)
            missing.discard(name)

    gather(into)
    if missing:
        raise RuntimeError(f"{what}: no weights came for {len(missing)} tensor(s), e.g. {sorted(missing)[0]}")
    return model
