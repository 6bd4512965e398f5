"""The DeepSpeed JSON config, reconciled once with the training config.

Where the two overlap (batch sizes, learning rate, weight decay, clipping, precision), the DeepSpeed file
says ``"auto"`` and the value comes from the training config, so one number lives in one place. A number
written in both that disagrees, or batch figures that break
``train_batch_size = micro_batch x gradient_accumulation_steps x world_size``, is a clear error naming
both files' values, before DeepSpeed's own assertion could fire.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import Config
from ..errors import ConfigError


def _fill(ds: dict, key: str, value, path: str, ours: str) -> None:
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif current != value:
        raise ConfigError(f"{path} sets {key}={current!r} but the training config's {ours} gives {value!r}; "
                          f"write \"auto\" in {path} or make them agree")


def build_ds_config(path: str | Path, config: Config, world_size: int) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {str(path)!r} does not exist (see ds_configs/)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON: {err}") from None
    name = str(path)
    micro, accum = config.batch_size, config.gradient_accumulation_steps
    _fill(ds, "train_micro_batch_size_per_gpu", micro, name, "batch_size (per-GPU micro-batch)")
    _fill(ds, "gradient_accumulation_steps", accum, name, "gradient_accumulation_steps")
    expected = micro * accum * world_size
    if ds.get("train_batch_size", "auto") not in ("auto", expected):
        raise ConfigError(
            f"{name} sets train_batch_size={ds['train_batch_size']} but batch_size {micro} x "
            f"gradient_accumulation_steps {accum} x world size {world_size} = {expected}; write \"auto\" in "
            f"{name} or change batch_size/gradient_accumulation_steps")
    ds["train_batch_size"] = expected
    _fill(ds, "gradient_clipping", config.max_grad_norm, name, "max_grad_norm")
    params = ds.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    _fill(params, "lr", config.learning_rate, name + " optimizer.params", "learning_rate")
    _fill(params, "weight_decay", config.weight_decay, name + " optimizer.params", "weight_decay")

    wanted = {True: "bf16", False: "no"}.get(config.mixed_precision, config.mixed_precision)
    for kind in ("fp16", "bf16"):
        block = ds.get(kind)
        if block is None:
            continue
        if block.get("enabled") == "auto":
            block["enabled"] = wanted == kind
        elif block.get("enabled") and config.mixed_precision not in (True, kind):
            raise ConfigError(f"{name} enables {kind} but the training config's mixed_precision is "
                              f"{config.mixed_precision!r}; set mixed_precision to {kind!r} or true")
    enabled = [k for k in ("fp16", "bf16") if ds.get(k, {}).get("enabled")]
    if len(enabled) > 1:
        raise ConfigError(f"{name} enables both fp16 and bf16; choose one")
    if "bf16" in enabled:
        # DeepSpeed skips a non-finite bf16 step only with this on, and its default changed across versions.
        if ds["bf16"].setdefault("check_grad_overflow", True) is not True:
            raise ConfigError(f"{name} sets bf16.check_grad_overflow={ds['bf16']['check_grad_overflow']!r}; the "
                              "trainer relies on DeepSpeed skipping non-finite bf16 steps: set it to true")
    if wanted in ("fp16", "bf16") and config.mixed_precision != True and not enabled:  # noqa: E712
        raise ConfigError(f"the training config asks for mixed_precision {wanted!r} but {name} has no "
                          f"\"{wanted}\": {{\"enabled\": \"auto\"}} block to turn it on")
    return ds


def precision(ds: dict) -> str:
    return next((k for k in ("fp16", "bf16") if ds.get(k, {}).get("enabled")), "fp32")


def zero_stage(ds: dict) -> int:
    return ds.get("zero_optimization", {}).get("stage", 0)
