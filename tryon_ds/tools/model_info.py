"""Print a UNet's parameter count with a per-module breakdown and the FLOPs of one training sample (forward and
backward of its loss, tryon_ds/perf.py), built on the meta device (no memory used, nothing computed).

    python tools/model_info.py --preset base            # UNet 1, 128x128 (a Parallel-UNet)
    python tools/model_info.py --preset sr               # UNet 2, 256x256 (super-resolution)
    python tools/model_info.py --preset sr1024           # UNet 3, 256 -> 1024 (Imagen's Efficient-UNet)
    python tools/model_info.py --config configs/tiny.yaml --unet 3
    python tools/model_info.py --presets                 # every shipped preset at its place and size
"""
from __future__ import annotations

import argparse

import torch

from ..cli import exit_on_user_error
from ..config import Config, add_config_args, config_from_args
from ..errors import ConfigError, UserError
from ..model import SpecError, build_unet, super_resolves
from ..model import parameter_count as count
from ..model.presets import POSITION
from ..perf import step_flops
from ..planner import preset_config


def breakdown(unet: torch.nn.Module) -> list[tuple[str, int]]:
    rows = []
    for name, child in unet.named_children():
        if isinstance(child, torch.nn.ModuleList):
            rows += [(f"{name}.{i}", count(level)) for i, level in enumerate(child)]
        else:
            rows.append((name, count(child)))
    return rows


def where(config: Config, number: int) -> str:
    size = "x".join(map(str, config.image_size(number)))
    crop = config.crop_size(number)
    return size + (f" on {'x'.join(map(str, crop))} crops" if crop else "")


def presets_table() -> None:
    print(f"{'preset':<12}{'UNet':>5}  {'trains at':<22}{'parameters':>14}{'GFLOP/sample':>14}")
    for name, number in POSITION.items():
        config, _ = preset_config(Config(), name, number)
        with torch.device("meta"):
            params = count(build_unet(config.unet(number), super_resolves(number)))
        print(f"{name:<12}{number:>5}  {where(config, number):<22}{params / 1e6:>13.1f}M"
              f"{step_flops(config, number) / 1e9:>14,.1f}")


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="a model preset (tiny, base, sr, sr1024, ...); default: the config's UNet")
    parser.add_argument("--unet", type=int, default=None,
                        help="the UNet's place in the cascade (1 = base; 2 and later super-resolve the one before); "
                             "default: the preset's own place, else the config's train_unet_number")
    parser.add_argument("--presets", action="store_true", help="a table of every shipped preset at its place and size")
    add_config_args(parser)
    args = parser.parse_args(argv)
    if args.presets:
        return presets_table()
    if args.unet is not None and args.unet < 1:
        raise UserError(f"--unet {args.unet}: UNets are numbered from 1")
    if args.preset:
        number = args.unet or POSITION[args.preset]
        try:
            config, _ = preset_config(Config(), args.preset, number, overrides=args.set)
        except ConfigError as err:
            raise UserError(f"--preset {args.preset} --unet {number}: {err}") from None
    else:
        config = config_from_args(args)
        number = args.unet or config.train_unet_number
    cfg = config.unet(number)
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
    print(f"training FLOPs per sample at {where(config, number)}: {step_flops(config, number) / 1e9:,.1f} GFLOP "
          "(forward and backward of the loss)")


if __name__ == "__main__":
    main()
