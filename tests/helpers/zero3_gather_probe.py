"""Run under the deepspeed launcher on 2 CPU ranks: for each ZeRO-3 setting given (a JSON list of
``zero_optimization`` overrides), a real engine of the tiny UNet does what a training step with its periodic
actions does: a training step, validation forwards (eval mode, no gradient), the gathers a preview and a
checkpoint's EMA take, and another training step. Rank 0 writes, per setting, the gathered weights' digest,
whether they equal the EMA (decay 0: the weights the optimizer holds) and the losses; a setting that fails
records its error rather than ending the probe."""
import argparse
import hashlib
import json
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tryon_ds.cascade import random_batch  # noqa: E402
from tryon_ds.config import build_config, deep_merge, read_config_file  # noqa: E402
from tryon_ds.training import distributed, engine as ds_engine  # noqa: E402
from tryon_ds.training.ds_config import build_ds_config  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--settings", required=True, help="JSON list of zero_optimization overrides")
p.add_argument("--unet", type=int, default=1)
p.add_argument("--out", required=True, help="the report (JSON); each setting's DeepSpeed file is written beside it")
p.add_argument("--local_rank", type=int)
args = p.parse_args()
world = distributed.setup()
config = build_config(deep_merge(read_config_file(ROOT / "configs" / "tiny.yaml"),
                                 {"batch_size": 2, "ema_decay": 0.0, "learning_rate": 1e-3, "warmup_steps": 0,
                                  "train_unet_number": args.unet}))
base = json.loads((ROOT / "ds_configs" / "cpu_zero3.json").read_text())


def batch(seed):
    return {k: v.to(world.device) for k, v in
            random_batch(config, args.unet, 2, torch.Generator().manual_seed(seed + world.rank)).items()}


def step(engine, ema, number: int) -> float:
    """A training step on a batch of its own, seeded by its number; its loss."""
    return ds_engine.train_step(engine, ema, [batch(number)], number, seed_of=lambda micro: number)[0].item()


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode() + state[name].numpy().tobytes())
    return h.hexdigest()


report = []
for setting in json.loads(args.settings):
    ds = Path(args.out).with_suffix(f".{len(report)}.rank{world.rank}.json")
    ds.write_text(json.dumps({**base, "zero_optimization": {**base["zero_optimization"], **setting}}))
    entry = {"setting": setting}
    try:
        _, engine, _, ema = ds_engine.build(config, build_ds_config(ds, config, world.size))
        losses = [step(engine, ema, 0)]
        engine.eval()  # validation: forwards that no backward follows
        with torch.no_grad():
            for i in range(3):
                torch.manual_seed(100 + i)
                engine(batch(100 + i), per_sample=True)
        ds_engine.release_parameters(engine)
        engine.train()
        raw = ds_engine.raw_state_dict(engine, world.is_main, bucket_numel=50_000)  # a preview's gather
        full_ema = ema.full_state_dict()  # a checkpoint's
        losses.append(step(engine, ema, 1))
        if world.is_main:
            entry.update(weights=digest(raw), equals_ema=sorted(raw) == sorted(full_ema) and all(
                torch.equal(raw[k], full_ema[k]) for k in full_ema), losses=losses)
        del engine, ema
    except Exception as err:  # noqa: BLE001 (the probe reports which setting failed, and how)
        entry["error"] = f"{type(err).__name__}: {err}"[:400] + "\n" + traceback.format_exc()[-1500:]
    report.append(entry)
if world.is_main:
    Path(args.out).write_text(json.dumps(report, indent=1))
distributed.teardown()
