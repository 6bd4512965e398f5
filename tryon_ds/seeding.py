"""Every random draw of a run is seeded by its seed and *where* the draw happens (the split, the global
micro-batch slot, the data stream and segment, a sample's position), never by a generator's running state.
So a resumed run, or one at another world size, draws the same numbers without saving any RNG state."""
from __future__ import annotations

import random


def rng_for(*parts) -> random.Random:
    """A Python generator for this place in the run: the same parts always give the same stream."""
    return random.Random("/".join(map(str, parts)))


def seed_for(*parts) -> int:
    """A 63-bit seed (for torch.manual_seed, WebDataset's shard draw and shuffle) for this place in the run."""
    return rng_for(*parts).getrandbits(63)
