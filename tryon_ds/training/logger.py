"""Every rank-0 side effect of a run: the console progress bar, ``metrics_unetN.jsonl``, wandb, TensorBoard and
sample images. Every scalar logged goes to all three sinks alike (``scalars``): a line of the JSONL file per
call, ``{"step": S, "train/loss": ..., ...}`` or ``{"step": S, "val/loss": ...}``, by the names TensorBoard
and wandb show.

Other ranks get a logger whose methods do nothing, so the training loop calls it unconditionally.
wandb's mode comes from ``logging.wandb`` (online/offline/disabled) unless ``WANDB_MODE`` is set; offline
and disabled never touch the network. wandb never stops or hangs a run: its start-up waits at most
``logging.wandb_init_timeout_s``, any failure of it (at start, while logging, at the end) switches it off
with one line in the log saying why, and the run goes on with TensorBoard; its end waits a bounded time.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .. import atomic
from ..config import Config
from ..perf import Throughput

WANDB_FINISH_TIMEOUT_S = 30.0


def peak_memory_gib() -> float:
    """The most memory this rank has held since it started: the CUDA allocator's peak on a GPU, the largest
    resident set on a CPU (what a rank's OOM is about in each case)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30  # Linux: KiB


class RunLogger:
    def __init__(self, config: Config, total_steps: int, start_step: int, throughput: Throughput | None = None):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.config = config
        self.name = f"unet{config.train_unet_number}"
        self.sample_dir = Path(config.output_dir) / "samples"
        self.sample_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = Path(config.output_dir) / f"metrics_{self.name}.jsonl"
        # A live bar on a terminal; in a batch job's log file, one plain line per logged step instead.
        self.live = config.logging.progress_bar and sys.stdout.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, desc=self.name, unit="step", dynamic_ncols=True,
                        disable=not self.live, file=sys.stdout, mininterval=1.0)
        self.tb = SummaryWriter(str(Path(config.log_dir) / self.name)) if config.logging.tensorboard else None
        self.wandb = self._start_wandb(os.environ.get("WANDB_MODE", config.logging.wandb))
        self.total = total_steps
        self.throughput = throughput
        self._last = self._start = (time.perf_counter(), start_step)

    def _start_wandb(self, mode: str):
        if mode == "disabled":
            return None
        try:
            import wandb

            settings = wandb.Settings(init_timeout=self.config.logging.wandb_init_timeout_s, silent=True)
            return wandb.init(project=self.config.logging.wandb_project, name=self.name, mode=mode,
                              dir=self.config.log_dir, config=self.config.to_dict(), resume="allow", settings=settings)
        except Exception as err:  # wandb must never stop training
            self._wandb_failed("could not start", err)
            return None

    def _wandb_failed(self, what: str, err: Exception) -> None:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        self.message(f"wandb {what} ({type(err).__name__}: {reason[:200]}); logging to TensorBoard only")
        self.wandb = None

    def _wandb_log(self, values: dict, step: int) -> None:
        if self.wandb is not None:
            try:
                self.wandb.log(values, step=step)
            except Exception as err:
                self._wandb_failed("failed while logging", err)

    def message(self, text: str) -> None:
        if getattr(self, "live", False):
            self.bar.write(text)
        else:
            print(text, flush=True)

    def step(self, step: int, loss: float, lr: float, grad_norm, loss_scale: float | None,
             samples_per_step: int) -> None:
        now = time.perf_counter()
        t0, s0 = self._last
        rate = (step - s0) * samples_per_step / max(now - t0, 1e-9)
        self._last = (now, step)
        postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "samples/s": f"{rate:.1f}"}
        scalars = {"train/loss": loss, "train/lr": lr, "train/samples_per_s": rate,
                   "memory/peak_gib": peak_memory_gib()}
        if self.throughput is not None:
            perf = self.throughput.figures(rate)
            scalars.update(perf)
            postfix["tflops"] = f"{perf['perf/tflops']:.3g}"
            if "perf/mfu" in perf:
                postfix["mfu"] = f"{100 * perf['perf/mfu']:.1f}%"
        if grad_norm is not None:
            grad_norm = float(grad_norm)
            postfix["grad_norm"] = f"{grad_norm:.3f}"
            scalars["train/grad_norm"] = grad_norm
        if loss_scale is not None:
            postfix["loss_scale"] = f"{loss_scale:g}"
            scalars["train/loss_scale"] = loss_scale
        if self.live:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.config.logging.progress_bar:
            t_start, s_start = self._start
            eta = (now - t_start) / max(step - s_start, 1) * (self.total - step)
            print(f"{self.name} step {step}/{self.total} " + " ".join(f"{k}={v}" for k, v in postfix.items())
                  + f" eta={eta / 60:.1f}min", flush=True)
        self.scalars(step, scalars)

    def scalars(self, step: int, values: dict) -> None:
        with open(self.metrics, "a") as f:  # a resumed run appends: the last line of a step is the one that counts
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        self._wandb_log(values, step)

    def images(self, step: int, grid, caption: str, kind: str = "samples") -> Path:
        """A grid of ``kind``: "samples" (a preview) or "quality" (a quality pass's, beside them)."""
        path = self.sample_dir / (f"{self.name}_step{step:08d}.png" if kind == "samples"
                                  else f"{self.name}_{kind}_step{step:08d}.png")
        atomic.save_image(grid, path)
        if self.tb is not None:
            self.tb.add_image(kind, np.asarray(grid), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self._wandb_log({kind: wandb.Image(grid, caption=caption)}, step)
        return path

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            run, self.wandb = self.wandb, None
            # An online run without a reachable server may try to upload for a long time: wait a bounded time.
            finisher = threading.Thread(target=_finish, args=(run,), daemon=True)
            finisher.start()
            finisher.join(WANDB_FINISH_TIMEOUT_S)
            if finisher.is_alive():
                self.message(f"wandb did not finish within {WANDB_FINISH_TIMEOUT_S:.0f} s; its local files are "
                             f"under {self.config.log_dir}/wandb (`wandb sync` uploads them)")


def _finish(run) -> None:
    try:
        run.finish()
    except Exception:  # the run's data stays on disk for `wandb sync`
        pass


class NullLogger:
    """What ranks other than 0 get."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
