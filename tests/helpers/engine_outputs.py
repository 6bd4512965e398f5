"""Run under the deepspeed launcher: load a training checkpoint into a DeepSpeed engine exactly as the
trainer does, and write the UNet's outputs on fixed inputs, from its raw weights and from its EMA."""
import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tryon_ds.config import build_config  # noqa: E402
from tryon_ds.cascade import CascadeUNet  # noqa: E402
from tryon_ds.training import checkpoint, distributed, engine as ds_engine  # noqa: E402
from tryon_ds.training.ds_config import build_ds_config  # noqa: E402
from fixed_inputs import fixed_inputs  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--ckpt", required=True)
p.add_argument("--ds", required=True)
p.add_argument("--out", required=True)
p.add_argument("--local_rank", type=int)
args = p.parse_args()

world = distributed.setup()
ckpt = Path(args.ckpt)
state = checkpoint.read_state(ckpt)
config = build_config(state["config"])
unet = state["unet_number"]
_, engine, _, ema = ds_engine.build(config, build_ds_config(args.ds, config, world.size), ckpt)
engine.eval()
x, t, cond, levels = fixed_inputs(config, unet)
with torch.no_grad():
    raw = engine.module.unet(x, t, cond, levels)
    ema_weights = ema.full_state_dict()  # collective; the whole EMA on rank 0
if world.is_main:
    plain = CascadeUNet(config, unet).eval()
    plain.load_state_dict(ema_weights)
    with torch.no_grad():
        from_ema = plain.unet(x, t, cond, levels)
    save_file({"raw": raw.contiguous(), "ema": from_ema.contiguous()}, args.out)
distributed.teardown()
