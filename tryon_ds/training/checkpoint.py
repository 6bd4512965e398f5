"""Checkpoints: DeepSpeed's own sharded save, plus the EMA and the run's state, marked complete last; and
what a run resumes from.

Layout, one folder per UNet: ``{checkpoint_dir}/unet{N}/step{S:08d}/``
    (DeepSpeed's files)          model and optimizer states of every rank
    ema.safetensors              the whole EMA (fp32), world-size independent
    trainer_state.json           step, data position, world size, ZeRO stage, seeds, config
    COMPLETE                     written by rank 0 after every rank has finished writing: the manifest,
                                 each file's size and SHA-256, hashed by the rank that wrote the file
    BEST.json                    (in unet{N}/) the best checkpoint by the run's best_metric: its tag, step,
                                 metric, direction and value; that checkpoint is kept whatever
                                 keep_checkpoints says, until a better one replaces it
``--resume auto`` takes the newest folder with COMPLETE, so a run killed while saving falls back to the
previous checkpoint. Before a checkpoint is trusted (resuming, consolidating) its files are checked against
the manifest, each rank a share of them; a damaged one is moved aside (``step{S}.damaged``, never deleted)
and ``--resume auto`` goes on to the newest intact one. A checkpoint of an older release has an empty
COMPLETE: it is used unchecked, and said so. A checkpoint saved at another world size is converted once to
DeepSpeed's universal format (``step{S}_universal/``) and loaded from there.
"""
from __future__ import annotations

import json
import os
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
from .. import compat

TAG = re.compile(r"^step(\d{8})$")
MANIFEST_FORMAT = 1


def unet_dir(checkpoint_dir: str, unet_number: int) -> Path:
    return Path(checkpoint_dir) / f"unet{unet_number}"


def complete_checkpoints(root: Path) -> list[Path]:
    found = [p for p in root.glob("step*") if TAG.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(TAG.match(p.name).group(1)))


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def trainer_state(step: int, config: Config, world_size: int, zero_stage: int) -> dict:
    """What trainer_state.json records beside DeepSpeed's files: enough to resume, convert and export."""
    accum = config.gradient_accumulation_steps
    return {"step": step, "world_size": world_size, "zero_stage": zero_stage, "unet_number": config.train_unet_number,
            "data_position": {"micro_batches_per_rank": step * accum, "streams": config.data.streams},
            "rng": {"seed": config.seed, "scheme": "per micro-batch slot: seed_for(seed, 'train', slot)"},
            "config": config.to_dict()}


def file_entries(folder: Path, paths) -> dict[str, dict]:
    """{name relative to ``folder``: {size, sha256}} of files just written, read back from disk."""
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": atomic.sha256_of(p)} for p in paths}


def read_manifest(ckpt: Path) -> dict[str, dict] | None:
    """The files the COMPLETE marker lists, or None for a checkpoint of a release that wrote no manifest."""
    data = (ckpt / "COMPLETE").read_bytes()
    if not data.strip():
        return None
    try:
        manifest = json.loads(data)
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"expected a JSON object with \"format\": {MANIFEST_FORMAT}")
        files = manifest["files"]
        for name, entry in files.items():
            if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                    and isinstance(entry.get("sha256"), str)):
                raise ValueError(f"the entry of {name} is {entry!r}, expected {{size, sha256}}")
        return files
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return {"COMPLETE": {"unreadable": str(err) or type(err).__name__}}


def check_files(ckpt: Path, files: dict[str, dict]) -> list[str]:
    """What differs between the files on disk and their manifest entries, one phrase per damaged file."""
    problems = []
    for name, want in sorted(files.items()):
        path = ckpt / name
        if "unreadable" in want:
            problems.append(f"{name}: not a manifest ({want['unreadable']})")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif (size := path.stat().st_size) != want["size"]:
            problems.append(f"{name}: {size} bytes, {want['size']} written")
        elif atomic.sha256_of(path) != want["sha256"]:
            problems.append(f"{name}: SHA-256 differs from the one written (same size)")
    return problems


def verify(ckpt: Path, rank: int = 0, world_size: int = 1) -> list[str] | None:
    """This rank's share of the check of ``ckpt`` (every ``world_size``-th file of its manifest): the
    problems found, or None when the checkpoint has no manifest to check against."""
    files = read_manifest(ckpt)
    if files is None:
        return None
    names = sorted(files)[rank::world_size]
    return check_files(ckpt, {name: files[name] for name in names})


