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
import os
import signal
import sys
import time
import warnings
from collections import Counter
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

import torch.distributed as dist

from tryon_ds import compat
from tryon_ds.cli import exit_on_user_error
from tryon_ds.config import Config, add_config_args, config_from_args, find_config_file
from tryon_ds.data.pipeline import Data, skip_report, store_trouble
from tryon_ds.data.preprocess import to_device
from tryon_ds.data.shards import check_shard_size
from tryon_ds.errors import UserError
from tryon_ds.metrics import WEIGHT_FILES, weight_path
from tryon_ds.model import compiled_graphs, parameter_count
from tryon_ds.perf import Throughput, cached_step_flops, device_peak
from tryon_ds.seeding import seed_for
from tryon_ds.training import checkpoint, distributed, engine as ds_engine, lifecycle
from tryon_ds.training.ds_config import build_ds_config, precision, zero_stage
from tryon_ds.training.ema import EMA
from tryon_ds.training.guard import NonFiniteGuard, NonFiniteRun
from tryon_ds.training.logger import NullLogger, RunLogger
from tryon_ds.training.previews import Previewer
from tryon_ds.training.quality import QualityPass
from tryon_ds.training.run_lock import RunLock
from tryon_ds.training.schedule import Schedule, total_steps
from tryon_ds.training.validation import validation_loss

# DeepSpeed's ZeRO calls a torch collective that torch 2.13 marks deprecated, once per rank and step.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor. is deprecated", category=FutureWarning)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--deepspeed_config", help="DeepSpeed JSON (ds_configs/ is found from any folder); default: "
                                              "ds_configs/zero2_bf16.json on GPU, ds_configs/cpu_zero2.json on CPU")
    p.add_argument("--resume", default="none", help="none, auto (the newest complete checkpoint) or a folder")
    p.add_argument("--peak-tflops", "--peak_tflops", dest="peak_tflops", type=float, metavar="TFLOPS",
                   help="the device's dense peak at the run's precision, for perf/mfu (default: the datasheet's "
                        "for known GPUs, tryon_ds/perf.py; a CPU's fp32 matmul throughput, measured)")
    for spec in WEIGHT_FILES.values():
        p.add_argument(spec.flag, help=f"{spec.name}, for the quality pass's {spec.metrics} (or {spec.env})")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


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
    """What the loop and its actions share, built once at start-up (``start``)."""
    config: Config
    world: distributed.World
    model: Any  # the UNet DeepSpeed wraps
    engine: Any
    scheduler: Any
    ema: EMA | None
    log: RunLogger | NullLogger
    root: Path  # this UNet's checkpoint folder
    zero: int
    accumulation: int
    global_batch: int
    steps: int  # the last step
    resume: checkpoint.Resume
    data: Data
    loader: Any  # this rank's training micro-batches
    previewer: Previewer | None  # rank 0 only
    watchdog: lifecycle.Watchdog
    last_saved: int | None = None
    quality: QualityPass | None = None  # every rank, where quality_freq is set
    best: dict | None = None  # the best checkpoint's record (checkpoint.read_best), on every rank

    def close(self) -> None:
        self.loader.close()
        self.log.close()
        self.watchdog.close()


