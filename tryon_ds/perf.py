"""How close to the hardware's limit a step runs: the FLOPs of a training step, counted once from the model
itself, and the peak the device could deliver.

FLOPs are counted by ``torch.utils.flop_counter`` over the training loss's forward and backward for one sample
on the meta device (no memory, no compute: shapes only), so they follow the model as it is, never a formula
beside it. Matmuls, convolutions and attention are what it counts (2 FLOPs per multiply-add), as MFU is
defined by PaLM and reported by the field; normalisation and elementwise work are not.

A GPU's peak is its datasheet's dense (not sparse) tensor throughput at the run's precision: bf16/fp16, or
TF32 for an fp32 run (the trainer allows TF32 matmuls). A CPU's is measured: half a second of fp32 matmuls.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import atomic

# Datasheet dense throughput, TFLOP/s: (bf16/fp16 tensor, TF32 tensor, fp32). The first pattern that matches
# ``torch.cuda.get_device_name()`` wins, so a variant comes before its family.
PEAKS = (
    (r"H100.*PCIe", (756.0, 378.0, 51.2)),
    (r"H100.*NVL", (835.0, 418.0, 60.0)),
    (r"H100|H800", (989.4, 494.7, 66.9)),
    (r"H200", (989.4, 494.7, 66.9)),
    (r"A100|A800", (312.0, 156.0, 19.5)),
    (r"L40S", (362.1, 183.0, 91.6)),
    (r"L40\b", (181.0, 90.5, 90.5)),
    (r"\bL4\b", (121.0, 60.0, 30.3)),
    (r"\bA10\b", (125.0, 62.5, 31.2)),
    (r"A6000", (154.8, 77.4, 38.7)),
    (r"V100", (125.0, None, 15.7)),  # fp16 only: no bf16 and no TF32 on Volta
    (r"RTX 4090", (165.2, 82.6, 82.6)),
    (r"RTX 3090", (71.0, 35.6, 35.6)),
)
PRECISIONS = ("bf16", "tf32", "fp32")


def step_flops(config, unet_number: int) -> float:
    """FLOPs of one training sample of UNet ``unet_number`` (forward and backward of its loss), at its
    training size (its crops, for a UNet trained on crops)."""
    return _counted(config, unet_number, backward=True)


def cached_step_flops(config, unet_number: int) -> float:
    """``step_flops``, kept on disk (``$XDG_CACHE_HOME`` or ~/.cache, ``tryon_ds/flops/``) under what the
    count depends on: the cascade's UNets, its diffusion settings, torch's version and this package's own
    source, so a restarted or repeated run does not count again (seconds at real size, a second for tiny).
    A cache that cannot be read or written is counted past."""
    cfg = config.to_dict()
    what = {"unet": unet_number, "unets": cfg["unets"], "diffusion": cfg["diffusion"], "channels": cfg["channels"],
            "torch": torch.__version__, "source": _source_digest()}
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tryon_ds" / "flops" / f"{key}.json"
    try:
        return float(json.loads(path.read_text())["flops"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    flops = step_flops(config, unet_number)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, {"flops": flops, **what})
    except OSError:
        pass
    return flops


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.relative_to(Path(__file__).parent).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def sample_flops(config, unet_number: int) -> float:
    """FLOPs of sampling one image with UNet ``unet_number`` as inference and the quality pass do: its
    sampling steps, each a forward of the denoiser at the whole image size (crops are for training), two of
    them with classifier-free guidance."""
    if config.crop_size(unet_number):
        config = config.with_unet(unet_number, dataclasses.replace(config.unet(unet_number), crop_size=None))
    guided = config.conditioning(unet_number).guided and config.diffusion.guidance != 1.0
    return config.unet(unet_number).sample_steps * (2 if guided else 1) * _counted(config, unet_number, backward=False)


def _counted(config, unet_number: int, backward: bool) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from .cascade import CascadeUNet, random_batch

    with torch.device("meta"):
        model = CascadeUNet(config, unet_number)
    batch = {k: v.to("meta") for k, v in random_batch(config, unet_number, 1).items()}
    with FlopCounterMode(display=False) as counter:
        loss = model(batch)
        if backward:
            loss.backward()
    return float(counter.get_total_flops())


def datasheet_peak(device_name: str, precision: str) -> float | None:
    """The device's dense peak in FLOP/s at ``precision`` ("bf16"/"fp16", "tf32", "fp32"); None if unknown."""
    column = PRECISIONS.index("bf16" if precision == "fp16" else precision)
    for pattern, peaks in PEAKS:
        if re.search(pattern, device_name):
            return peaks[column] * 1e12 if peaks[column] is not None else None
    return None


def measured_matmul_peak(seconds: float = 0.5, n: int = 1024, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> float:
    """The device's dense matmul throughput in FLOP/s, n x n by n x n in ``dtype`` for ``seconds`` (on a CPU,
    with the threads this process has)."""
    device = torch.device(device)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # the first call allocates and picks the kernel
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10 if device.type == "cuda" else 1):
            a @ b
            done += 1
        sync()
    return 2 * n**3 * done / (time.perf_counter() - start)


def device_peak(device: torch.device, precision: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from) for a run on ``device`` at ``precision`` ("bf16", "fp16", "fp32")."""
    if override_tflops is not None:
        return override_tflops * 1e12, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = datasheet_peak(name, "tf32" if precision == "fp32" else precision)
        return peak, f"{name} datasheet" if peak else f"{name}: not in tryon_ds/perf.py's table"
    # A quarter of a second: every run measures it at start, and ~10 products of 1024 x 1024 settle the figure.
    return measured_matmul_peak(0.25), "measured fp32 matmul"


@dataclass(frozen=True)
class Throughput:
    """What turns a run's samples/s into achieved FLOP/s per rank and model-FLOPs utilisation."""
    flops_per_sample: float
    ranks: int
    peak: float | None  # FLOP/s per rank; None: unknown, no MFU

    def figures(self, samples_per_s: float) -> dict[str, float]:
        achieved = samples_per_s * self.flops_per_sample / self.ranks
        return {"perf/tflops": achieved / 1e12, **({"perf/mfu": achieved / self.peak} if self.peak else {})}
