"""The cascade bundle: what inference loads, written from a ZeRO checkpoint by tools/consolidate_checkpoint.py.

    BUNDLE/unet1/weights.safetensors   the raw weights of the base UNet
    BUNDLE/unet1/ema.safetensors       its EMA weights, when the run kept an EMA
    BUNDLE/unet1/config.json           UNet number, training step, storage dtype and the run's whole config
    BUNDLE/unet2/...                   the same for each later UNet of the cascade (unet2/, unet3/, ...)

Weights are safetensors only (no pickle). Each UNet's folder is written under a temporary name and renamed,
so a killed consolidation leaves no half-written folder behind.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import atomic
from .config import Config, build_config
from .errors import UserError
from .model import DTYPES, build_unet

UNET_PREFIX = "unet."  # the trainer's CascadeUNet holds the UNet as .unet


def expected_shapes(config: Config, unet_number: int) -> dict[str, tuple]:
    with torch.device("meta"):
        unet = build_unet(config.unet(unet_number), config.conditioning(unet_number).super_resolves, config.channels)
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def check_weights(weights: dict[str, torch.Tensor], config: Config, unet_number: int, what: str) -> None:
    """Every tensor of the UNet present with the right shape, nothing extra; else a UserError listing them."""
    want = expected_shapes(config, unet_number)
    missing = sorted(set(want) - set(weights))
    extra = sorted(set(weights) - set(want))
    wrong = sorted(k for k in set(want) & set(weights) if tuple(weights[k].shape) != want[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(weights[k].shape)}, expected {want[k]})")
        raise UserError(f"{what} does not match the unet{unet_number} of its config (preset "
                        f"{config.unet(unet_number).preset!r}): " + "; ".join(parts))


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}


def write_unet(bundle: Path, unet_number: int, config: Config, step: int, weights: dict, ema: dict | None,
               dtype: str, force: bool, source: str, selected: dict | None = None) -> Path:
    """UNet ``unet_number``'s folder of the bundle; ``selected`` says how its checkpoint was chosen (the
    best by a metric, the newest, one named), recorded in its config.json."""
    final = bundle / f"unet{unet_number}"
    if final.exists() and not force:
        raise UserError(f"{final} exists; pass --force to replace it")
    check_weights(weights, config, unet_number, f"the checkpoint's weights ({source})")
    if ema is not None:
        check_weights(ema, config, unet_number, f"the checkpoint's EMA ({source})")
    bundle.mkdir(parents=True, exist_ok=True)
    tmp = bundle / f".unet{unet_number}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    cast = DTYPES[dtype]
    atomic.save_safetensors({k: v.to(cast) for k, v in weights.items()}, tmp / "weights.safetensors")
    if ema is not None:
        atomic.save_safetensors({k: v.to(cast) for k, v in ema.items()}, tmp / "ema.safetensors")
    meta = {"unet_number": unet_number, "step": step, "dtype": dtype, "has_ema": ema is not None, "source": source,
            **({"selected": selected} if selected else {}),
            "parameters": sum(v.numel() for v in weights.values()), "config": config.to_dict()}
    atomic.write_json(tmp / "config.json", meta)
    atomic.replace_dir(tmp, final)
    return final


def read_unet(bundle: Path, unet_number: int, ema: bool) -> tuple[Config, dict, dict]:
    """(config, UNet weights, meta) of one UNet of a bundle, checked against the config."""
    folder = Path(bundle) / f"unet{unet_number}"
    meta_path = folder / "config.json"
    if not meta_path.is_file():
        raise UserError(f"{folder}: no config.json; is {bundle} a bundle written by tools/consolidate_checkpoint.py?")
    meta = json.loads(meta_path.read_text())
    config = build_config(meta["config"])
    name = "ema.safetensors" if ema else "weights.safetensors"
    if ema and not meta.get("has_ema"):
        raise UserError(f"{folder} has no EMA weights (the run did not keep an EMA); use --no-ema")
    path = folder / name
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        weights = load_file(str(path))
    except Exception as err:
        raise UserError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from None
    check_weights(weights, config, unet_number, str(path))
    return config, weights, meta