def verify_everywhere(ckpt: Path, world) -> list[str] | None:
    """``verify`` with the files shared out over the ranks; every rank gets the whole answer. Collective
    (``world`` None: this process alone, as the consolidation tool runs)."""
    if world is None or world.size == 1:
        return verify(ckpt)
    found = [None] * world.size
    dist.all_gather_object(found, verify(ckpt, world.rank, world.size))
    if found[0] is None:
        return None
    return sorted(problem for share in found for problem in share)


def move_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint out of ``--resume auto``'s way; nothing in it is deleted."""
    target, n = ckpt.with_name(f"{ckpt.name}.damaged"), 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{ckpt.name}.damaged{n}")
    os.replace(ckpt, target)
    return target


@dataclass(frozen=True)
class Resume:
    """Where a run starts: ``step`` steps done, from ``checkpoint`` (None: a fresh run), which DeepSpeed
    loads from ``load_from`` (the checkpoint itself, or its universal conversion); ``notes``: what was
    found on the way (damaged checkpoints moved aside, a checkpoint that could not be checked)."""
    step: int = 0
    checkpoint: Path | None = None
    load_from: Path | None = None
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.checkpoint is None:
            return "a fresh run"
        return f"resumed from {self.checkpoint}" + (" (universal)" if self.load_from != self.checkpoint else "")


def candidates(root: Path, resume: str) -> list[Path]:
    """``none`` -> []; ``auto`` -> the complete checkpoints, newest first; else the one folder named."""
    if resume == "none":
        return []
    if resume == "auto":
        return complete_checkpoints(root)[::-1]
    path = Path(resume)
    if not (path / "COMPLETE").is_file():
        raise UserError(f"--resume {resume}: not a complete checkpoint folder (no COMPLETE marker in it)")
    return [path]


def choose_intact(found: list[Path], world, named: bool) -> tuple[Path | None, list[str]]:
    """The first checkpoint of ``found`` whose files match their manifest, and notes on the way. A damaged
    one is moved aside by rank 0, unless the user ``named`` it (then it is an error, left where it is).
    With every one damaged: a UserError listing what was wrong. Collective, as ``verify_everywhere``."""
    notes, damaged = [], []
    for ckpt in found:
        problems = verify_everywhere(ckpt, world)
        if problems is None:
            notes.append(f"{ckpt} was written without checksums (an earlier release): used unchecked")
        if not problems:
            if damaged:
                which = "intact checkpoint" if problems == [] else "checkpoint left"
                notes.append(f"using {ckpt.name}, the newest {which}: {'; '.join(damaged)}")
            return ckpt, notes
        if named:
            raise UserError(f"checkpoint {ckpt} is damaged: {'; '.join(problems)}")
        aside = [None]
        if world is None or world.is_main:
            aside[0] = move_aside(ckpt).name
        if world is not None and world.size > 1:
            dist.broadcast_object_list(aside, src=0)
        damaged.append(f"{ckpt.name} is damaged ({', '.join(problems)}), moved aside to {aside[0]}")
    if damaged:
        raise UserError(f"no intact checkpoint to resume from under {found[0].parent}: {'; '.join(damaged)}")
    return None, notes


def plan_resume(root: Path, resume: str, world, ds_config: dict) -> Resume:
    """``--resume none|auto|FOLDER`` -> a :class:`Resume`, from a checkpoint whose files were checked. A
    checkpoint of another world size is converted once by rank 0 to DeepSpeed's universal format, and
    ``ds_config`` is told to load it so. Collective."""
    ckpt, notes = choose_intact(candidates(root, resume), world, named=resume not in ("none", "auto"))
    if ckpt is None:
        return Resume()
    state = read_state(ckpt)
    if state["world_size"] == world.size:
        return Resume(state["step"], ckpt, ckpt, tuple(notes))
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
    return Resume(state["step"], ckpt, universal_path(ckpt), tuple(notes))


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


