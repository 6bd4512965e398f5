"""Run under the deepspeed launcher on CPU ranks: for each case of --cases (a JSON list of [DeepSpeed config
file, mixed_precision, accumulation, zero_optimization overrides]), a real engine of the tiny UNet 1 with
DeepSpeed's comms logger on, three optimizer steps, and what the logger recorded over the last one (the
first steps record ZeRO-3's trace and broadcast the persistent parameters); every rank writes its own as
JSON to --out/rank<N>.json."""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import deepspeed.comm  # noqa: E402

from tryon_ds.cascade import random_batch  # noqa: E402
from tryon_ds.config import build_config, deep_merge, read_config_file  # noqa: E402
from tryon_ds.training import distributed, engine as ds_engine  # noqa: E402
from tryon_ds.training.ds_config import build_ds_config  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--cases", required=True)
p.add_argument("--local_rank", type=int)
args = p.parse_args()
world = distributed.setup()
logger = deepspeed.comm.comms_logger
report = []
for name, mixed, accumulation, zero in json.loads(args.cases):
    config = build_config(deep_merge(read_config_file(ROOT / "configs" / "tiny.yaml"),
                                     {"batch_size": 2, "gradient_accumulation_steps": accumulation,
                                      "mixed_precision": mixed, "warmup_steps": 0}))
    ds = build_ds_config(ROOT / "ds_configs" / f"{name}.json", config, world.size)
    ds["zero_optimization"].update(zero)
    ds["comms_logger"] = {"enabled": True, "prof_all": True}
    model, engine, _, ema = ds_engine.build(config, ds)
    batch = random_batch(config, 1, 2, torch.Generator().manual_seed(0))
    for step in range(3):
        logger.reset_data()  # then get_raw_data() is this step's: {op: {bytes: [count, latencies, ...]}}
        ds_engine.train_step(engine, ema, [batch] * accumulation, step)
    report.append({"ds": ds, "record": {op: {str(size): v[0] for size, v in sizes.items()}
                                        for op, sizes in logger.get_raw_data().items()}})
    del model, engine, ema
Path(args.out, f"rank{world.rank}.json").write_text(json.dumps(report))
