"""How a training run ends, whatever ends it, within a bounded time and with no process left behind.

- ``StopRequest``: SIGTERM / SIGUSR1 (SLURM's warning before a time limit or preemption) ask the loop to
  finish its step, save and exit 0.
- ``Watchdog``: a rank whose loop makes no progress for ``dist_timeout_s`` (a peer died or hangs inside a
  collective that has no timeout) exits non-zero; it also notices a user error another rank announced.
- ``fail``: a user error in a multi-rank run is printed once, by the first rank that meets it, on a line of
  its own, and every rank exits with status 2: the error is posted in the process group's key-value store,
  where the other ranks' watchdogs find it even while they wait inside a collective.
- ``reap_children_at_exit``: data-loader workers ignore SIGTERM (the launcher signals the whole process
  tree, and a worker dying mid-batch would fail the step), so a path that forgets to shut them down would
  hang the exit joining them; at exit, any still alive after a grace period are killed.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

ERROR_KEY, ACK_KEY = "tryon_ds/user_error", "tryon_ds/user_error_seen"
WORKER_GRACE_S = 10.0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, already: bool = False):
        self.requested = already
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, device) -> bool:
        """Whether any rank was asked to stop (collective, so all ranks stop at the same step)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


def _store():
    try:
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except Exception:  # a process group without a store (none in the launchers we support)
        return None


class Watchdog:
    """``close()`` it before the process exits: its thread must end before the interpreter does. A daemon
    thread caught inside a store call (C++, GIL released) at interpreter exit is ended by pthread_exit as it
    takes the GIL back, and that unwinds through pybind11's noexcept frames: SIGABRT, "terminate called
    without an active exception", after the run's work is done (seen in CI on a rank whose exit was slow,
    after a compiled run)."""

    def __init__(self, timeout: float, rank: int, world_size: int):
        self.timeout, self.rank, self.world_size = timeout, rank, world_size
        self.last = time.monotonic()
        self.store = _store() if world_size > 1 else None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="tryon-watchdog")
        self._thread.start()

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=30)  # one store call at most; a store whose host is gone fails fast

    def kick(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout / 4)):
            if self.store is not None and _announced(self.store):
                _acknowledge(self.store, self.rank, self.world_size)
                os._exit(2)  # another rank printed the error; this one may be stuck in a collective
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                sys.stderr.write(f"error: rank {self.rank}: no training progress for {idle:.0f} s (dist_timeout_s="
                                 f"{self.timeout:g}); another rank died or hangs. Exiting.\n")
                sys.stderr.flush()
                os._exit(3)


def _announced(store) -> bool:
    try:
        return store.check([ERROR_KEY])
    except Exception:  # the store's host (rank 0) is gone: the run is ending anyway
        return False


def _acknowledge(store, rank: int, world_size: int) -> None:
    """Say this rank has read the error; rank 0, whose process hosts the store, stays until all have."""
    try:
        store.add(ACK_KEY, 1)
        deadline = time.monotonic() + 15
        while rank == 0 and store.add(ACK_KEY, 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.1)
    except Exception:  # the store's host is gone: nobody is left to wait for
        pass


def fail(message: str, rank: int, world_size: int) -> None:
    """Print ``message`` once across the ranks and exit 2 on this rank; the other ranks exit 2 too."""
    store = _store() if world_size > 1 else None
    first = True  # without a store (or with its host gone) this rank cannot know: better twice than never
    if store is not None:
        try:
            mine = f"{rank}:{message}"  # ranks meeting the same error post different values: one wins
            first = store.compare_set(ERROR_KEY, "", mine).decode() == mine
        except Exception:
            pass
        _acknowledge(store, rank, world_size)
    if first:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    sys.stdout.flush()
    os._exit(2)


def reap_children_at_exit(grace_s: float = WORKER_GRACE_S) -> None:
    """Registered before the data loaders start, so it runs after their own exit handlers (atexit runs in
    reverse order): whatever child is still alive then gets ``grace_s`` more seconds, then SIGKILL."""
    def reap():
        deadline = time.monotonic() + grace_s
        for child in multiprocessing.active_children():
            child.join(max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
                child.join(1)
    atexit.register(reap)
