"""Train one UNet of the TryOnDiffusion cascade with DeepSpeed.

    deepspeed tryon_ds/train.py --deepspeed_config ds_configs/zero2_bf16.json --config config.json --train_unet 1
    deepspeed --num_gpus 2 tryon_ds/train.py --deepspeed_config ds_configs/cpu_zero2.json --config configs/tiny.yaml
    torchrun --nproc_per_node 8 tryon_ds/train.py ...      srun python tryon_ds/train.py ...      python tryon_ds/train.py ...

Each optimizer step: for every micro-batch, the UNet's diffusion loss (random timestep, noise, classifier-free
conditioning dropout where the UNet has conditioning to drop, and noise-conditioning augmentation of its
conditioning images; a super-resolution UNet's low-res input among them), backward, and DeepSpeed's step,
which applies AdamW with clipping at the accumulation boundary; then the EMA. Every ``log_freq`` steps the
mean loss, every ``validation_freq`` the validation loss, every ``sample_freq`` a sample grid from the EMA
weights, every ``checkpoint_freq`` a checkpoint, each at every multiple of its own frequency and at the last
step (training/schedule.py). SIGTERM or SIGUSR1 finishes the step, saves and exits 0.

The loop never waits for the GPU between steps on its own account: losses and the finiteness of each step
stay on the device and reach the host where an action is due, and at least every ``max_bad_steps`` steps;
the stop signal is checked there too.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A stop signal can come while the imports below take seconds (a job preempted as it starts): from the first
# moment it is remembered rather than killing the process, and the run saves and exits 0 after one step.
_signalled: list[int] = []
for _signum in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(_signum, lambda signum, frame: _signalled.append(signum))

if __name__ == "__main__" and not __package__:
    # Run as a script: import the package, never this folder's modules by their bare names.
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    from tryon_ds.cli import require_dependencies

    require_dependencies()

import torch
import torch.distributed as dist

from tryon_ds.cli import exit_on_user_error
from tryon_ds.config import Config, add_config_args, config_from_args, find_config_file
from tryon_ds.data.pipeline import RETRIED, Data, shutdown_workers, store_trouble
from tryon_ds.data.preprocess import to_device
from tryon_ds.data.shards import check_shard_size, read_manifest
from tryon_ds.errors import UserError
from tryon_ds.model import compiled_graphs, parameter_count
from tryon_ds.seeding import seed_for
from tryon_ds.training import checkpoint, compat, distributed, engine as ds_engine, lifecycle
from tryon_ds.training.ds_config import build_ds_config, precision, zero_stage
from tryon_ds.training.ema import EMA
from tryon_ds.training.logger import NullLogger, RunLogger
from tryon_ds.training.previews import Previewer
from tryon_ds.training.run_lock import RunLock
from tryon_ds.training.schedule import Schedule

# DeepSpeed's ZeRO calls a torch collective that torch 2.13 marks deprecated, once per rank and step.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor. is deprecated", category=FutureWarning)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--deepspeed_config", help="DeepSpeed JSON (ds_configs/ is found from any folder); default: "
                                              "ds_configs/zero2_bf16.json on GPU, ds_configs/cpu_zero2.json on CPU")
    p.add_argument("--resume", default="none", help="none, auto (the newest complete checkpoint) or a folder")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def total_steps(config: Config, global_batch: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    if config.data.train_shards:
        raise UserError("with data.train_shards given, there is no manifest to count an epoch: set max_steps")
    samples = read_manifest(config.data_dir)["samples"]["train"]
    return config.num_epochs * math.ceil(samples / global_batch)


def ensure_writable(folders: dict[str, Path]) -> None:
    """Fail at start, not at the first checkpoint hours later, when an output folder cannot be written."""
    for key, folder in folders.items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{dist.get_rank()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise UserError(f"config key '{key}': cannot write to {folder} ({err.strerror or err})") from None


@dataclass
class Run:
    """What the loop and its periodic actions share."""
    config: Config
    world: distributed.World
    engine: Any
    ema: EMA | None
    log: RunLogger | NullLogger
    root: Path  # this UNet's checkpoint folder
    zero: int
    data: Data
    previewer: Previewer | None  # rank 0 only


class StepWindow:
    """Per-step facts kept on the device between sync points: each step's loss (summed over micro-batches)
    and whether it was finite; ``sync`` reduces them over the ranks and brings them to the host."""

    def __init__(self, size: int, device: torch.device):
        self.loss = torch.zeros(size, device=device)
        self.finite = torch.ones(size, device=device)
        self.applied: list[bool] = []  # DeepSpeed's verdict, already on the host
        self.first = 0  # the step number of slot 0

    def record(self, loss_sum: torch.Tensor, applied: bool) -> None:
        i = len(self.applied)
        ok = torch.isfinite(loss_sum)
        self.loss[i] = torch.where(ok, loss_sum, torch.zeros_like(loss_sum))
        self.finite[i] = ok.float()
        self.applied.append(applied)

    def sync(self, world_size: int) -> list[tuple[int, float, bool, bool]]:
        """(step, mean loss over ranks, loss finite on every rank, applied) of each step since the last sync."""
        n = len(self.applied)
        both = torch.cat([self.loss[:n], self.finite[:n]])
        dist.all_reduce(both)
        loss, finite = both[:n].tolist(), both[n:].tolist()
        out = [(self.first + i + 1, loss[i] / world_size if finite[i] == world_size else float("nan"),
                finite[i] == world_size, self.applied[i]) for i in range(n)]
        self.first += n
        self.applied = []
        self.finite.fill_(1.0)
        return out


def filled(batch: dict, size: int) -> dict:
    """A short batch (the last of a rank's validation set) filled up to ``size`` rows by repeating its own,
    so every validation forward has the micro-batch's shape: a compiled UNet then builds one graph for
    validation, not one more per partial size (minutes each on a GPU)."""
    n = len(batch["key"])
    if n >= size:
        return batch
    rows = [i % n for i in range(size)]
    return {k: v[rows] if torch.is_tensor(v) else [v[i] for i in rows] for k, v in batch.items()}


@torch.no_grad()
def validate(run: Run, step: int, fallback: dict, stop: lifecycle.StopRequest) -> None:
    """Mean loss over the whole validation set, each sample seen once across ranks. Ranks may hold
    different numbers of batches; every rank runs the same number of forwards (ZeRO-3 gathers parameters
    collectively), the extra ones on a stand-in batch with weight zero; a short batch is filled up with
    repeats of its rows, which weigh zero. A stop request cuts it short."""
    config, world, engine = run.config, run.world, run.engine
    engine.eval()
    batches = iter(run.data.val(config.batch_size))
    total = torch.zeros(2, device=world.device)
    index = 0
    while True:
        batch = next(batches, None)
        go = torch.tensor([0.0 if batch is None else 1.0, 1.0 if stop.requested else 0.0], device=world.device)
        dist.all_reduce(go, op=dist.ReduceOp.MAX)
        if go[0].item() == 0 or go[1].item() > 0:
            break
        n = 0 if batch is None else len(batch["key"])
        batch = to_device(fallback if batch is None else filled(batch, config.batch_size), world.device)
        torch.manual_seed(seed_for(config.seed, "val", world.rank, index))
        losses = engine(batch, per_sample=True).float()
        total += torch.stack([losses[:n].sum(), torch.tensor(float(n), device=world.device)])
        index += 1
    shutdown_workers(batches)
    dist.all_reduce(total)
    ds_engine.release_parameters(engine)  # what ZeRO-3 prefetched for a backward that never comes
    engine.train()
    if stop.requested:
        run.log.message(f"step {step}: validation cut short by the stop request")
    elif total[1] > 0:
        value = (total[0] / total[1]).item()
        run.log.scalars(step, {"val/loss": value})
        run.log.message(f"step {step}: validation loss {value:.4f}")


def preview(run: Run, step: int) -> None:
    """A sample grid from the EMA weights (the raw ones without an EMA), gathered to and drawn on rank 0."""
    def gather(into=None):  # a collective: every rank takes part, rank 0 from inside its preview
        if run.ema is not None:
            run.ema.full_state_dict(into=into)
        else:
            ds_engine.raw_state_dict(run.engine, run.world.is_main, into=into)

    if not run.world.is_main:
        gather()
    else:
        path = run.log.images(step, run.previewer.render(gather), run.previewer.columns())
        columns = run.previewer.columns().replace("sample", "EMA sample" if run.ema else "sample")
        run.log.message(f"step {step}: samples ({columns}) in {path} "
                        f"({run.previewer.seconds:.1f} s, {run.config.logging.preview_steps} DDIM steps)")


def save(run: Run, step: int) -> None:
    state = checkpoint.trainer_state(step, run.config, run.world.size, run.zero)
    start = time.perf_counter()
    try:
        ckpt = checkpoint.save(run.engine, run.ema, run.root, step, state, run.config.logging.keep_checkpoints,
                               run.world.is_main)
    except checkpoint.CheckpointWriteError as err:
        kept = [p.name for p in checkpoint.complete_checkpoints(run.root)]
        raise UserError(f"could not write the step-{step} checkpoint under {run.root} ({err}); "
                        f"the earlier checkpoints are intact: {', '.join(kept) or 'none'}") from None
    run.log.message(f"step {step}: checkpoint {ckpt} ({time.perf_counter() - start:.1f} s)")


def train(args: argparse.Namespace, config: Config, world: distributed.World, stop: lifecycle.StopRequest) -> None:
    unet = config.train_unet_number
    default_ds = "ds_configs/zero2_bf16.json" if world.device.type == "cuda" else "ds_configs/cpu_zero2.json"
    ds_config = build_ds_config(find_config_file(args.deepspeed_config or default_ds, "DeepSpeed config"), config,
                                world.size)
    zero, accum = zero_stage(ds_config), config.gradient_accumulation_steps
    global_batch = config.batch_size * accum * world.size
    steps = total_steps(config, global_batch)
    data = Data(config, unet, world.rank, world.size)
    check_shard_size(config, unet)
    root = checkpoint.unet_dir(config.checkpoint_dir, unet)
    ensure_writable({"checkpoint_dir": root, "output_dir": Path(config.output_dir), "log_dir": Path(config.log_dir)})
    resume = checkpoint.plan_resume(root, args.resume, world, ds_config)
    model, engine, scheduler, ema = ds_engine.build(config, ds_config)
    loaded_s = ds_engine.load(engine, ema, resume.load_from) if resume.load_from else None

    log = RunLogger(config, steps, resume.step) if world.is_main else NullLogger()
    run = Run(config, world, engine, ema, log, root, zero, data,
              Previewer(config, data, world.device, precision(ds_config)) if world.is_main else None)
    log.message(f"unet{unet}: {parameter_count(model, compat.full_numel) / 1e6:.2f}M parameters, ZeRO-{zero}, {precision(ds_config)}, "
                f"{world.size} rank(s) x micro-batch {config.batch_size} x accumulation {accum} = {global_batch} "
                f"per step; steps {resume.step} -> {steps}; {resume.describe()}"
                + (f" (loaded in {loaded_s:.1f} s)" if loaded_s is not None else ""))
    for note in resume.notes:
        log.message(note)
    loader = data.train(config.batch_size, accum, resume.step)
    watchdog = lifecycle.Watchdog(config.dist_timeout_s, world.rank, world.size, world.peers)
    try:
        batches, stand_in = iter(loader), None

        def micro_batches():
            nonlocal stand_in
            for _ in range(accum):
                batch = to_device(next(batches), world.device)
                stand_in = stand_in or batch  # what validation runs on a rank that ran out of batches
                yield batch

        schedule = Schedule.of(config, steps)
        window = StepWindow(config.max_bad_steps, world.device)  # the most steps between two syncs
        window.first = step = resume.step
        last_saved = step if resume.checkpoint else None
        bad_run = skipped_run = 0  # bad steps in a row: exact at each sync; DeepSpeed's skips, known at once
        log_losses: list[float] = []
        while step < steps:
            watchdog.kick()
            lr = scheduler.get_last_lr()[0]  # the rate this step applies
            try:
                loss_sum, applied = ds_engine.train_step(
                    engine, ema, micro_batches(), step,
                    seed_of=lambda micro: seed_for(config.seed, "train", (step * accum + micro) * world.size + world.rank))
            except ds_engine.LossScaleExhausted:
                save(run, step)
                raise UserError(f"stopping at step {step + 1}: fp16 overflowed at DeepSpeed's minimum loss scale "
                                f"({compat.loss_scale(engine):g}); the weights of step {step} are saved in {root}. "
                                "Lower learning_rate, keep max_grad_norm > 0, train in bf16, or check the data") from None
            window.record(loss_sum / accum, applied)
            skipped_run = 0 if applied else skipped_run + 1
            step += 1
            if not (schedule.sync(step) or skipped_run >= config.max_bad_steps):
                continue
            due = schedule.due(step)

            # Sync point: the window's losses and verdicts reach the host; stop requests are agreed on.
            stopping = stop.agreed(world.device)
            for s, loss_value, finite, was_applied in window.sync(world.size):
                if finite and was_applied:
                    bad_run = 0
                    log_losses.append(loss_value)
                    continue
                bad_run += 1
                log.message(f"step {s}: skipped ({'loss' if not finite else 'gradients'} not finite); weights and "
                            f"EMA unchanged ({bad_run} such step(s) in a row)")
                if bad_run >= config.max_bad_steps:
                    save(run, step)
                    raise UserError(f"stopping: {bad_run} steps in a row had a non-finite loss or gradients (steps "
                                    f"{s - bad_run + 1}-{s}); the weights of step {step} are saved in {root}. Lower "
                                    "learning_rate, keep max_grad_norm > 0, or check the data")
            skipped_run = bad_run
            if "log" in due:
                mean = sum(log_losses) / len(log_losses) if log_losses else math.nan
                scale = compat.loss_scale(engine) if engine.fp16_enabled() else None
                log.step(step, mean, lr, engine.get_global_grad_norm(), scale, global_batch)
                if model.compile_mode is not None:  # rank 0's count; growing in steady state means recompiles
                    log.scalars(step, {"compile/graphs": compiled_graphs()})
                if trouble := store_trouble(loader.skipped()):  # rank 0's loader: retries, shards given up on
                    log.scalars(step, trouble)
                log_losses = []
            # The checkpoint first: what comes after it at this step (validation, a preview) can fail for
            # reasons of its own, and must not cost the step's weights.
            if "checkpoint" in due or stopping:
                watchdog.kick()
                save(run, step)
                last_saved = step
            if "validate" in due:
                watchdog.kick()
                validate(run, step, stand_in, stop)
                # A signal that came during validation (which it cut short) is agreed on now, not a window later.
                stopping = stopping or stop.agreed(world.device)
            if "preview" in due and not stopping:
                watchdog.kick()
                preview(run, step)
            if stopping:
                if last_saved != step:
                    watchdog.kick()
                    save(run, step)
                    last_saved = step
                log.message(f"stop requested: saved at step {step}, exiting")
                break

        skipped = [None] * world.size
        dist.all_gather_object(skipped, dict(loader.skipped()))
        total = {}
        for counts in skipped:
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
        retried = {r: n for r, n in total.items() if r.startswith(RETRIED)}
        skipped = {r: n for r, n in total.items() if r not in retried}
        log.message(f"data: {sum(skipped.values())} sample(s) skipped"
                    + "".join(f"\n  {n} x {r}" for r, n in skipped.items())
                    + (f"; {sum(retried.values())} shard read(s) retried" if retried else "")
                    + "".join(f"\n  {n} x {r}" for r, n in retried.items()))
        log.message(f"done: unet{unet} at step {step}, last checkpoint at step {last_saved} in {root}")
    finally:
        loader.close()
        log.close()
        watchdog.close()


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    config = config_from_args(args)
    lifecycle.reap_children_at_exit()
    stop = lifecycle.StopRequest(already=bool(_signalled))
    world = distributed.setup(config.dist_timeout_s)
    try:
        # Rank 0 holds the UNet's checkpoint folder for the run; its refusal ends every rank (lifecycle.fail).
        lock = (RunLock(checkpoint.unet_dir(config.checkpoint_dir, config.train_unet_number))
                if world.is_main else contextlib.nullcontext())
        with lock:
            train(args, config, world, stop)
    except UserError as err:
        lifecycle.fail(str(err), world.rank, world.size)
    except RuntimeError as err:
        if not lifecycle.lost_peer(err):
            raise
        lifecycle.peer_died(err, world.rank, world.peers)
    distributed.teardown()


if __name__ == "__main__":
    main()