def save(engine, ema, root: Path, step: int, state: dict, keep: int, is_main: bool, protect: str | None = None
         ) -> Path:
    """Every rank calls this. Returns the checkpoint folder. The EMA is gathered to rank 0, which writes it.
    Each rank reads back and hashes the files it wrote; rank 0 writes them all into COMPLETE, last, then
    keeps the newest ``keep`` checkpoints and ``protect`` (the best's tag)."""
    tag = f"step{step:08d}"
    ckpt = root / tag
    try:
        if is_main and ckpt.exists():  # an incomplete leftover of a killed run at the same step
            shutil.rmtree(ckpt)
        dist.barrier()
        with compat.files_written(engine) as written:
            engine.save_checkpoint(str(root), tag=tag, client_state={"trainer_state": state})
        ema_state = ema.full_state_dict() if ema is not None else None
        if is_main:
            if ema_state is not None:
                atomic.save_safetensors(ema_state, ckpt / "ema.safetensors")
                written.append(ckpt / "ema.safetensors")
            atomic.write_json(ckpt / "trainer_state.json", state)
            written.append(ckpt / "trainer_state.json")
        mine = file_entries(ckpt, written)
    except Exception as err:  # torch.save and safetensors report a full disk as RuntimeError / SafetensorError
        reason = _write_failure(err, root)
        if is_main:  # free the space and leave nothing half-written (ignore_errors: a file there stays)
            shutil.rmtree(ckpt, ignore_errors=True)
        raise CheckpointWriteError(reason) from None
    entries = [None] * dist.get_world_size()
    dist.all_gather_object(entries, mine)  # also: every rank's files are written
    if is_main:
        files = {name: entry for share in entries for name, entry in share.items()}
        atomic.write_json(ckpt / "COMPLETE", {"format": MANIFEST_FORMAT, "step": step, "files": files})
        # The checkpoint just written was read back whole by its writers: removing older ones never
        # leaves the folder without an intact checkpoint.
        prune(root, keep, protect)
    dist.barrier()
    return ckpt


def prune(root: Path, keep: int, protect: str | None = None) -> None:
    """Remove all but the newest ``keep`` complete checkpoints, and never ``protect`` (the best's tag)."""
    for old in complete_checkpoints(root)[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(universal_path(old), ignore_errors=True)


BEST = "BEST.json"


def read_best(root: Path) -> dict | None:
    """The best checkpoint's record in UNet folder ``root`` ({"checkpoint": tag, "step", "metric", "mode",
    "value"}), None where none was recorded."""
    path = root / BEST
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not readable JSON ({err}); delete it to choose the best anew") from None
    if not isinstance(record, dict) or not {"checkpoint", "step", "metric", "mode", "value"} <= set(record):
        raise UserError(f"{path} is not a best-checkpoint record (expected checkpoint, step, metric, mode and "
                        "value); delete it to choose the best anew")
    return record


def write_best(root: Path, record: dict) -> None:
    atomic.write_json(root / BEST, record)


def consolidate_hint(path: Path) -> str | None:
    """The command that makes an inference bundle when ``path`` is training output rather than a bundle: a
    UNet's checkpoint folder, one of its steps, the checkpoint_dir, or the training guide's
    ``checkpoints/best_model.pt``; None for anything else."""
    path = Path(path)
    if path.suffix == ".pt" and not path.exists():
        path = path.parent
    if (path / "COMPLETE").is_file():
        path = path.parent
    if path.is_dir() and TAG.match(next((p.name for p in sorted(path.glob("step*"))), "")):
        unets = [path]
    else:
        unets = sorted(p for p in path.glob("unet*") if p.is_dir() and any(p.glob("step*"))) if path.is_dir() else []
    if not unets:
        return None
    which = " --best" if any((u / BEST).is_file() for u in unets) else ""
    commands = "; ".join(f"python tools/consolidate_checkpoint.py {u}{which} --out bundle/" for u in unets)
    return (f"{path} holds training checkpoints, not an inference bundle: make one with `{commands}`, then "
            "pass --checkpoint bundle/")


def universal_path(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + "_universal")


def convert_to_universal(ckpt: Path, zero_stage: int) -> Path:
    """DeepSpeed's ds_to_universal, run once by rank 0; the others wait at the caller's barrier. A
    conversion left from an earlier start is reused if its files match its manifest; it is derived from
    the checkpoint, so a damaged one is simply made again."""
    out = universal_path(ckpt)
    if (out / "COMPLETE").is_file() and not verify(out):
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
    files = file_entries(out, sorted(p for p in out.rglob("*") if p.is_file()))
    atomic.write_json(out / "COMPLETE", {"format": MANIFEST_FORMAT, "files": files})
    return out


def load_ema(ckpt: Path, ema) -> None:
    path = ckpt / "ema.safetensors"
    if ema is None:
        return
    if not path.is_file():
        raise UserError(f"{ckpt} holds no EMA (ema.safetensors) but use_ema is true")
    ema.load_full_state_dict(load_file(str(path)))
