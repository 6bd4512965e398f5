"""The DeepSpeed engine of one UNet: built (partitioned from the start under ZeRO-3), stepped, and read.

DeepSpeed returns a different optimizer wrapper per ZeRO stage and precision; what the trainer needs from
them (the running out of the loss scale, the global gradient norm, the whole weights, the bytes held) is read
here through one function each, so the training loop never depends on which wrapper it got; what that takes
of DeepSpeed beyond its public API is in compat.py.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from ..cascade import CascadeUNet
from ..config import Config
from ..errors import UserError
from .. import compat
from .ds_config import zero_stage
from .ema import EMA
from .gather import in_buckets, streamed


def lr_factor(config: Config):
    """Linear warm-up to the learning rate, then constant (``lr_schedule: constant``, the paper's) or cosine
    decay to min_lr_ratio of it."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.cosine_decay_max_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build(config: Config, ds_config: dict, load_from: Path | None = None):
    """UNet ``config.train_unet_number`` in a DeepSpeed engine with AdamW and the LR schedule, its EMA, and
    the state of ``load_from`` if given. Returns (model, engine, scheduler, ema)."""
    import deepspeed

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    # Under ZeRO-3 each layer is partitioned as soon as it is built, so no rank ever holds the whole model
    # (the sr preset is 3.9 GB in fp32).
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_stage(ds_config) == 3):
        model = CascadeUNet(config, config.train_unet_number)
    if model.compile_mode is not None and zero_stage(ds_config) == 3:
        gather_whole(model.unet)
    model.compile_unet()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(config)))
    ema = EMA(engine, config.ema_decay) if config.use_ema else None
    if load_from is not None:
        load(engine, ema, load_from)
    return model, engine, scheduler, ema


def load(engine, ema: EMA | None, ckpt: Path) -> float:
    """The engine's and the EMA's state from checkpoint folder ``ckpt``; returns the seconds it took.

    DeepSpeed reads each of this rank's files whole (``torch.load``) beside the states the engine already
    holds: at real size base's resume peaked 2.3 GiB above its training steps (BENCHMARKS.md). Here its
    checkpoint engine maps the files instead (``mmap=True``): their tensors are read from the page cache as
    they are copied in, memory the kernel can drop, and a tensor DeepSpeed keeps as it is (torch's optimizer
    keeps the loaded moments) becomes private memory only page by page, as the next step writes it. And it
    reads them with the tensors-only unpickler (DeepSpeed's own load unpickles anything), allowing just the
    DeepSpeed classes its files hold."""
    from .checkpoint import load_ema

    start = time.perf_counter()
    with compat.mapped_tensor_loads(engine):
        loaded, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    if loaded is None:
        raise UserError(f"DeepSpeed could not load the checkpoint {ckpt}")
    load_ema(ckpt, ema)
    return time.perf_counter() - start


def gather_whole(unet: torch.nn.Module) -> None:
    """Make a compiled UNet one ZeRO-3 leaf module: DeepSpeed gathers all its weights before its forward and
    releases them after its backward, rather than module by module in hooks on every submodule, which break
    the graph into one per module (hundreds, past torch's recompile limit). The weights are whole on each
    rank for the UNet's forward and backward only, as ZeRO-2 holds them always; optimizer state, gradients
    and the weights at rest stay partitioned.

    DeepSpeed reduces a leaf's gradients in a full backward hook on the leaf, which fires once the gradients
    of the leaf's inputs are computed; if no input needs one (the noisy image never does) it fires as the
    gradient of the output arrives, before the UNet's backward, which then finds its weights released (size
    0). So the noisy image enters the UNet requiring a gradient: the hook fires after the whole backward
    (which computes that one extra input gradient of the first convolution), and its AccumulateGrad nodes,
    which autograd runs first, have delivered the weights' gradients by then."""
    compat.make_zero3_leaf(unet)
    unet.register_forward_pre_hook(
        lambda module, args: (args[0].detach().requires_grad_(torch.is_grad_enabled()), *args[1:]))


class LossScaleExhausted(Exception):
    """fp16 overflowed at DeepSpeed's minimum loss scale: no step can be taken any more."""


def step(engine) -> None:
    """``engine.step()``; DeepSpeed's bare exception for a loss scale run down to its minimum becomes a
    LossScaleExhausted (the step was an overflow, so the weights are those of the last good step)."""
    try:
        engine.step()
    except Exception as err:
        if compat.is_loss_scale_exhausted(err):
            raise LossScaleExhausted(str(err)) from None
        raise


