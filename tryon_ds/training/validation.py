"""The validation loss during training: the mean over the whole validation set, each sample seen once across
the ranks, with the training forward's draws seeded by (seed, rank, batch).

Ranks may hold different numbers of batches, and ZeRO-3 gathers parameters collectively, so every rank runs
the same number of forwards: one that has run out repeats a stand-in batch of the validation set (its first,
as a single rank would read it) with weight zero. A short batch is filled up to the micro-batch with repeats
of its own rows, which weigh zero too, so a compiled UNet builds one graph for validation, not one more per
partial size (minutes each on a GPU). A stop request cuts the pass short.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..compat import shutdown_workers
from ..data.pipeline import Data
from ..data.preprocess import to_device
from ..seeding import seed_for
from . import engine as ds_engine


def filled(batch: dict, size: int) -> dict:
    """``batch`` with its rows repeated up to ``size`` rows."""
    n = len(batch["key"])
    if n >= size:
        return batch
    rows = [i % n for i in range(size)]
    return {k: v[rows] if torch.is_tensor(v) else [v[i] for i in rows] for k, v in batch.items()}


class StandIn:
    """The batch a rank that ran out of validation batches runs, read when first needed."""

    def __init__(self, data: Data, batch_size: int):
        self.data, self.batch_size, self.batch = data, batch_size, None

    def __call__(self) -> dict:
        if self.batch is None:
            batches = iter(self.data.val(self.batch_size, whole=True))
            self.batch = filled(next(batches), self.batch_size)
            shutdown_workers(batches)
        return self.batch


@torch.no_grad()
def validation_loss(engine, data: Data, batch_size: int, seed: int, world, stop) -> float | None:
    """The mean validation loss, or None when the set is empty or a stop request cut the pass short. A
    collective: every rank calls it at the same step."""
    engine.eval()
    batches, stand_in = iter(data.val(batch_size)), StandIn(data, batch_size)
    total = torch.zeros(2, device=world.device)
    index = 0
    while True:
        batch = next(batches, None)
        go = torch.tensor([0.0 if batch is None else 1.0, 1.0 if stop.requested else 0.0], device=world.device)
        dist.all_reduce(go, op=dist.ReduceOp.MAX)
        if go[0].item() == 0 or go[1].item() > 0:
            break
        n = 0 if batch is None else len(batch["key"])
        batch = to_device(stand_in() if batch is None else filled(batch, batch_size), world.device)
        torch.manual_seed(seed_for(seed, "val", world.rank, index))
        losses = engine(batch, per_sample=True).float()
        total += torch.stack([losses[:n].sum(), torch.tensor(float(n), device=world.device)])
        index += 1
    shutdown_workers(batches)
    dist.all_reduce(total)
    ds_engine.release_parameters(engine)  # what ZeRO-3 prefetched for a backward that never comes
    engine.train()
    return None if stop.requested or total[1] == 0 else (total[0] / total[1]).item()
