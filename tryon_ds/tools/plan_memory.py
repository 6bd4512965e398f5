"""Memory per GPU of a training run, before renting the GPUs (tryon_ds/planner.py says what it counts): model
states, EMA, activations, the optimizer step's temporaries and DeepSpeed's buffers, whether it fits, and what
to change if not.

    python tools/plan_memory.py --preset base --micro-batch 16 --zero 2 --precision bf16 --gpus 16
    python tools/plan_memory.py --preset sr --micro-batch 8 --zero 3 --precision bf16 --gpus 8 --checkpointing
    python tools/plan_memory.py --preset sr1024 --micro-batch 16 --zero 2 --gpus 8       # UNet 3 on 256 px crops

The buffers are read from the DeepSpeed config the run would use (``ds_configs/zero{2,3}_{precision}.json``,
or ``--deepspeed_config``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from ..cli import exit_on_user_error
from ..config import add_config_args, config_from_args, find_config_file
from ..errors import UserError
from ..model.presets import POSITION
from ..planner import BYTES, GIB, RunPlan, default_ds, preset_config, table


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="a model preset (tiny, base, sr, ...); default: the config's UNet")
    p.add_argument("--unet", type=int, help="the UNet's place in the cascade (default: the preset's own, else the "
                                            "config's train_unet_number)")
    p.add_argument("--image-size", type=int, nargs="+", metavar="N",
                   help="H [W] of that UNet's images (default: 128 for UNet 1, 256 for UNet 2, 1024 for UNet 3 with a "
                        "preset, else the config's)")
    p.add_argument("--crop-size", type=int, nargs="+", metavar="N",
                   help="H [W] of the crops a UNet trained on crops sees (default: its config's, 256 for sr1024)")
    p.add_argument("--micro-batch", type=int, default=16, help="per GPU")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=2)
    p.add_argument("--precision", choices=sorted(BYTES), default="bf16")
    p.add_argument("--gpus", type=int, default=8, help="data-parallel ranks")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU (default 80)")
    p.add_argument("--cpu", action="store_true",
                   help="the ranks are CPU processes (a CPU smoke test): host and device memory are one, so an "
                        "offload moves nothing off the rank; --gpu-memory is then the memory each rank may use")
    p.add_argument("--deepspeed_config", help="read buffer sizes from this DeepSpeed config")
    add_config_args(p)
    args = p.parse_args(argv)
    if args.micro_batch < 1 or args.gpus < 1:
        raise UserError("--micro-batch and --gpus take positive integers")
    # a preset's overrides (--set unets.0.attn_patch=2) go over the preset, after it is placed
    config = config_from_args(argparse.Namespace(**{**vars(args), "set": []}) if args.preset else args)
    number = args.unet or (POSITION.get(args.preset) if args.preset else config.train_unet_number)
    if args.preset:
        config, number = preset_config(config, args.preset, number, args.image_size, args.set)
    elif args.image_size:
        config = config.with_unet(number, config.unet(number), (args.image_size[0], args.image_size[-1]))
    if args.crop_size:
        if "crop_size" not in {f.name for f in dataclasses.fields(config.unet(number))}:
            raise UserError(f"--crop-size: unet{number} ({config.unet(number).preset}) does not train on crops")
        config = config.with_unet(number, dataclasses.replace(config.unet(number), crop_size=(args.crop_size[0],
                                                                                               args.crop_size[-1])))
    ds = json.loads(find_config_file(args.deepspeed_config or default_ds(args.zero, args.precision),
                                     "DeepSpeed config").read_text())
    ds.setdefault("zero_optimization", {})["stage"] = args.zero
    budget = args.gpu_memory * 1e9
    run = RunPlan(config, number, args.micro_batch, args.zero, args.precision, args.gpus, args.checkpointing, ds,
                  args.cpu)
    unit = "per rank" if args.cpu else "per GPU"
    rows, total = run.rows(), run.peak()
    size = "x".join(map(str, config.image_size(number)))
    crop = config.crop_size(number)
    size += f" on {'x'.join(map(str, crop))} crops" if crop else ""
    print(f"unet{number} ({config.unet(number).preset}), {size}, micro-batch {args.micro_batch} {unit}, "
          f"ZeRO-{args.zero}, {args.precision}, {args.gpus} {'CPU rank' if args.cpu else 'GPU'}(s), checkpointing "
          f"{'on' if args.checkpointing else 'off'}")
    print(table(rows, args.cpu))
    if host_rows := run.host_rows():
        print("host memory per rank (the offloaded optimizer):")
        print("\n".join(f"  {k:<34}{v / GIB:9.2f} GiB" for k, v in host_rows.items()))
    verdict = "fits" if total <= budget else "does NOT fit"
    print(f"{verdict} in {args.gpu_memory:g} GB {unit} ({100 * total / budget:.0f}% of it; "
          + ("the libraries and the interpreter" if args.cpu else "the CUDA context and fragmentation")
          + " are not counted)")
    if total <= budget:
        return
    print("what would fit instead:")
    for what, option in run.alternatives(budget):
        t = option.peak()
        print(f"  {what}: {t / GIB:.1f} GiB ({'fits' if t <= budget else 'still too large'})")


if __name__ == "__main__":
    main()
