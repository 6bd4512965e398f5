"""An exponential moving average of the optimizer's fp32 master weights, partitioned like them.

Mixed-precision training keeps the weights the optimizer updates (the master copy) in fp32 and the module's
weights in bf16/fp16; an EMA of the module's half-precision weights would lose every step smaller than
bf16's resolution, so the EMA reads the master copy, which DeepSpeed holds differently per ZeRO stage:
- ZeRO-3: each rank's partition of every parameter (``compat.local_fp32_partition``);
- ZeRO-1/2: each rank's slice of the flat fp32 partition, a *fragment* of some parameters
  (``compat.fragment``, the mapping DeepSpeed's own universal checkpoints use);
- ZeRO-0 in bf16/fp16: the optimizer's whole fp32 copy of each parameter; in fp32: the parameter itself.
Each rank averages only what it holds, in place and without copies. ``full_state_dict()`` assembles the
whole EMA on rank 0 (a collective, a bucket at a time); ``load_full_state_dict()`` takes a whole EMA and
keeps this rank's part, so an EMA saved at one world size loads at any other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from .. import compat
from .gather import in_buckets, streamed


@dataclass
class _Entry:
    name: str
    param: torch.nn.Parameter
    master: torch.Tensor | None  # this rank's fp32 master view (None: no part of it here)
    kind: str                    # "partition" (ZeRO-3), "fragment" (ZeRO-1/2) or "whole"
    offset: int = 0              # where a fragment starts in the flattened parameter


def master_entries(engine) -> list[_Entry]:
    zero0 = compat.zero0_masters(engine.optimizer)
    entries = []
    for name, p in engine.module.named_parameters():
        if compat.is_partitioned(p):
            entries.append(_Entry(name, p, compat.local_fp32_partition(p), "partition"))
        elif (held := compat.fragment(p)) is not None:
            entries.append(_Entry(name, p, held[0], "fragment", held[1]))
        else:
            master = zero0.get(id(p), p)
            if master.dtype != torch.float32:
                raise RuntimeError(f"no fp32 master copy of {name} found in {type(engine.optimizer).__name__}")
            entries.append(_Entry(name, p, master, "whole"))
    return entries


class EMA:
    def __init__(self, engine, decay: float):
        self.decay = decay
        self.entries = master_entries(engine)
        self.held = [e for e in self.entries if e.master is not None]
        self.shadow = [e.master.detach().clone() for e in self.held]

    def current_decay(self, step: int) -> float:
        """Warm-up: early weights are noise, so average over at most (1 + step) / (10 + step) of the past."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int, gate: torch.Tensor | bool = True) -> None:
        """Move the average toward the master weights. ``gate``, a bool or a 0-d bool tensor on the
        masters' device, must be true for the step to count: a device tensor keeps the host from waiting."""
        if not self.shadow or gate is False:
            return
        weight = 1.0 - self.current_decay(step)
        if torch.is_tensor(gate):
            weight = gate.to(self.shadow[0].device, torch.float32) * weight
        # ZeRO-3 may move its partitions between steps (sub-groups, swapping): look them up each time.
        masters = [compat.local_fp32_partition(e.param) if e.kind == "partition" else e.master for e in self.held]
        torch._foreach_lerp_(self.shadow, masters, weight)

    # ------------------------------------------------------------------ whole-model views
    @staticmethod
    def _world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    @torch.no_grad()
    def full_state_dict(self, bucket_numel: int = 1 << 26, into: Callable[[dict], None] | None = None,
                        everywhere: bool = False) -> dict[str, torch.Tensor] | None:
        """The whole EMA as {name: fp32 CPU tensor of the parameter's shape} on rank 0 (on every rank with
        ``everywhere``), None on the others. Every rank calls it. Partitioned entries travel a bucket at a
        time: each rank contributes what it holds, zeros elsewhere, and a sum-reduce to rank 0 (an all-reduce,
        everywhere) assembles the parameters; with ``into``, each receiving rank hands each bucket's part to
        it as it comes (training/gather.py)."""
        rank, _ = self._world()
        return streamed(rank == 0 or everywhere, self._parts(bucket_numel, everywhere), into)

    def _parts(self, bucket_numel: int, everywhere: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        rank, world = self._world()
        shadows = {id(e): s for e, s in zip(self.held, self.shadow)}
        device = self.shadow[0].device if self.shadow else torch.device("cpu")
        if dist.is_initialized() and dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        # A whole entry is every rank's own and travels nowhere, but counts towards what a rank holds at once.
        receives = rank == 0 or everywhere
        for bucket in in_buckets(self.entries, self._numel, bucket_numel):
            yield {e.name: shadows[id(e)].reshape(e.param.shape).cpu().clone()
                   for e in bucket if e.kind == "whole"} if receives else {}
            if pending := [e for e in bucket if e.kind != "whole"]:
                part: dict[str, torch.Tensor] = {}
                self._reduce_bucket(pending, shadows, rank, world, device, part, everywhere)
                yield part

    @staticmethod
    def _numel(e: _Entry) -> int:
        return compat.full_numel(e.param)

    @staticmethod
    def _shape(e: _Entry) -> torch.Size:
        return compat.full_shape(e.param)

    def _place(self, e: _Entry, rank: int) -> tuple[int, int]:
        """(start, length) of this rank's part in the flattened parameter."""
        if e.kind == "partition":
            n = e.master.numel() if e.master is not None else 0
            return n * rank, max(0, min(n, compat.full_numel(e.param) - n * rank))
        return e.offset, (e.master.numel() if e.master is not None else 0)

    def _reduce_bucket(self, entries, shadows, rank, world, device, out, everywhere: bool = False) -> None:
        sizes = [self._numel(e) for e in entries]
        flat = torch.zeros(sum(sizes), device=device)
        offset = 0
        for e, n in zip(entries, sizes):
            shadow = shadows.get(id(e))
            if shadow is not None:
                start, length = self._place(e, rank)
                flat[offset + start: offset + start + length] = shadow[:length].to(device)
            offset += n
        if world > 1:
            dist.all_reduce(flat) if everywhere else dist.reduce(flat, dst=0)
        if rank == 0 or everywhere:
            offset = 0
            for e, n in zip(entries, sizes):
                out[e.name] = flat[offset: offset + n].reshape(self._shape(e)).cpu().clone()
                offset += n

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [e.name for e in self.entries if e.name not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
        rank, _ = self._world()
        for e, shadow in zip(self.held, self.shadow):
            whole = state[e.name].float().reshape(-1)
            if e.kind == "whole":
                shadow.copy_(whole.reshape(shadow.shape).to(shadow.device))
                continue
            start, length = self._place(e, rank)
            local = torch.zeros(shadow.numel())
            local[:length] = whole[start: start + length]
            shadow.copy_(local.to(shadow.device))
