"""Run under the deepspeed launcher on 2 CPU ranks: a real DeepSpeed engine of the tiny UNet for each ZeRO
stage and precision the CPU runs, and for the shipped GPU bf16 configs; rank 0 writes what each showed as
JSON. Then DeepSpeed's own fp16 loss scaler run down to its minimum inside a real ZeRO-2 engine."""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tryon_ds.config import build_config, deep_merge, read_config_file  # noqa: E402
from tryon_ds.cascade import random_batch  # noqa: E402
from tryon_ds.training.engine import state_bytes  # noqa: E402
from tryon_ds.planner import model_states  # noqa: E402
from tryon_ds import compat  # noqa: E402
from tryon_ds.training import distributed, engine as ds_engine  # noqa: E402
from tryon_ds.training.ds_config import build_ds_config, precision, zero_stage  # noqa: E402

CASES = [("cpu_zero0", "no"), ("cpu_zero0", "bf16"), ("cpu_zero2", "no"), ("cpu_zero2", "bf16"), ("cpu_zero3", "no"),
         ("cpu_zero3", "bf16"), ("zero2_bf16", "bf16"), ("zero3_bf16", "bf16")]

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--local_rank", type=int)
args = p.parse_args()
world = distributed.setup()


def tiny(**over):
    # ema_decay 0: after an update the EMA equals the weights the optimizer holds (its fp32 master copy).
    base = {"batch_size": 2, "ema_decay": 0.0, "max_grad_norm": 1.0, "learning_rate": 1e-3, "warmup_steps": 0}
    return build_config(deep_merge(read_config_file(ROOT / "configs" / "tiny.yaml"), {**base, **over}))


def train_steps(engine, ema, config, steps=2):
    """Returns the bytes each state holds on this rank between the last backward and step (as tools/bench/train.py)."""
    batch = {k: v.to(world.device) for k, v in random_batch(config, 1, 2, torch.Generator().manual_seed(0)).items()}
    for step in range(steps):
        torch.manual_seed(step)
        engine.backward(engine(batch))
        states = state_bytes(engine)
        ds_engine.step(engine)
        if engine.was_step_applied():
            ema.update(step, ds_engine.grad_norm_ok(engine))
    return states


report = {}
for name, mixed in CASES:
    config = tiny(mixed_precision=mixed)
    ds = build_ds_config(ROOT / "ds_configs" / f"{name}.json", config, world.size)
    model, engine, _, ema = ds_engine.build(config, ds)
    states = train_steps(engine, ema, config)
    full_ema = ema.full_state_dict()
    module = ds_engine.raw_state_dict(engine, world.is_main)  # the module's own (bf16 or fp32) weights
    # what a preview takes: the same weights handed over a bucket at a time (small buckets: several of them)
    streamed_ema, streamed_module, buckets = {}, {}, []
    ema.full_state_dict(bucket_numel=4096, into=lambda b: (streamed_ema.update(b), buckets.append(len(b))))
    ds_engine.raw_state_dict(engine, world.is_main, bucket_numel=4096, into=streamed_module.update)
    scale = compat.loss_scale(engine)
    states["ema"] = sum(s.numel() * s.element_size() for s in ema.shadow)
    planned = model_states(sum(v.numel() for v in engine.module.state_dict().values()) if zero_stage(ds) < 3
                           else sum(compat.full_numel(p) for p in engine.module.parameters()), zero_stage(ds), precision(ds),
                           world.size, ds)
    if world.is_main:
        names = sorted(full_ema)
        report[f"{name}/{mixed}"] = {
            "precision": precision(ds), "zero": zero_stage(ds), "loss_scale": scale,
            "optimizer": type(engine.optimizer).__name__,
            "grad_accum_dtype": str(engine.get_data_types()[1]),
            "communication_data_type": str(engine.communication_data_type),
            "ema_dtypes": sorted({str(v.dtype) for v in full_ema.values()}),
            "ema_names_match": names == sorted(module),
            # the EMA rounded to the module's dtype is the module's weight: it tracks the master those come from
            "ema_rounds_to_module": all(torch.equal(full_ema[k].to(engine.module.unet.person_in.weight.dtype).float(),
                                                    module[k]) for k in names),
            "ema_finer_than_module": any(not torch.equal(full_ema[k], module[k]) for k in names),
            "streamed_equal": (sorted(streamed_ema) == names and sorted(streamed_module) == sorted(module)
                               and all(torch.equal(streamed_ema[k], full_ema[k]) for k in names)
                               and all(torch.equal(streamed_module[k], module[k]) for k in module)),
            "streamed_buckets": len(buckets),
            "states": states, "planned": planned,
        }
    del model, engine, ema

# DeepSpeed's fp16 dynamic loss scaler (the GPU's) in a real ZeRO-2 engine, run down to its minimum by
# steps whose gradients overflow: DeepSpeed raises a bare Exception, the trainer's step a LossScaleExhausted.
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler  # noqa: E402

config = tiny(mixed_precision="no")
_, engine, _, ema = ds_engine.build(config, build_ds_config(ROOT / "ds_configs" / "cpu_zero2.json", config, world.size))
engine.optimizer.loss_scaler = DynamicLossScaler(init_scale=4, scale_window=1000, min_scale=1,
                                                 delayed_shift=1, consecutive_hysteresis=False,
                                                 raise_error_at_min_scale=True, dtype=torch.float32)
batch = {k: v.to(world.device) for k, v in random_batch(config, 1, 2).items()}
scales, outcome = [], None
for step in range(6):
    loss = engine(batch)
    engine.backward(loss * float("nan"))
    try:
        ds_engine.step(engine)
    except ds_engine.LossScaleExhausted as err:
        outcome = f"LossScaleExhausted at step {step}: {err}"
        break
    scales.append(compat.loss_scale(engine))
if world.is_main:
    report["exhaustion"] = {"scales": scales, "outcome": outcome, "final_scale": compat.loss_scale(engine)}
    Path(args.out).write_text(json.dumps(report, indent=1))
distributed.teardown()
