import torch

from tryon_ds.cascade import random_batch


def fixed_inputs(config, unet):
    """The same UNet inputs in every process: (x_t, t, cond, noise levels of the conditioning images)."""
    batch = random_batch(config, unet, 2, torch.Generator().manual_seed(123))
    x = batch.pop("person")
    batch.pop("crop", None)
    cond, levels = dict(batch), {}
    chosen = {"ca": [0.0, 0.3], "garment": [0.1, 0.6], "lowres": [0.0, 0.1]}
    for name in config.conditioning(unet).noisy:
        levels[name] = torch.tensor(chosen[name])
    if "lowres" in cond:  # the UNet itself reads it upsampled to its size
        cond["lowres"] = torch.nn.functional.interpolate(batch["lowres"], size=x.shape[-2:])
    return x, torch.tensor([10, 700]), cond, levels