def start(args: argparse.Namespace, config: Config, world: distributed.World) -> Run:
    """Everything a run needs, checked before the first step: the DeepSpeed config reconciled with the
    training config, the data, writable folders, the checkpoint to resume from, the engine and the logger."""
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

    throughput = None
    if world.is_main:
        peak, source = device_peak(world.device, precision(ds_config), args.peak_tflops)
        throughput = Throughput(cached_step_flops(config, unet), world.size, peak)
    log = RunLogger(config, steps, resume.step, throughput) if world.is_main else NullLogger()
    log.message(f"unet{unet}: {parameter_count(model, compat.full_numel) / 1e6:.2f}M parameters, ZeRO-{zero}, "
                f"{precision(ds_config)}, {world.size} rank(s) x micro-batch {config.batch_size} x accumulation "
                f"{accum} = {global_batch} per step; steps {resume.step} -> {steps}; {resume.describe()}"
                + (f" (loaded in {loaded_s:.1f} s)" if loaded_s is not None else ""))
    if throughput is not None:
        log.message(f"{throughput.flops_per_sample / 1e9:,.1f} GFLOP per training sample; peak per rank "
                    + (f"{throughput.peak / 1e12:,.3g} TFLOP/s ({source})" if throughput.peak else
                       f"unknown ({source}): give --peak-tflops for perf/mfu"))
    for note in resume.notes:
        log.message(note)
    quality = None
    if config.quality_freq:
        weights = {kind: weight_path(kind, getattr(args, spec.flag.lstrip("-"))) for kind, spec in WEIGHT_FILES.items()}
        quality = QualityPass(config, data, world, precision(ds_config), weights)
        for note in quality.notes:
            log.message(f"quality pass: {note}")
    best = known_best(root, config, resume, log, world)
    return Run(config, world, model, engine, scheduler, ema, log, root, zero, accum, global_batch, steps, resume,
               data, data.train(config.batch_size, accum, resume.step),
               Previewer(config, data, world.device, precision(ds_config)) if world.is_main else None,
               lifecycle.Watchdog(config.dist_timeout_s, world.rank, world.size, world.peers),
               resume.step if resume.checkpoint else None, quality, best)


def known_best(root: Path, config: Config, resume: checkpoint.Resume, log, world) -> dict | None:
    """The best checkpoint a resumed run goes on from (its BEST.json), if it is still there, complete, and
    chosen by the metric this run chooses by. A fresh run measures its own: an earlier run's record is set
    aside (its checkpoint stays until retention removes it)."""
    if resume.checkpoint is None:
        if world.is_main and (record := checkpoint.read_best(root)) is not None:
            os.replace(root / checkpoint.BEST, root / f"{checkpoint.BEST}.earlier")
            log.message(f"an earlier run's best (step {record['step']}, {record['metric']} {record['value']:.4g}) is "
                        f"set aside as {checkpoint.BEST}.earlier: this fresh run keeps its own")
        return None
    record, rule = checkpoint.read_best(root), config.best()
    if record is None or rule is None:
        return None
    if (record["metric"], record["mode"]) != rule:
        log.message(f"{checkpoint.BEST} chose by {record['metric']} ({record['mode']}); this run chooses by {rule[0]} "
                    f"({rule[1]}): the best is chosen anew")
        return None
    if not (root / record["checkpoint"] / "COMPLETE").is_file():
        log.message(f"{checkpoint.BEST} names {record['checkpoint']}, which is gone: the best is chosen anew")
        return None
    log.message(f"best so far: step {record['step']}, {record['metric']} {record['value']:.4g} "
                f"({record['checkpoint']})")
    return record


def train(args: argparse.Namespace, config: Config, world: distributed.World, stop: lifecycle.StopRequest) -> None:
    run = start(args, config, world)
    try:
        step = loop(run, stop)
        run.log.message(data_report(run))
        run.log.message(f"done: unet{config.train_unet_number} at step {step}, last checkpoint at step "
                        f"{run.last_saved} in {run.root}")
    finally:
        run.close()


