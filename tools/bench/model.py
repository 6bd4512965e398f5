"""Forward+backward time of a preset's training loss on this machine (median of repeated steps).

    python tools/bench/model.py --config configs/tiny.yaml --repeats 5
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # a script run from a fresh clone: the repository's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import dataclasses
import statistics
import time

import torch

from tryon_ds.cascade import CascadeUNet, random_batch
from tryon_ds.cli import exit_on_user_error
from tryon_ds.config import add_config_args, config_from_args
from tryon_ds.model import parameter_count


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
    for number in config.unet_numbers:
        for ckpt in (False, True):
            unet = dataclasses.replace(config.unet(number), checkpointing=ckpt)
            cfg = dataclasses.replace(config, **{f"unet{number}": unet})
            params = parameter_count(CascadeUNet(cfg, number))
            s = step_seconds(cfg, number, args.repeats)
            size = "x".join(map(str, config.crop_size(number) or config.image_size(number)))
            print(f"{number:>5}  {size:<8} {params / 1e6:6.2f}M   {str(ckpt):<13}  {s:14.3f}  {config.batch_size / s:9.1f}")


if __name__ == "__main__":
    main()
