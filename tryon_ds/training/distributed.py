"""Process-group setup for every way the trainer is started.

- ``deepspeed`` / ``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT are set by the launcher.
- ``srun`` (one task per GPU): rank, world and local rank come from SLURM_PROCID, SLURM_NTASKS and
  SLURM_LOCALID; MASTER_ADDR/PORT from the job (the sbatch scripts export them).
- a plain ``python tryon_ds/train.py``: a world of one on 127.0.0.1 and a free port.
NCCL on CUDA, gloo otherwise. A rank's GPU is ``local_rank % device_count()``: with one task per GPU and
SLURM binding each task to its own GPU (``--gpus-per-task``), every task sees a single device 0.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed

from ..compat import skip_shared_memory_allreduce


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device
    peers: tuple[tuple[str, int], ...] = ()  # each rank's (host, pid): who a failed collective lost

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(timeout_s: float = 1800) -> World:
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(env.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank % torch.cuda.device_count()), "nccl"
        torch.cuda.set_device(device)
        # TF32 matmuls and convolutions (Ampere and later) and cuDNN's autotuner: the UNets' shapes are fixed.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        device, backend = torch.device("cpu"), "gloo"
        if "OMP_NUM_THREADS" not in env:
            # Ranks on one machine share its cores; oversubscribed threads were 1.12x slower (BENCHMARKS.md).
            local = int(env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE") or env["WORLD_SIZE"])
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    import deepspeed

    skip_shared_memory_allreduce()
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    peers = [None] * int(env["WORLD_SIZE"])
    torch.distributed.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    world = World(int(env["RANK"]), int(env["WORLD_SIZE"]), local_rank, device, tuple(map(tuple, peers)))
    return world


def teardown() -> None:
    """End the process group once every rank is done with it (after a successful run only: a rank that
    failed must not wait for the others). A process that exits with the group alive can die by SIGABRT
    ("terminate called without an active exception") from gloo's threads after its work is done."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
