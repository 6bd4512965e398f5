"""Every rank-0 side effect of a run: the console progress bar, wandb, TensorBoard and sample images.

Other ranks get a logger whose methods do nothing, so the training loop calls it unconditionally.
wandb's mode comes from ``logging.wandb`` (online/offline/disabled) unless ``WANDB_MODE`` is set; in
offline and disabled modes it never touches the network, and if it cannot start at all the run goes on
with TensorBoard and says so.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import Config


def image_grid(columns: list[torch.Tensor]) -> Image.Image:
    """Images in [-1, 1], each column a (B, 3, H, W) batch of one size -> one PNG-able grid, a row per sample."""
    rows = torch.cat([c.float().clamp(-1, 1) for c in columns], dim=3)  # B, 3, H, W * ncols
    grid = torch.cat(list(rows), dim=1)  # 3, B*H, W*ncols
    arr = ((grid.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
    return Image.fromarray(arr)


class RunLogger:
    def __init__(self, config: Config, stage: int, total_steps: int, start_step: int, run_name: str):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.config, self.stage = config, stage
        self.sample_dir = Path(config.output_dir) / "samples"
        self.sample_dir.mkdir(parents=True, exist_ok=True)
        self.tb = SummaryWriter(str(Path(config.log_dir) / run_name)) if config.logging.tensorboard else None
        self.wandb = None
        mode = os.environ.get("WANDB_MODE", config.logging.wandb)
        if mode != "disabled":
            try:
                import wandb

                self.wandb = wandb.init(project=config.logging.wandb_project, name=run_name, mode=mode,
                                        dir=config.log_dir, config=config.to_dict(), resume="allow")
            except Exception as err:  # wandb must never stop training
                self.message(f"wandb could not start ({type(err).__name__}: {err}); logging to TensorBoard only")
        # A live bar on a terminal; in a batch job's log file, one plain line per logged step instead.
        self.live = config.logging.progress_bar and sys.stdout.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, desc=f"unet{stage}", unit="step", dynamic_ncols=True,
                        disable=not self.live, file=sys.stdout, mininterval=1.0)
        self.total = total_steps
        self._last = self._start = (time.perf_counter(), start_step)

    def message(self, text: str) -> None:
        if getattr(self, "live", False):
            self.bar.write(text)
        else:
            print(text, flush=True)

    def step(self, step: int, loss: float, lr: float, grad_norm: float | None, loss_scale: float | None,
             samples_per_step: int) -> None:
        now = time.perf_counter()
        t0, s0 = self._last
        rate = (step - s0) * samples_per_step / max(now - t0, 1e-9)
        self._last = (now, step)
        postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "samples/s": f"{rate:.1f}"}
        if grad_norm is not None:
            postfix["grad_norm"] = f"{grad_norm:.3f}"
        if loss_scale is not None:
            postfix["loss_scale"] = f"{loss_scale:g}"
        if self.live:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.config.logging.progress_bar:
            t_start, s_start = self._start
            eta = (now - t_start) / max(step - s_start, 1) * (self.total - step)
            print(f"unet{self.stage} step {step}/{self.total} " + " ".join(f"{k}={v}" for k, v in postfix.items())
                  + f" eta={eta / 60:.1f}min", flush=True)
        scalars = {"train/loss": loss, "train/lr": lr, "train/samples_per_s": rate}
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        if loss_scale is not None:
            scalars["train/loss_scale"] = loss_scale
        self.scalars(step, scalars)

    def scalars(self, step: int, values: dict) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def images(self, step: int, grid: Image.Image) -> Path:
        path = self.sample_dir / f"unet{self.stage}_step{step:08d}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        grid.save(tmp, format="PNG")
        os.replace(tmp, path)
        if self.tb is not None:
            self.tb.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Image(grid, caption="ca | garment | EMA sample | target")}, step=step)
        return path

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class NullLogger:
    """What ranks other than 0 get."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
