"""Sample grids during training (ca | garment | sample | target), cheaply: one model built once on rank 0 in
the run's precision, loaded with the weights gathered to rank 0, sampled with a few DDIM steps. The other
ranks wait meanwhile, so the log says what each preview cost."""
from __future__ import annotations

import time

import torch

from ..cascade import CascadeUNet
from ..config import Config
from ..data.preprocess import image_grid
from ..model import COND_KEYS, DTYPES


class Previewer:
    def __init__(self, config: Config, device: torch.device, precision: str):
        self.config, self.device = config, device
        self.dtype = DTYPES[precision]
        self.model = None  # built at the first preview: runs that never preview never pay for it
        self.seconds = 0.0

    @torch.no_grad()
    def render(self, weights: dict, batch: dict):
        """A grid of ``logging.sample_count`` samples from ``weights`` (a whole state dict) on ``batch``."""
        start = time.perf_counter()
        n = self.config.train_unet_number
        if self.model is None:
            self.model = CascadeUNet(self.config, n).to(self.device, self.dtype).eval()
        self.model.load_state_dict(weights)
        count = min(self.config.logging.sample_count, len(batch["key"]))
        cond = {k: batch[k][:count].to(self.device) for k in COND_KEYS}
        cond = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in cond.items()}
        lowres = batch["lowres"][:count].to(self.device, self.dtype) if n == 2 else None
        out = self.model.sample(cond, lowres=lowres, steps=self.config.logging.preview_steps, sampler="ddim",
                                generator=torch.Generator(self.device).manual_seed(self.config.seed))
        grid = image_grid([cond["ca"], cond["garment"], out, batch["person"][:count].to(self.device)])
        self.seconds = time.perf_counter() - start
        return grid
