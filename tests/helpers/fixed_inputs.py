import torch

from tryon_ds.cascade import random_batch


def fixed_inputs(config, unet):
    """The same UNet inputs in every process: (x_t, t, cond, noise levels of the conditioning images)."""
    batch = random_batch(config, unet, 2, torch.Generator().manual_seed(123))
    x = batch.pop("person")
    batch.pop("crop", None)
    cond, levels = dict(batch), {}
    if "ca" in cond:
        levels.update(ca=torch.tensor([0.0, 0.3]), garment=torch.tensor([0.1, 0.6]))
    if unet > 1:
        cond["lowres"] = torch.nn.functional.interpolate(batch["lowres"], size=x.shape[-2:])
        levels["lowres"] = torch.tensor([0.0, 0.1])
    return x, torch.tensor([10, 700]), cond, levels
