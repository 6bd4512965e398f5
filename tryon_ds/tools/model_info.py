"""Print a UNet's parameter count with a per-module breakdown, built on the meta device (no memory used).

    python tools/model_info.py --preset base            # UNet 1, 128x128
    python tools/model_info.py --preset sr               # UNet 2, 256x256 (super-resolution)
    python tools/model_info.py --config configs/tiny.yaml --unet 1
"""
from __future__ import annotations

import argparse

import torch

from ..cli import exit_on_user_error
from ..config import add_config_args, config_from_args, preset
from ..model import ParallelUNet
from ..model import parameter_count as count


def breakdown(unet: ParallelUNet) -> list[tuple[str, int]]:
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
    parser.add_argument("--preset", help="a model preset (tiny, base, sr); default: the config's UNet")
    parser.add_argument("--unet", type=int, choices=(1, 2), default=None,
                        help="1 = base, 2 = super-resolution (adds the low-res input); default: 2 for --preset sr, "
                             "else the config's train_unet_number")
    add_config_args(parser)
    args = parser.parse_args(argv)
    if args.preset:
        number = args.unet or (2 if args.preset.endswith("sr") else 1)
        cfg = preset(args.preset)
    else:
        config = config_from_args(args)
        number = args.unet or config.train_unet_number
        cfg = config.unet(number)
    with torch.device("meta"):
        unet = ParallelUNet(cfg, lowres_cond=number == 2)
    total = count(unet)
    print(f"preset {cfg.preset!r}, unet{number} ({'super-resolution' if number == 2 else 'base'}): {total:,} parameters "
          f"({total / 1e6:.1f}M)")
    for name, n in breakdown(unet):
        print(f"  {name:<18} {n:>14,}  {100 * n / total:5.1f}%")


if __name__ == "__main__":
    main()
