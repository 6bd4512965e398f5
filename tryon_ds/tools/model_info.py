"""Print a UNet's parameter count with a per-module breakdown, built on the meta device (no memory used).

    python tools/model_info.py --preset base            # the 128x128 base UNet
    python tools/model_info.py --preset sr --stage 2     # the 256x256 SR UNet
    python tools/model_info.py --config configs/tiny.yaml --stage 1
"""
from __future__ import annotations

import argparse

import torch

from ..config import add_config_args, config_from_args, exit_on_user_error, preset
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
    parser.add_argument("--stage", type=int, choices=(1, 2), default=None,
                        help="1 = base, 2 = super-resolution (adds the low-res input); default: 2 for --preset sr")
    add_config_args(parser)
    args = parser.parse_args(argv)
    stage = args.stage or (2 if args.preset == "sr" else 1)
    cfg = preset(args.preset) if args.preset else config_from_args(args).unet(stage)
    with torch.device("meta"):
        unet = ParallelUNet(cfg, lowres_cond=stage == 2)
    total = count(unet)
    print(f"preset {cfg.preset!r}, stage {stage} ({'SR' if stage == 2 else 'base'}): {total:,} parameters "
          f"({total / 1e6:.1f}M)")
    for name, n in breakdown(unet):
        print(f"  {name:<18} {n:>14,}  {100 * n / total:5.1f}%")


if __name__ == "__main__":
    main()
