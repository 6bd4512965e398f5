"""When the training loop's periodic actions are due, and when it brings the device's losses to the host.

Each action fires at every multiple of its own frequency and at the last step, whatever the other
frequencies are; a frequency of 0 (validation, quality passes and previews may have one) never fires.
Between those steps the loop keeps losses and finiteness on the device; it syncs at every step where an
action is due, and at least every ``max_bad_steps`` steps, so a run of non-finite steps is seen by the time
it is long enough to stop for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError

ACTIONS = ("log", "validate", "quality", "preview", "checkpoint")


@dataclass(frozen=True)
class Schedule:
    last_step: int
    every: dict[str, int]  # action -> frequency in steps, for each of ACTIONS
    max_bad_steps: int

    @classmethod
    def of(cls, config, last_step: int) -> "Schedule":
        return cls(last_step, {"log": config.log_freq, "validate": config.validation_freq,
                               "quality": config.quality_freq, "preview": config.sample_freq,
                               "checkpoint": config.checkpoint_freq},
                   config.max_bad_steps)

    def due(self, step: int) -> frozenset[str]:
        """The actions to run once ``step`` steps are done."""
        return frozenset(a for a in ACTIONS
                         if self.every[a] and (step % self.every[a] == 0 or step == self.last_step))

    def sync(self, step: int) -> bool:
        """Whether the loop brings the steps since its last sync to the host after ``step``."""
        return step % self.max_bad_steps == 0 or bool(self.due(step))


def total_steps(config, global_batch: int) -> int:
    """The run's optimizer steps: ``max_steps``, else ``num_epochs`` over the training split the shard
    manifest counts, at ``global_batch`` samples a step."""
    from ..data.shards import read_manifest

    if config.max_steps is not None:
        return config.max_steps
    if config.data.train_shards:
        raise UserError("with data.train_shards given, there is no manifest to count an epoch: set max_steps")
    samples = read_manifest(config.data_dir)["samples"]["train"]
    return config.num_epochs * math.ceil(samples / global_batch)
