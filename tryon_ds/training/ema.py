"""An exponential moving average of the weights that is correct under every ZeRO stage.

Each rank averages its *local view* of every parameter, in fp32:
- ZeRO-3 partitions parameters, so a rank holds only its partition: the EMA averages the optimizer's fp32
  master partition and is itself partitioned (1/world of the memory);
- ZeRO-0/1/2 keep whole parameters on every rank: the EMA averages them.
``full_state_dict()`` gathers the whole EMA (a collective: every rank calls it) for checkpoints, samples
and export; ``load_full_state_dict()`` takes a whole EMA and keeps this rank's part, so an EMA saved at one
world size loads at any other.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _is_partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def _local_view(p: nn.Parameter) -> torch.Tensor:
    if _is_partitioned(p):
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(p)
        return (local if local is not None else p.ds_tensor).detach().reshape(-1)
    return p.detach()


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.names, self.params = zip(*[(n, p) for n, p in module.named_parameters()])
        self.shadow = [_local_view(p).float().clone() for p in self.params]

    def current_decay(self, step: int) -> float:
        """Warm-up: early weights are noise, so average over at most (1 + step) / (10 + step) of the past."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = self.current_decay(step)
        local = [_local_view(p).float() for p in self.params]
        torch._foreach_lerp_(self.shadow, local, 1.0 - decay)

    # ------------------------------------------------------------------ whole-model views
    def _world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole EMA as {name: fp32 tensor of the parameter's shape}, on every rank (CPU tensors)."""
        _, world = self._world()
        out = {}
        partitioned = [i for i, p in enumerate(self.params) if _is_partitioned(p)]
        if partitioned:
            flat = torch.cat([self.shadow[i] for i in partitioned])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            offset = 0
            for i in partitioned:
                n = self.shadow[i].numel()
                p = self.params[i]
                whole = torch.cat([g[offset:offset + n] for g in gathered])[: p.ds_numel]
                out[self.names[i]] = whole.reshape(p.ds_shape).cpu()
                offset += n
        for i, p in enumerate(self.params):
            if not _is_partitioned(p):
                out[self.names[i]] = self.shadow[i].cpu().clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
        rank, _ = self._world()
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            whole = state[name].float().reshape(-1)
            if _is_partitioned(p):
                # ZeRO-3 gives rank r the r-th slice of the flattened parameter, the last one zero-padded.
                n = self.shadow[i].numel()
                local = torch.zeros(n)
                piece = whole[n * rank: n * (rank + 1)]
                local[: piece.numel()] = piece
                self.shadow[i].copy_(local)
            else:
                self.shadow[i].copy_(whole.reshape(self.shadow[i].shape).to(self.shadow[i].device))
