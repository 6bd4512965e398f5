"""Train one UNet of the TryOnDiffusion cascade with DeepSpeed.

    deepspeed tryon_ds/train.py --deepspeed_config ds_configs/zero2_bf16.json --config config.json --train_unet 1
    deepspeed --num_gpus 2 tryon_ds/train.py --deepspeed_config ds_configs/cpu_zero2.json --config configs/tiny.yaml
    torchrun --nproc_per_node 8 tryon_ds/train.py ...      srun python tryon_ds/train.py ...      python tryon_ds/train.py ...

Each optimizer step: for every micro-batch, the stage's diffusion loss (random timestep, noise, and
classifier-free conditioning dropout; the SR stage also noise-augments its low-res input), backward, and
DeepSpeed's step, which applies AdamW with clipping at the accumulation boundary; then the EMA. Every
``validation_freq`` steps the validation loss, every ``sample_freq`` a sample grid from the EMA weights,
every ``checkpoint_freq`` a checkpoint. SIGTERM or SIGUSR1 finishes the step, saves and exits 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script: import the package, never this folder's modules by their bare names.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch.distributed as dist

from tryon_ds.config import Config, UserError, add_config_args, config_from_args, exit_on_user_error
from tryon_ds.data.pipeline import TrainLoader, shard_urls, val_loader
from tryon_ds.data.shards import read_manifest
from tryon_ds.model import COND_KEYS, parameter_count
from tryon_ds.seeding import seed_for
from tryon_ds.stage import CascadeStage
from tryon_ds.training import checkpoint, distributed
from tryon_ds.training.ds_config import build_ds_config, precision, zero_stage
from tryon_ds.training.ema import EMA
from tryon_ds.training.logger import NullLogger, RunLogger, image_grid

# DeepSpeed's ZeRO calls a torch collective that torch 2.13 marks deprecated, once per rank and step.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor. is deprecated", category=FutureWarning)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--deepspeed_config", help="DeepSpeed JSON (ds_configs/); default: zero2_bf16 on GPU, "
                                              "cpu_zero2 on CPU")
    p.add_argument("--resume", default="none", help="none, auto (the newest complete checkpoint) or a folder")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def lr_factor(config: Config):
    """Linear warm-up to the learning rate, then cosine decay to min_lr_ratio of it."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.cosine_decay_max_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


@torch.no_grad()
def validation_loss(engine, config: Config, stage: int, world, fallback: dict) -> float | None:
    """Mean loss over the whole validation set, each sample seen once across ranks. Ranks may hold
    different numbers of batches; every rank runs the same number of forwards (ZeRO-3 gathers parameters
    collectively), the extra ones on a stand-in batch with weight zero."""
    engine.eval()
    batches = iter(val_loader(config, stage, world.rank, world.size, config.batch_size))
    total = torch.zeros(2, device=world.device)
    index = 0
    while True:
        batch = next(batches, None)
        more = torch.tensor([0.0 if batch is None else 1.0], device=world.device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if more.item() == 0:
            break
        real = batch is not None
        batch = to_device(batch if real else fallback, world.device)
        torch.manual_seed(seed_for(config.seed, "val", world.rank, index))
        loss = engine(batch).float()
        n = len(batch["key"]) if real else 0
        total += torch.stack([loss * n, torch.tensor(float(n), device=world.device)])
        index += 1
    dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1]).item() if total[1] > 0 else None


def full_weights(engine, ema: EMA | None) -> dict:
    """The whole model's weights on every rank: the EMA if kept, else the raw ones. Collective."""
    if ema is not None:
        return ema.full_state_dict()
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


def sample_grid(weights: dict, config: Config, stage: int, batch: dict, device):
    model = CascadeStage(config, stage).to(device).eval()
    model.load_state_dict(weights)
    n = min(config.logging.sample_count, len(batch["key"]))
    cond = {k: batch[k][:n].to(device) for k in COND_KEYS}
    lowres = batch["lowres"][:n].to(device) if stage == 2 else None
    out = model.sample(cond, lowres=lowres, generator=torch.Generator(device).manual_seed(config.seed))
    return image_grid([cond["ca"], cond["garment"], out, batch["person"][:n].to(device)])