def train_step(engine, ema, micro_batches, step_number: int, seed_of=None, after_backward=None):
    """One optimizer step, as training takes it: for each micro-batch the diffusion loss (the random draws
    seeded by ``seed_of(micro)`` when given), its backward and DeepSpeed's step, which applies AdamW with
    clipping at the accumulation boundary; then the EMA, where DeepSpeed applied the step and its loss and
    gradient norm were finite. A non-finite loss whose gradients stayed finite (an fp32 sum overflowing)
    would still update the weights: its backward is made NaN, so DeepSpeed skips the step on every rank as
    any overflow. Returns (the micro-batches' summed loss, on the device; whether the step was applied).
    ``after_backward()``, if given, runs between each backward and step (a benchmark reads the gradients
    held there). Raises LossScaleExhausted."""
    loss_sum = torch.zeros((), device=engine.device)
    for micro, batch in enumerate(micro_batches):
        if seed_of is not None:
            torch.manual_seed(seed_of(micro))
        loss = engine(batch)
        engine.backward(loss * torch.where(torch.isfinite(loss.detach()), 1.0, math.nan))
        if after_backward is not None:
            after_backward()
        step(engine)
        loss_sum += loss.detach().float()
    applied = engine.was_step_applied()
    if applied and ema is not None:
        ema.update(step_number, torch.isfinite(loss_sum) & grad_norm_ok(engine))
    return loss_sum, applied


def grad_norm_ok(engine) -> torch.Tensor | bool:
    """Whether the last step's global gradient norm is finite: a device tensor where DeepSpeed keeps one
    (so no host sync here), else a bool; True where DeepSpeed does not compute the norm."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return True
    if torch.is_tensor(norm):
        return torch.isfinite(norm)
    return math.isfinite(norm)


def release_parameters(engine) -> None:
    """Every ZeRO-3 parameter back to its partition, none gathered or in flight (DeepSpeed's public
    ``empty_partition_cache``; nothing to do under ZeRO-0/1/2). A forward outside a training step (validation,
    an evaluation) leaves the parameters ZeRO-3's prefetcher fetched for the next module in flight, as no
    backward comes to release them: holding memory, and meeting a later ``GatheredParameters`` (a preview's
    or a bundle's gather) with DeepSpeed's "Cannot partition a param in flight" on one rank while the other
    copies empty tensors. Where the prefetch bucket is small against the model (a real-size run's settings)
    that is the first preview after a validation."""
    if engine.zero_optimization_stage() == 3:
        engine.empty_partition_cache()


@torch.no_grad()
def raw_state_dict(engine, is_main: bool, bucket_numel: int = 1 << 26, into: Callable[[dict], None] | None = None,
                   everywhere: bool = False) -> dict | None:
    """The whole model's current weights (fp32, CPU) on rank 0 (on every rank with ``everywhere``), None
    elsewhere; under ZeRO-3 gathered a bucket at a time, each bucket's part handed to ``into`` as it comes
    where given (training/gather.py)."""
    receives = is_main or everywhere
    return streamed(receives, _raw_parts(engine, receives, bucket_numel), into)


def _raw_parts(engine, receives: bool, bucket_numel: int) -> Iterator[dict]:
    import deepspeed

    def fp32(tensors) -> dict:
        return {k: v.detach().float().cpu().clone() for k, v in tensors} if receives else {}

    release_parameters(engine)
    params = list(engine.module.named_parameters())
    if not any(compat.is_partitioned(p) for _, p in params):
        yield fp32(engine.module.state_dict().items())
        return
    for bucket in in_buckets(params, lambda item: compat.full_numel(item[1]), bucket_numel):
        with deepspeed.zero.GatheredParameters([p for _, p in bucket]):
            yield fp32(bucket)
    yield fp32(engine.module.named_buffers())  # buffers are not partitioned
    dist.barrier()


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def state_bytes(engine) -> dict:
    """Bytes this rank holds now by kind: its parameters (a ZeRO-3 rank: its partition), the gradients it keeps,
    the optimizer's fp32 master copy and Adam's moments; what tools/plan_memory.py estimates."""
    held = compat.optimizer_tensors(engine)
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None] + held["grads"]
    return {"params": _tensor_bytes(compat.local_partition(p) for p in engine.module.parameters()),
            "grads": _tensor_bytes(grads), "master": _tensor_bytes(held["master"]),
            "moments": _tensor_bytes(held["moments"])}
