"""The non-finite policy: a step whose loss or gradients are not finite on some rank changes nothing (DeepSpeed
skips it on every rank, the EMA with it), is reported, and ``max_bad_steps`` of them in a row stop the run.

The loop does not wait for the device between steps on its own account: each step's loss and finiteness stay
there (a window of at most ``max_bad_steps`` steps) and reach the host at the loop's sync points, where the
guard reduces them over the ranks, reports the bad ones and hands back the good losses. DeepSpeed's own
verdict (a step it skipped) is on the host at once; a run of those forces a sync early.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import UserError


class NonFiniteRun(UserError):
    """``max_bad_steps`` optimizer steps in a row had a non-finite loss or gradients."""


class NonFiniteGuard:
    def __init__(self, max_bad_steps: int, device: torch.device, step: int):
        self.limit = max_bad_steps
        self.loss = torch.zeros(max_bad_steps, device=device)  # each step's loss, summed over micro-batches
        self.finite = torch.ones(max_bad_steps, device=device)
        self.applied: list[bool] = []  # DeepSpeed's verdicts since the last sync
        self.first = step  # the step number before the window's first slot
        self.bad_in_a_row = 0  # exact at each sync
        self.skipped_in_a_row = 0  # DeepSpeed's skips, known at once

    def record(self, loss_sum: torch.Tensor, applied: bool) -> None:
        i = len(self.applied)
        ok = torch.isfinite(loss_sum)
        self.loss[i] = torch.where(ok, loss_sum, torch.zeros_like(loss_sum))
        self.finite[i] = ok.float()
        self.applied.append(applied)
        self.skipped_in_a_row = 0 if applied else self.skipped_in_a_row + 1

    @property
    def must_sync(self) -> bool:
        """Whether the window is full of steps DeepSpeed skipped: the limit may be reached already."""
        return self.skipped_in_a_row >= self.limit

    def settle(self, world_size: int, log) -> list[float]:
        """The mean loss over the ranks of each good step since the last sync; each bad one logged. Raises
        NonFiniteRun at ``max_bad_steps`` in a row. A collective: every rank calls it at the same step."""
        n = len(self.applied)
        both = torch.cat([self.loss[:n], self.finite[:n]])
        dist.all_reduce(both)
        losses, finite = both[:n].tolist(), both[n:].tolist()
        good = []
        for i in range(n):
            step = self.first + i + 1
            if finite[i] == world_size and self.applied[i]:
                self.bad_in_a_row = 0
                good.append(losses[i] / world_size)
                continue
            self.bad_in_a_row += 1
            log.message(f"step {step}: skipped ({'loss' if finite[i] != world_size else 'gradients'} not finite); "
                        f"weights and EMA unchanged ({self.bad_in_a_row} such step(s) in a row)")
            if self.bad_in_a_row >= self.limit:
                raise NonFiniteRun(f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradients (steps "
                                   f"{step - self.bad_in_a_row + 1}-{step})")
        self.first += n
        self.applied = []
        self.finite.fill_(1.0)
        self.skipped_in_a_row = self.bad_in_a_row
        return good
