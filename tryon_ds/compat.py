"""Every reach into a dependency beyond its public API, in one place: DeepSpeed's optimizer wrappers, ZeRO's
parameter attributes, its checkpoint engine and its files, torch's c10d store and its DataLoader's workers,
CPython's exit handlers. Checked on DeepSpeed 0.19.8 and torch 2.13.0 (``CHECKED``; setup.cfg bounds DeepSpeed
to 0.19.x for this reason). A new release that moves one of them fails ``tests/test_compat.py``, which
exercises each function here on real engines and names the one that changed.

The rest of the package uses DeepSpeed's public API only: ``deepspeed.initialize``, ``deepspeed.zero.Init``,
``deepspeed.zero.GatheredParameters``, ``deepspeed.init_distributed``, the engine's documented methods
(``backward``, ``step``, ``save_checkpoint``, ``load_checkpoint``, ``empty_partition_cache``, ...) and the
``ds_to_universal`` command.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

CHECKED = {"deepspeed": "0.19.8", "torch": "2.13.0"}


# --------------------------------------------------------------------------- ZeRO-3 parameters
def is_partitioned(p: torch.nn.Parameter) -> bool:
    """Whether ZeRO-3 partitioned ``p`` (its ``data`` is then empty outside a gather)."""
    return hasattr(p, "ds_id")


def full_numel(p: torch.nn.Parameter) -> int:
    """The whole parameter's element count, partitioned or not."""
    return p.ds_numel if is_partitioned(p) else p.numel()


def full_shape(p: torch.nn.Parameter) -> torch.Size:
    return p.ds_shape if is_partitioned(p) else p.shape


def local_partition(p: torch.nn.Parameter) -> torch.Tensor:
    """What this rank holds of ``p`` at rest: its ZeRO-3 partition (in the module's dtype), or all of it."""
    return p.ds_tensor if is_partitioned(p) else p.data


def local_fp32_partition(p: torch.nn.Parameter) -> torch.Tensor:
    """A ZeRO-3 parameter's fp32 master partition on this rank, flat (a view, not a copy, unless offloaded)."""
    from deepspeed.utils import safe_get_local_fp32_param

    local = safe_get_local_fp32_param(p)
    return (local if local is not None else p.ds_tensor.float()).reshape(-1)


def make_zero3_leaf(module: torch.nn.Module) -> None:
    """Have ZeRO-3 gather ``module``'s parameters as one, around its forward and backward (training/engine.py,
    ``gather_whole``, says why a compiled UNet needs it)."""
    from deepspeed.utils import set_z3_leaf_module

    set_z3_leaf_module(module, True)


# --------------------------------------------------------------------------- the optimizer's fp32 masters
def fragment(p: torch.nn.Parameter) -> tuple[torch.Tensor | None, int] | None:
    """ZeRO-1/2: (this rank's slice of ``p``'s fp32 master, where the slice starts in the flattened
    parameter), (None, 0) where this rank holds none of it; None if ``p`` has no such mapping (not ZeRO-1/2).
    The mapping is the one DeepSpeed's universal checkpoints use."""
    if not hasattr(p, "_hp_mapping"):
        return None
    mapping = p._hp_mapping
    if mapping is None:
        return None, 0
    return mapping.hp_fragment, mapping.lp_fragment_address.start


def zero0_masters(optimizer) -> dict[int, torch.Tensor]:
    """ZeRO-0's fp16/bf16 wrappers: parameter id -> its fp32 master tensor; empty for a plain optimizer."""
    if hasattr(optimizer, "fp32_groups"):  # FP16_UnfusedOptimizer: one fp32 copy per parameter
        return {id(lp): hp for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups) for lp, hp in zip(lps, hps)}
    if hasattr(optimizer, "fp32_groups_flat"):  # FP16_Optimizer: one flat fp32 copy per group
        out = {}
        for lps, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat):
            offset = 0
            for lp in lps:
                out[id(lp)] = flat.narrow(0, offset, lp.numel()).view_as(lp)
                offset += lp.numel()
        return out
    return {}


