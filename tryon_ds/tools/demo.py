"""The main job on the built-in small default: the tiny preset, forward and backward of both stages on CPU.

    python tools/demo.py
"""
from __future__ import annotations

import argparse
import time

import torch

from ..config import add_config_args, config_from_args, exit_on_user_error
from ..stage import CascadeStage


def random_batch(config, stage: int, batch_size: int, generator: torch.Generator | None = None) -> dict:
    """A batch of the trainer's layout filled with noise: images in [-1, 1], poses in [0, 1]."""
    h, w = config.image_size(stage)
    k = config.unet(stage).num_keypoints

    def image(size):
        return torch.rand(batch_size, config.channels, *size, generator=generator) * 2 - 1

    batch = {"person": image((h, w)), "ca": image((h, w)), "garment": image((h, w)),
             "person_pose": torch.rand(batch_size, k, 2, generator=generator),
             "garment_pose": torch.rand(batch_size, k, 2, generator=generator),
             "person_pose_valid": torch.rand(batch_size, k, generator=generator) > 0.1,
             "garment_pose_valid": torch.rand(batch_size, k, generator=generator) > 0.1}
    if stage == 2:
        batch["lowres"] = image(tuple(config.base_image_size))
    return batch


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.set_defaults(config="configs/tiny.yaml")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    torch.manual_seed(config.seed)
    for stage in (1, 2):
        model = CascadeStage(config, stage)
        batch = random_batch(config, stage, config.batch_size)
        start = time.perf_counter()
        loss = model(batch)
        loss.backward()
        elapsed = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
        print(f"stage {stage}: {params / 1e6:.2f}M parameters, {tuple(config.image_size(stage))} px, "
              f"batch {config.batch_size}: loss {loss.item():.4f}, forward+backward {elapsed:.3f} s")


if __name__ == "__main__":
    main()
