"""Sample grids during training, cheaply: one model built once on rank 0 in the run's precision, loaded with
the weights gathered to rank 0, sampled with a few DDIM steps on the first validation samples (the same
held-out samples at every preview, whole images even for a UNet trained on crops). A row per sample: what
the UNet is conditioned on (its ``preview`` inputs: ca | garment for a Parallel-UNet, the upsampled low-res
image for UNet 3), then the sample and the target. The other ranks wait meanwhile, so the log says what
each preview cost."""
from __future__ import annotations

import time

import torch

from ..cascade import CascadeUNet
from ..config import Config
from ..data.pipeline import Data, shutdown_workers
from ..data.preprocess import image_grid, to_device
from ..model import DTYPES, LOWRES


class Previewer:
    def __init__(self, config: Config, data: Data, device: torch.device, precision: str):
        self.config, self.data, self.device = config, data, device
        self.dtype = DTYPES[precision]
        self.model = self.batch = None  # built at the first preview: runs that never preview never pay for it
        self.seconds = 0.0

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
    def render(self, weights: dict):
        """A grid of the first ``logging.sample_count`` validation samples from ``weights`` (a whole state dict)."""
        start = time.perf_counter()
        if self.model is None:
            # Eager even when the UNet trains compiled: a preview is seconds of sampling, its own graph (another
            # module, batch and grad mode) would take longer to compile than all the previews of a run.
            self.model = CascadeUNet(self.config, self.config.train_unet_number).to(self.device, self.dtype).eval()
            self.batch = self._first_batch()
        self.model.load_state_dict(weights)
        batch = self.batch
        cond = {k: batch[k].to(self.dtype) if batch[k].is_floating_point() else batch[k]
                for k in self.model.conditioning.keys}
        out = self.model.sample(cond, steps=self.config.logging.preview_steps, sampler="ddim",
                                generator=torch.Generator(self.device).manual_seed(self.config.seed))
        shown = [self.model.upsample(cond[LOWRES]) if name == LOWRES else batch[name]
                 for name in self.model.conditioning.preview]
        grid = image_grid([*shown, out, batch["person"]])
        self.seconds = time.perf_counter() - start
        return grid