def optimizer_tensors(engine) -> dict[str, list[torch.Tensor]]:
    """What this rank's optimizer holds, by kind: ``master`` (the fp32 copy of the weights, whatever wrapper
    keeps it), ``grads`` (the gradients it keeps beside the module's: ZeRO-1/2's averaged partition, the
    masters' own) and ``moments`` (Adam's)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    moments = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    master = []
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat"):
        master += list(getattr(opt, name, []) or [])
    master += [t for group in getattr(opt, "fp32_groups", []) for t in group]  # ZeRO-0's unfused fp16/bf16
    grads = []
    held = getattr(opt, "averaged_gradients", None)
    if isinstance(held, dict):
        grads += [g for group in held.values() for g in (group or [])]
    grads += [m.grad for m in master if m.grad is not None]
    return {"master": master, "grads": grads, "moments": moments}


def loss_scale(engine) -> float | None:
    """The current fp16 loss scale, whatever optimizer wrapper DeepSpeed returned (ZeRO-0's FP16_Optimizer
    keeps it in ``loss_scale_config``, the ZeRO-1/2/3 optimizers as ``cur_scale``); None without one."""
    optimizer = engine.optimizer
    holder = getattr(optimizer, "loss_scale_config", optimizer)
    scale = getattr(holder, "cur_scale", None)
    return None if scale is None else float(scale)


def is_loss_scale_exhausted(err: Exception) -> bool:
    """Whether ``engine.step()`` raised DeepSpeed's bare exception for an fp16 loss scale at its minimum."""
    return "loss scale already at minimum" in str(err)


# --------------------------------------------------------------------------- checkpoint files
def checkpoint_classes() -> list:
    """The classes DeepSpeed's checkpoint files hold beyond tensors and plain data (what
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` finds in ZeRO-0/2/3 files in fp32, bf16 and fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def mapped_tensor_loads(engine) -> Iterator[None]:
    """Inside the block, the engine's checkpoint engine reads each file mapped (``mmap=True``) with the
    tensors-only unpickler, allowing just ``checkpoint_classes()``: training/engine.py's ``load`` says why."""
    reader = engine.checkpoint_engine
    reader.load = lambda path, map_location=None: torch.load(path, map_location=map_location, weights_only=True,
                                                             mmap=True)
    try:
        with torch.serialization.safe_globals(checkpoint_classes()):
            yield
    finally:
        del reader.load  # the engine's own method again


@contextlib.contextmanager
def files_written(engine) -> Iterator[list[Path]]:
    """The paths this rank's DeepSpeed engine writes through its checkpoint engine inside the block."""
    written: list[Path] = []
    writer = engine.checkpoint_engine
    save_file = writer.save

    def recording_save(state_dict, path):
        save_file(state_dict, path)
        written.append(Path(path))

    writer.save = recording_save
    try:
        yield written
    finally:
        del writer.save  # the engine's own method again


def zero_checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 weights of a ZeRO-2/3 checkpoint folder, merged from every rank's partition files
    (DeepSpeed's ``zero_to_fp32``, offline: no engine, no process group)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


# --------------------------------------------------------------------------- the process group
def skip_shared_memory_allreduce() -> None:
    """Call before ``deepspeed.init_distributed``. On CPU, DeepSpeed starts its process group by building its
    shared-memory all-reduce, a C++ extension compiled at the first start in every new environment (60 s on
    2 cores, 70 s and more beside another job: a run stopped at start-up took that long to end), and maps a
    69 MB /dev/shm buffer per rank that it never removes. Only ``inference_all_reduce`` (DeepSpeed's tensor-
    parallel inference) uses it; training reduces through torch.distributed. Marked incompatible, the op is
    neither built nor mapped, as on any platform without it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def default_store():
    """The process group's c10d store (torch's), None without one: where ranks post a one-line error."""
    import torch.distributed as dist

    try:
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except Exception:  # a process group without a store (none in the launchers we support)
        return None


# --------------------------------------------------------------------------- torch's DataLoader
def shutdown_workers(iterator) -> None:
    """Stop a DataLoader iterator's workers now rather than when it is garbage-collected: they ignore
    SIGTERM (data/pipeline.py), so a forgotten one would keep the process from exiting. PyTorch's own
    ``_shutdown_workers``, what its ``__del__`` calls."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


# --------------------------------------------------------------------------- CPython's exit
def exit_without_teardown(code: int) -> None:
    """End the process as ``sys.exit`` would, less the interpreter's teardown of every module: the exit
    handlers run (libraries flush and close, the loader workers are reaped, lifecycle.reap_children_at_exit)
    and the standard streams are flushed, then ``os._exit``. With torch._dynamo and DeepSpeed imported (every
    rank imports them: torch's optimizers and DeepSpeed's optimizer check do) that teardown takes 1-2 s of
    each process's end and frees nothing the operating system does not (BENCHMARKS.md, "A run's end").
    ``atexit._run_exitfuncs`` is CPython's own (3.10-3.13, checked on 3.11)."""
    import atexit
    import os
    import sys

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe has nothing more to take
            pass
    os._exit(code)