def build_engine(config: Config, stage: int, ds_config: dict, load_from: Path | None = None):
    """The stage's model in a DeepSpeed engine with AdamW and the LR schedule, its EMA, and the state of
    ``load_from`` if given. Returns (model, engine, scheduler, ema)."""
    import deepspeed

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    # Under ZeRO-3 each layer is partitioned as soon as it is built, so no rank ever holds the whole model
    # (the sr preset is 3.9 GB in fp32).
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_stage(ds_config) == 3):
        model = CascadeStage(config, stage)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(config)))
    ema = EMA(engine.module, config.ema_decay) if config.use_ema else None
    if load_from is not None:
        loaded, _ = engine.load_checkpoint(str(load_from.parent), tag=load_from.name)
        if loaded is None:
            raise UserError(f"DeepSpeed could not load the checkpoint {load_from}")
        checkpoint.load_ema(load_from, ema)
    return model, engine, scheduler, ema


class Watchdog:
    """Ends this rank when the loop makes no progress for ``timeout`` seconds. A peer that died or hangs can
    leave a collective waiting forever (DeepSpeed's shared-memory collectives on CPU have no timeout);
    exiting lets the launcher (or srun --kill-on-bad-exit) stop the job with a non-zero status."""

    def __init__(self, timeout: float, rank: int):
        self.timeout, self.rank, self.last = timeout, rank, time.monotonic()
        threading.Thread(target=self._watch, daemon=True).start()

    def kick(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while True:
            time.sleep(min(5.0, self.timeout / 4))
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                print(f"error: rank {self.rank}: no training progress for {idle:.0f} s (dist_timeout_s="
                      f"{self.timeout:g}); another rank died or hangs. Exiting.", file=sys.stderr, flush=True)
                os._exit(3)


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM's warning before a time limit or preemption): stop after this step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    config = config_from_args(args)
    stage = config.train_unet_number
    stop = StopRequest()
    world = distributed.setup(config.dist_timeout_s)
    ds_path = args.deepspeed_config or f"ds_configs/{'zero2_bf16' if world.device.type == 'cuda' else 'cpu_zero2'}.json"
    ds_config = build_ds_config(ds_path, config, world.size)
    zero = zero_stage(ds_config)
    accum = config.gradient_accumulation_steps
    global_batch = config.batch_size * accum * world.size
    steps = total_steps(config, global_batch)
    shard_urls(config, "train")  # a missing data path is an error now, not in a loader worker later

    root = checkpoint.stage_dir(config.checkpoint_dir, stage)
    ensure_writable({"checkpoint_dir": root, "output_dir": Path(config.output_dir), "log_dir": Path(config.log_dir)})
    resume = checkpoint.find_resume(root, args.resume)
    start_step, load_from = 0, resume
    if resume is not None:
        state = checkpoint.read_state(resume)
        start_step = state["step"]
        if state["world_size"] != world.size:
            if world.is_main:
                checkpoint.convert_to_universal(resume, state["zero_stage"])
            dist.barrier()
            load_from = checkpoint.universal_path(resume)
            ds_config["checkpoint"] = {"load_universal": True}

    model, engine, scheduler, ema = build_engine(config, stage, ds_config, load_from)

    log = RunLogger(config, stage, steps, start_step, f"unet{stage}") if world.is_main else NullLogger()
    log.message(f"unet{stage}: {parameter_count(model) / 1e6:.2f}M parameters, ZeRO-{zero}, "
                f"{precision(ds_config)}, {world.size} rank(s) x micro-batch {config.batch_size} x accumulation "
                f"{accum} = {global_batch} per step; steps {start_step} -> {steps}"
                + (f"; resumed from {resume}" + (" (universal)" if load_from != resume else "") if resume else ""))
    metrics = Path(config.output_dir) / f"metrics_unet{stage}.jsonl"
    if world.is_main:
        metrics.parent.mkdir(parents=True, exist_ok=True)

    def save_checkpoint(at: int) -> None:
        state = {"step": at, "world_size": world.size, "zero_stage": zero, "stage": stage,
                 "data_position": {"micro_batches_per_rank": at * accum, "streams": config.data.streams},
                 "rng": {"seed": config.seed, "scheme": "per micro-batch slot: seed_for(seed, 'train', slot)"},
                 "config": config.to_dict()}
        try:
            ckpt = checkpoint.save(engine, ema, root, at, state, config.logging.keep_checkpoints, world.is_main)
        except checkpoint.CheckpointWriteError as err:
            kept = [p.name for p in checkpoint.complete_checkpoints(root)]
            raise UserError(f"could not write the step-{at} checkpoint under {root} ({err}); "
                            f"the earlier checkpoints are intact: {', '.join(kept) or 'none'}") from None
        log.message(f"step {at}: checkpoint {ckpt}")

    loader = TrainLoader(config, stage, world.rank, config.batch_size, world.size, accum, start_step)
    batches = iter(loader)
    watchdog = Watchdog(config.dist_timeout_s, world.rank)
    grid_batch = None
    step, bad_steps = start_step, 0
    last_saved = start_step if resume is not None else None
    while step < steps:
        watchdog.kick()
        lr = scheduler.get_last_lr()[0]  # the rate this step applies
        loss_sum = torch.zeros((), device=world.device)
        for micro in range(accum):
            batch = to_device(next(batches), world.device)
            torch.manual_seed(seed_for(config.seed, "train", (step * accum + micro) * world.size + world.rank))
            loss = engine(batch)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
        # DeepSpeed discards a step whose gradients are not finite (and lowers the fp16 loss scale); a
        # non-finite loss or a discarded step must reach neither the weights nor the EMA.
        loss_value = mean_over_ranks(loss_sum / accum)
        good = engine.was_step_applied() and math.isfinite(loss_value)
        if good:
            bad_steps = 0
            if ema is not None:
                ema.update(step)
        else:
            bad_steps += 1
            log.message(f"step {step + 1}: skipped ({'loss' if not math.isfinite(loss_value) else 'gradients'} not "
                        f"finite); weights and EMA unchanged ({bad_steps} such step(s) in a row)")
        step += 1
        grid_batch = grid_batch or {k: v for k, v in batch.items()}

        if bad_steps >= config.max_bad_steps:
            save_checkpoint(step)
            raise UserError(f"stopping: {bad_steps} steps in a row had a non-finite loss or gradients (up to step "
                            f"{step}); the weights are those of step {step - bad_steps}, saved in {root}. Lower "
                            "learning_rate, keep max_grad_norm > 0, or check the data")
        if step % config.log_freq == 0 or step == steps:
            grad_norm = engine.get_global_grad_norm()
            scale = engine.optimizer.loss_scale_config.cur_scale if engine.fp16_enabled() else None
            log.step(step, loss_value, lr, grad_norm, scale, global_batch)
            if world.is_main:
                with open(metrics, "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss_value, "lr": lr}) + "\n")
        if step % config.validation_freq == 0 or step == steps:
            watchdog.kick()
            val = validation_loss(engine, config, stage, world, grid_batch)
            if val is not None:
                log.scalars(step, {"val/loss": val})
                log.message(f"step {step}: validation loss {val:.4f}")
        if step % config.sample_freq == 0 or step == steps:
            watchdog.kick()
            weights = full_weights(engine, ema)
            if world.is_main:
                path = log.images(step, sample_grid(weights, config, stage, grid_batch, world.device))
                log.message(f"step {step}: samples (ca | garment | {'EMA ' if ema else ''}sample | target) in {path}")
        stopping = stop.agreed(world.device)
        if step % config.checkpoint_freq == 0 or step == steps or stopping:
            watchdog.kick()
            save_checkpoint(step)
            last_saved = step
        if stopping:
            log.message(f"stop requested: saved at step {step}, exiting")
            break

    skipped = [None] * world.size
    dist.all_gather_object(skipped, dict(loader.skipped()))
    if world.is_main:
        total = {}
        for counts in skipped:
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
        log.message(f"data: {sum(total.values())} sample(s) skipped" + "".join(f"\n  {n} x {r}" for r, n in total.items()))
        log.message(f"done: unet{stage} at step {step}, last checkpoint at step {last_saved} in {root}")
    log.close()
    dist.barrier()


if __name__ == "__main__":
    main()
