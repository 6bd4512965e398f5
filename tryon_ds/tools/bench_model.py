"""Forward+backward time of a preset's training loss on this machine (median of repeated steps).

    python tools/bench_model.py --config configs/tiny.yaml --repeats 5
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from ..cascade import CascadeUNet
from ..cli import exit_on_user_error
from ..config import add_config_args, config_from_args
from ..model import parameter_count


def random_batch(config, unet_number: int, batch_size: int, generator: torch.Generator | None = None) -> dict:
    """A training batch of UNet ``unet_number``'s layout filled with noise: the target (a crop of it for a
    UNet trained on crops), the inputs the UNet reads, images in [-1, 1], poses in [0, 1]."""
    k = config.num_keypoints
    crop = config.crop_size(unet_number)

    def image(size):
        return torch.rand(batch_size, config.channels, *size, generator=generator) * 2 - 1

    size = crop or config.image_size(unet_number)
    batch = {"person": image(size)}
    for name in config.unet(unet_number).INPUTS:
        if name.endswith("_pose"):
            batch[name] = torch.rand(batch_size, k, 2, generator=generator)
            batch[f"{name}_valid"] = torch.rand(batch_size, k, generator=generator) > 0.1
        else:
            batch[name] = image(size)
    if unet_number > 1:
        batch["lowres"] = image(tuple(config.image_size(unet_number - 1)))
    if crop:
        h, w = config.image_size(unet_number)
        batch["crop"] = torch.stack([torch.randint(0, h - crop[0] + 1, (batch_size,), generator=generator),
                                     torch.randint(0, w - crop[1] + 1, (batch_size,), generator=generator)], dim=1)
    return batch


def step_seconds(config, unet_number: int, repeats: int) -> float:
    model = CascadeUNet(config, unet_number)
    batch = random_batch(config, unet_number, config.batch_size)
    times = []
    for i in range(repeats + 2):  # two warm-up steps
        start = time.perf_counter()
        model(batch).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    add_config_args(parser)
    parser.set_defaults(config="configs/tiny.yaml")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {config.batch_size}")
    print(" unet  size      params   checkpointing  fwd+bwd s/step  samples/s")
    for number in config.unets:
        for ckpt in (False, True):
            unet = dataclasses.replace(config.unet(number), checkpointing=ckpt)
            cfg = dataclasses.replace(config, **{f"unet{number}": unet})
            params = parameter_count(CascadeUNet(cfg, number))
            s = step_seconds(cfg, number, args.repeats)
            size = "x".join(map(str, config.crop_size(number) or config.image_size(number)))
            print(f"{number:>5}  {size:<8} {params / 1e6:6.2f}M   {str(ckpt):<13}  {s:14.3f}  {config.batch_size / s:9.1f}")


if __name__ == "__main__":
    main()