def loop(run: Run, stop: lifecycle.StopRequest) -> int:
    """Steps until the last one or an agreed stop, each followed by the actions due after it; returns the
    last step done."""
    config, world, engine, log = run.config, run.world, run.engine, run.log
    batches, schedule = iter(run.loader), Schedule.of(config, run.steps)
    guard = NonFiniteGuard(config.max_bad_steps, world.device, run.resume.step)
    step, losses = run.resume.step, []
    while step < run.steps:
        run.watchdog.kick()
        lr = run.scheduler.get_last_lr()[0]  # the rate this step applies
        micro_batches = (to_device(next(batches), world.device) for _ in range(run.accumulation))
        try:
            loss_sum, applied = ds_engine.train_step(engine, run.ema, micro_batches, step, seed_of=lambda micro: seed_for(
                config.seed, "train", (step * run.accumulation + micro) * world.size + world.rank))
        except ds_engine.LossScaleExhausted:
            stop_saving(run, step, f"fp16 overflowed at DeepSpeed's minimum loss scale ({compat.loss_scale(engine):g})",
                        "keep max_grad_norm > 0, train in bf16")
        guard.record(loss_sum / run.accumulation, applied)
        step += 1
        if not (schedule.sync(step) or guard.must_sync):
            continue

        # Sync point: the steps' losses and verdicts reach the host; stop requests are agreed on.
        stopping = stop.agreed(world.device)
        try:
            losses += guard.settle(world.size, log)
        except NonFiniteRun as err:
            stop_saving(run, step, str(err), "keep max_grad_norm > 0")
        due = schedule.due(step)
        if "log" in due:
            log_step(run, step, losses, lr)
            losses = []
        # The checkpoint first: what comes after it at this step (validation, a preview) can fail for reasons
        # of its own, and must not cost the step's weights.
        if "checkpoint" in due or stopping:
            save(run, step)
        if "validate" in due:
            value = validate(run, step, stop)
            # A signal that came during validation (which it cut short) is agreed on now, not a window later.
            stopping = stopping or stop.agreed(world.device)
            consider_best(run, step, {"val/loss": value} if value is not None and not stopping else None)
        if "quality" in due and not stopping:
            consider_best(run, step, quality(run, step))
        if "preview" in due and not stopping:
            preview(run, step)
        if stopping:
            if run.last_saved != step:
                save(run, step)
            log.message(f"stop requested: saved at step {step}, exiting")
            break
    return step


def log_step(run: Run, step: int, losses: list[float], lr: float) -> None:
    """The mean loss of the good steps since the last log, the rate, the norm and the loader's troubles."""
    engine = run.engine
    scale = compat.loss_scale(engine) if engine.fp16_enabled() else None
    run.log.step(step, sum(losses) / len(losses) if losses else math.nan, lr, engine.get_global_grad_norm(), scale,
                 run.global_batch)
    if run.model.compile_mode is not None:  # rank 0's count; growing in steady state means recompiles
        run.log.scalars(step, {"compile/graphs": compiled_graphs()})
    if trouble := store_trouble(run.loader.skipped()):  # rank 0's loader: retries, shards given up on
        run.log.scalars(step, trouble)


def validate(run: Run, step: int, stop: lifecycle.StopRequest) -> float | None:
    run.watchdog.kick()
    value = validation_loss(run.engine, run.data, run.config.batch_size, run.config.seed, run.world, stop)
    if stop.requested:
        run.log.message(f"step {step}: validation cut short by the stop request")
        return None
    if value is not None:
        run.log.scalars(step, {"val/loss": value})
        run.log.message(f"step {step}: validation loss {value:.4f}")
    return value


def quality(run: Run, step: int) -> dict | None:
    """A quality pass (training/quality.py) from the EMA weights (the raw ones without an EMA), brought to
    every rank; its figures and grid logged by rank 0, which returns the figures."""
    def gather(into):  # a collective: every rank takes part, and every rank receives the weights
        if run.ema is not None:
            run.ema.full_state_dict(into=into, everywhere=True)
        else:
            ds_engine.raw_state_dict(run.engine, run.world.is_main, into=into, everywhere=True)

    run.watchdog.kick()
    figures, grid = run.quality.run(gather)
    if figures is not None:
        run.log.scalars(step, figures)
        path = run.log.images(step, grid, "held-out samples: conditioning | sample | target", kind="quality")
        shown = ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in figures.items() if k != "quality/seconds")
        run.log.message(f"step {step}: quality of {run.quality.measured} held-out samples "
                        f"({'EMA' if run.ema else 'raw'} weights): {shown} "
                        f"({figures['quality/seconds']:.1f} s; {path})")
    return figures


