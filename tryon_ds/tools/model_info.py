"""Print a UNet's parameter count with a per-module breakdown, built on the meta device (no memory used).

    python tools/model_info.py --preset base            # UNet 1, 128x128 (a Parallel-UNet)
    python tools/model_info.py --preset sr               # UNet 2, 256x256 (super-resolution)
    python tools/model_info.py --preset sr1024           # UNet 3, 256 -> 1024 (Imagen's Efficient-UNet)
    python tools/model_info.py --config configs/tiny.yaml --unet 3
"""
from __future__ import annotations

import argparse

import torch

from ..cli import exit_on_user_error
from ..config import add_config_args, config_from_args, preset
from ..errors import UserError
from ..model import SpecError, build_unet, super_resolves
from ..model import parameter_count as count
from ..model.presets import POSITION


def breakdown(unet: torch.nn.Module) -> list[tuple[str, int]]:
    rows = []
    for name, child in unet.named_children():
        if isinstance(child, torch.nn.ModuleList):
            rows += [(f"{name}.{i}", count(level)) for i, level in enumerate(child)]
        else:
            rows.append((name, count(child)))
    return rows


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="a model preset (tiny, base, sr, sr1024, ...); default: the config's UNet")
    parser.add_argument("--unet", type=int, default=None,
                        help="the UNet's place in the cascade (1 = base; 2 and later super-resolve the one before); "
                             "default: the preset's own place, else the config's train_unet_number")
    add_config_args(parser)
    args = parser.parse_args(argv)
    if args.preset:
        cfg = preset(args.preset)
        number = args.unet or POSITION[args.preset]
    else:
        config = config_from_args(args)
        number = args.unet or config.train_unet_number
        cfg = config.unet(number)
    if number < 1:
        raise UserError(f"--unet {number}: UNets are numbered from 1")
    try:
        cfg.conditioning(super_resolves(number))
    except SpecError:
        raise UserError(f"--unet 1: {cfg.preset!r} super-resolves a low-resolution image; it can be UNet 2 or later"
                        ) from None
    with torch.device("meta"):
        unet = build_unet(cfg, super_resolves(number))
    total = count(unet)
    kind = {"parallel": "Parallel-UNet", "efficient": "Efficient-UNet"}[cfg.ARCH]
    role = "super-resolution" if super_resolves(number) else "base"
    print(f"preset {cfg.preset!r}, unet{number} ({kind}, {role}): {total:,} parameters ({total / 1e6:.1f}M)")
    for name, n in breakdown(unet):
        print(f"  {name:<18} {n:>14,}  {100 * n / total:5.1f}%")


if __name__ == "__main__":
    main()
