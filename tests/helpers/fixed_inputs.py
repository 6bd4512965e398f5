import torch

from tryon_ds.tools.bench_model import random_batch


def fixed_inputs(config, unet):
    """The same UNet inputs in every process: (x_t, t, cond, noise levels of the conditioning images)."""
    batch = random_batch(config, unet, 2, torch.Generator().manual_seed(123))
    cond = {k: v for k, v in batch.items() if k not in ("person", "lowres")}
    levels = {"ca": torch.tensor([0.0, 0.3]), "garment": torch.tensor([0.1, 0.6])}
    if unet == 2:
        cond["lowres"] = torch.nn.functional.interpolate(batch["lowres"], size=batch["person"].shape[-2:])
        levels["lowres"] = torch.tensor([0.0, 0.1])
    return batch["person"], torch.tensor([10, 700]), cond, levels