def consider_best(run: Run, step: int, figures: dict | None) -> None:
    """Whether ``step`` is the best so far by the run's best_metric (rank 0 decides: it holds the figures;
    a collective). A new best gets its checkpoint (saved now if this step has none) recorded in BEST.json, and
    the best it replaces goes unless retention keeps it anyway."""
    rule, verdict = run.config.best(), [None]
    if rule is None:  # the run measures nothing to choose by (every rank's config says so)
        return
    if run.world.is_main and figures and math.isfinite(figures.get(rule[0], math.nan)):
        value, best = figures[rule[0]], run.best
        if best is None or (value > best["value"] if rule[1] == "max" else value < best["value"]):
            verdict[0] = value
    if run.world.size > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is None:
        return
    if run.last_saved != step:
        save(run, step)
    before, run.best = run.best, {"checkpoint": f"step{step:08d}", "step": step, "metric": rule[0], "mode": rule[1],
                                  "value": verdict[0]}
    if run.world.is_main:
        checkpoint.write_best(run.root, run.best)
        checkpoint.prune(run.root, run.config.logging.keep_checkpoints, protect=run.best["checkpoint"])
        was = f"; was {before['value']:.4g} at step {before['step']}" if before else ""
        run.log.message(f"step {step}: the best so far by {rule[0]} ({verdict[0]:.4g}{was}), kept as "
                        f"{run.best['checkpoint']}")


def preview(run: Run, step: int) -> None:
    """A sample grid from the EMA weights (the raw ones without an EMA), gathered to and drawn on rank 0."""
    def gather(into=None):  # a collective: every rank takes part, rank 0 from inside its preview
        if run.ema is not None:
            run.ema.full_state_dict(into=into)
        else:
            ds_engine.raw_state_dict(run.engine, run.world.is_main, into=into)

    run.watchdog.kick()
    if not run.world.is_main:
        gather()
    else:
        path = run.log.images(step, run.previewer.render(gather), run.previewer.columns())
        columns = run.previewer.columns().replace("sample", "EMA sample" if run.ema else "sample")
        run.log.message(f"step {step}: samples ({columns}) in {path} "
                        f"({run.previewer.seconds:.1f} s, {run.config.logging.preview_steps} DDIM steps)")


def save(run: Run, step: int) -> None:
    run.watchdog.kick()
    state = checkpoint.trainer_state(step, run.config, run.world.size, run.zero)
    start_s = time.perf_counter()
    try:
        ckpt = checkpoint.save(run.engine, run.ema, run.root, step, state, run.config.logging.keep_checkpoints,
                               run.world.is_main, protect=run.best["checkpoint"] if run.best else None)
    except checkpoint.CheckpointWriteError as err:
        kept = [p.name for p in checkpoint.complete_checkpoints(run.root)]
        raise UserError(f"could not write the step-{step} checkpoint under {run.root} ({err}); "
                        f"the earlier checkpoints are intact: {', '.join(kept) or 'none'}") from None
    run.last_saved = step
    run.log.message(f"step {step}: checkpoint {ckpt} ({time.perf_counter() - start_s:.1f} s)")


def stop_saving(run: Run, step: int, why: str, remedy: str) -> None:
    """Save the weights of ``step`` (the last good one) and end the run with ``why``: the training diverged."""
    save(run, step)
    raise UserError(f"stopping after step {step}: {why}; the weights of step {step} are saved in {run.root}. "
                    f"Lower learning_rate, {remedy}, or check the data") from None


def data_report(run: Run) -> str:
    """Samples skipped and shard reads retried over every rank's loader. A collective."""
    counts = [None] * run.world.size
    dist.all_gather_object(counts, dict(run.loader.skipped()))
    return skip_report(sum(map(Counter, counts), Counter()))


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


def cli() -> None:
    """``python tryon_ds/train.py`` and ``tryon-train``: the run, then an exit that skips the interpreter's
    module teardown (seconds a rank, compat.exit_without_teardown); ``main`` returns, for callers in-process."""
    main()
    compat.exit_without_teardown(0)


if __name__ == "__main__":
    cli()
