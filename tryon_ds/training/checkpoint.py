"""Checkpoints: DeepSpeed's own sharded save, plus the EMA and the run's state, marked complete last; and
what a run resumes from.

Layout, one folder per UNet: ``{checkpoint_dir}/unet{N}/step{S:08d}/``
    (DeepSpeed's files)          model and optimizer states of every rank
    ema.safetensors              the whole EMA (fp32), world-size independent
    trainer_state.json           step, data position, world size, ZeRO stage, seeds, config
    COMPLETE                     written by rank 0 after every rank has finished writing
``--resume auto`` takes the newest folder with COMPLETE, so a run killed while saving falls back to the
previous checkpoint. A checkpoint saved at another world size is converted once to DeepSpeed's universal
format (``step{S}_universal/``) and loaded from there.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import load_file

from .. import atomic
from ..config import Config
from ..errors import UserError

TAG = re.compile(r"^step(\d{8})$")


def unet_dir(checkpoint_dir: str, unet_number: int) -> Path:
    return Path(checkpoint_dir) / f"unet{unet_number}"


def complete_checkpoints(root: Path) -> list[Path]:
    found = [p for p in root.glob("step*") if TAG.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(TAG.match(p.name).group(1)))


def find_resume(root: Path, resume: str) -> Path | None:
    """``none`` -> None; ``auto`` -> the newest complete checkpoint (or None); else a checkpoint folder."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "COMPLETE").is_file():
        raise UserError(f"--resume {resume}: not a complete checkpoint folder (no COMPLETE marker in it)")
    return path


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def trainer_state(step: int, config: Config, world_size: int, zero_stage: int) -> dict:
    """What trainer_state.json records beside DeepSpeed's files: enough to resume, convert and export."""
    accum = config.gradient_accumulation_steps
    return {"step": step, "world_size": world_size, "zero_stage": zero_stage, "unet_number": config.train_unet_number,
            "data_position": {"micro_batches_per_rank": step * accum, "streams": config.data.streams},
            "rng": {"seed": config.seed, "scheme": "per micro-batch slot: seed_for(seed, 'train', slot)"},
            "config": config.to_dict()}


@dataclass(frozen=True)
class Resume:
    """Where a run starts: ``step`` steps done, from ``checkpoint`` (None: a fresh run), which DeepSpeed
    loads from ``load_from`` (the checkpoint itself, or its universal conversion)."""
    step: int = 0
    checkpoint: Path | None = None
    load_from: Path | None = None

    def describe(self) -> str:
        if self.checkpoint is None:
            return "a fresh run"
        return f"resumed from {self.checkpoint}" + (" (universal)" if self.load_from != self.checkpoint else "")


def plan_resume(root: Path, resume: str, world, ds_config: dict) -> Resume:
    """``--resume none|auto|FOLDER`` -> a :class:`Resume`. A checkpoint of another world size is converted
    once by rank 0 to DeepSpeed's universal format, and ``ds_config`` is told to load it so. Collective."""
    ckpt = find_resume(root, resume)
    if ckpt is None:
        return Resume()
    state = read_state(ckpt)
    if state["world_size"] == world.size:
        return Resume(state["step"], ckpt, ckpt)
    failure = [None]
    if world.is_main:
        try:
            convert_to_universal(ckpt, state["zero_stage"])
        except RuntimeError as err:
            failure[0] = str(err)
    dist.broadcast_object_list(failure, src=0)  # every rank fails alike, none waits for the others
    if failure[0] is not None:
        raise UserError(failure[0])
    ds_config["checkpoint"] = {"load_universal": True}
    return Resume(state["step"], ckpt, universal_path(ckpt))


class CheckpointWriteError(Exception):
    pass


def _write_failure(err: Exception, root: Path) -> str:
    """Why a checkpoint write failed, in words: torch.save's error for a full disk is "unexpected pos ..."."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    if free is not None and free < 16 * 2**20:
        return f"No space left on device: {free / 2**20:.1f} MiB free under {root}"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def save(engine, ema, root: Path, step: int, state: dict, keep: int, is_main: bool) -> Path:
    """Every rank calls this. Returns the checkpoint folder. The EMA is gathered to rank 0, which writes it."""
    tag = f"step{step:08d}"
    ckpt = root / tag
    try:
        if is_main and ckpt.exists():  # an incomplete leftover of a killed run at the same step
            shutil.rmtree(ckpt)
        dist.barrier()
        engine.save_checkpoint(str(root), tag=tag, client_state={"trainer_state": state})
        ema_state = ema.full_state_dict() if ema is not None else None
        if is_main:
            if ema_state is not None:
                atomic.save_safetensors(ema_state, ckpt / "ema.safetensors")
            atomic.write_json(ckpt / "trainer_state.json", state)
    except Exception as err:  # torch.save and safetensors report a full disk as RuntimeError / SafetensorError
        reason = _write_failure(err, root)
        if is_main:  # free the space and leave nothing half-written (ignore_errors: a file there stays)
            shutil.rmtree(ckpt, ignore_errors=True)
        raise CheckpointWriteError(reason) from None
    dist.barrier()  # every rank's DeepSpeed files are written
    if is_main:
        atomic.write_bytes(ckpt / "COMPLETE", b"")
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)
    dist.barrier()
    return ckpt


def universal_path(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + "_universal")


def convert_to_universal(ckpt: Path, zero_stage: int) -> Path:
    """DeepSpeed's ds_to_universal, run once by rank 0; the others wait at the caller's barrier."""
    out = universal_path(ckpt)
    if (out / "COMPLETE").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    if zero_stage < 3:
        cmd.append("--inject_missing_state")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"converting {ckpt} to a universal checkpoint failed:\n{result.stderr[-3000:]}")
    # DeepSpeed reads our files from the folder it loads, so they travel along.
    for name in ("ema.safetensors", "trainer_state.json"):
        if (ckpt / name).is_file():
            shutil.copy2(ckpt / name, out / name)
    atomic.write_bytes(out / "COMPLETE", b"")
    return out


def load_ema(ckpt: Path, ema) -> None:
    path = ckpt / "ema.safetensors"
    if ema is None:
        return
    if not path.is_file():
        raise UserError(f"{ckpt} holds no EMA (ema.safetensors) but use_ema is true")
    ema.load_full_state_dict(load_file(str(path)))
