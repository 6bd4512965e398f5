import torch

from tryon_ds.tools.bench_model import random_batch


def fixed_inputs(config, unet):
    """The same UNet inputs in every process: (x_t, t, cond, lowres noise level)."""
    batch = random_batch(config, unet, 2, torch.Generator().manual_seed(123))
    cond = {k: v for k, v in batch.items() if k not in ("person", "lowres")}
    level = None
    if unet == 2:
        cond["lowres"] = torch.nn.functional.interpolate(batch["lowres"], size=batch["person"].shape[-2:])
        level = torch.tensor([0, 100])
    return batch["person"], torch.tensor([10, 700]), cond, level
