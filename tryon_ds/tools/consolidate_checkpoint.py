"""Consolidate a ZeRO-2/3 training checkpoint (any world size) into a cascade bundle for inference.

    python tools/consolidate_checkpoint.py checkpoints/unet1 --out bundle/            # newest complete step
    python tools/consolidate_checkpoint.py checkpoints/unet1 --best --out bundle/     # the best (BEST.json)
    python tools/consolidate_checkpoint.py checkpoints/unet2/step00050000 --out bundle/ --dtype bf16

The checkpoint's files are checked against the sizes and SHA-256 sums its writers recorded first: a damaged
step named on the command line is an error naming the file; given the UNet's folder, a damaged newest step
is moved aside (``stepNNNNNNNN.damaged``) and the newest intact one is consolidated.

Run it for UNet 1 and then UNet 2 into the same folder to build the cascade. The weights are gathered by
DeepSpeed's own ``zero_to_fp32`` functions; the EMA (when the run kept one) is taken as saved.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file

from ..bundle import strip_prefix, write_unet
from ..cli import exit_on_user_error
from ..config import build_config
from ..errors import UserError
from ..model import DTYPES
from ..training import checkpoint
from ..compat import zero_checkpoint_weights


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a UNet's checkpoint folder (checkpoints/unet1) or one step in it")
    p.add_argument("--out", required=True, help="the bundle folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="storage dtype of the weights")
    p.add_argument("--force", action="store_true", help="replace this UNet if the bundle already has it")
    p.add_argument("--best", action="store_true",
                   help="the best checkpoint by the run's best_metric (recorded in the UNet folder's BEST.json)")
    args = p.parse_args(argv)

    path = Path(args.checkpoint)
    if not path.is_dir():
        raise UserError(f"checkpoint folder {path} does not exist")
    named = (path / "COMPLETE").is_file()
    best = None
    if args.best:
        if named:
            raise UserError(f"--best takes a UNet's checkpoint folder ({path.parent}), not one step in it")
        best = checkpoint.read_best(path)
        if best is None:
            raise UserError(f"{path} has no {checkpoint.BEST}: its run recorded no best checkpoint (it needs a "
                            "quality pass, quality_freq, or validation, validation_freq); drop --best for the newest")
        path, named = path / best["checkpoint"], True
        if not (path / "COMPLETE").is_file():
            raise UserError(f"{checkpoint.BEST} names {path}, which is not a complete checkpoint")
    found = [path] if named else checkpoint.candidates(path, "auto")
    if not found:
        raise UserError(f"{path} holds no complete checkpoint (a stepNNNNNNNN folder with a COMPLETE marker)")
    ckpt, notes = checkpoint.choose_intact(found, None, named)
    for note in notes:
        print(note)
    state = checkpoint.read_state(ckpt)
    if state["zero_stage"] not in (2, 3):
        raise UserError(f"{ckpt} is a ZeRO-{state['zero_stage']} checkpoint; this tool reads ZeRO-2 and ZeRO-3 ones")
    config = build_config(state["config"])
    number = state["unet_number"]

    chosen = f", the best by {best['metric']} = {best['value']:.4g}" if best else ""
    print(f"consolidating {ckpt} (unet{number}, step {state['step']}, ZeRO-{state['zero_stage']}, "
          f"{state['world_size']} rank(s){chosen})")
    weights = strip_prefix(zero_checkpoint_weights(ckpt))
    ema = strip_prefix(load_file(str(ckpt / "ema.safetensors"))) if (ckpt / "ema.safetensors").is_file() else None
    selected = ({"by": "best", **{k: best[k] for k in ("metric", "mode", "value", "step")}} if best
                else {"by": "named" if Path(args.checkpoint) == ckpt else "newest", "step": state["step"]})
    out = write_unet(Path(args.out), number, config, state["step"], weights, ema, args.dtype, args.force, str(ckpt),
                     selected)
    n = sum(v.numel() for v in weights.values())
    print(f"wrote {out}: {n:,} parameters ({n / 1e6:.2f}M), {args.dtype}, "
          f"{'raw + EMA' if ema is not None else 'raw'} weights")


if __name__ == "__main__":
    main()
