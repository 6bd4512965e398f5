"""How a training run ends, whatever ends it, within a bounded time and with no process left behind.

- ``StopRequest``: SIGTERM / SIGUSR1 (SLURM's warning before a time limit or preemption) ask the loop to
  finish its step, save and exit 0.
- ``Watchdog``: a rank whose loop makes no progress for ``dist_timeout_s`` (a peer died or hangs inside a
  collective that has no timeout) exits non-zero; it also notices a user error another rank announced.
- ``fail``: a user error in a multi-rank run is printed once, by the first rank that meets it, on a line of
  its own, and every rank exits with status 2: the error is posted in the process group's key-value store,
  where the other ranks' watchdogs find it even while they wait inside a collective.
- ``peer_died``: a collective that fails because a peer went away (killed for memory, crashed) ends this
  rank with one line naming the rank that died and how, as far as this machine can tell (``dead_peers``),
  not the backend's page of C++ frames; the last complete checkpoint stands.
- ``reap_children_at_exit``: data-loader workers ignore SIGTERM (the launcher signals the whole process
  tree, and a worker dying mid-batch would fail the step), so a path that forgets to shut them down would
  hang the exit joining them; at exit, any still alive after a grace period are killed.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..compat import default_store

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


class Watchdog:
    """``close()`` it before the process exits: its thread must end before the interpreter does. A daemon
    thread caught inside a store call (C++, GIL released) at interpreter exit is ended by pthread_exit as it
    takes the GIL back, and that unwinds through pybind11's noexcept frames: SIGABRT, "terminate called
    without an active exception", after the run's work is done (seen in CI on a rank whose exit was slow,
    after a compiled run)."""

    def __init__(self, timeout: float, rank: int, world_size: int, peers: tuple = ()):
        self.timeout, self.rank, self.world_size, self.peers = timeout, rank, world_size, peers
        self.last = time.monotonic()
        self.store = default_store() if world_size > 1 else None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="tryon-watchdog")
        self._thread.start()

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=30)  # one store call at most; a store whose host is gone fails fast

    def kick(self) -> None:
        self.last = time.monotonic()

    def _store_host_gone(self) -> bool:
        """Whether rank 0, whose process hosts the store (unless an agent such as torchrun's does), has ended
        on this host. A store call would only fail then, and c10d logs that failure to stderr with its C++
        frames: the collective that meets the dead peer says it in one line instead (``peer_died``)."""
        if self.rank == 0 or not self.peers:
            return False
        host, pid = self.peers[0]
        return host == socket.gethostname() and _how_it_ended(pid) is not None

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout / 4)):
            if self.store is not None and not self._store_host_gone() and _announced(self.store):
                _acknowledge(self.store, self.rank, self.world_size)
                os._exit(2)  # another rank printed the error; this one may be stuck in a collective
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                dead = dead_peers(self.peers, self.rank)
                sys.stderr.write(f"error: rank {self.rank}: no training progress for {idle:.0f} s (dist_timeout_s="
                                 f"{self.timeout:g}); {'; '.join(dead) if dead else 'another rank died or hangs'}. "
                                 "Exiting.\n")
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
    store = default_store() if world_size > 1 else None
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


# How gloo and NCCL word a collective that lost its peer.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
             "NCCL communicator was aborted", "NCCL error", "Socket Timeout")


def lost_peer(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(text in str(err) for text in PEER_GONE)


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed in this process's memory cgroup (v2 or v1)."""
    try:
        paths = []
        for line in Path("/proc/self/cgroup").read_text().strip().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":  # v2: one hierarchy
                paths.append(Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events")
            elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
                paths.append(Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.oom_control")
        for path in paths:
            if path.is_file():
                for line in path.read_text().splitlines():
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


OOM_KILLS_AT_START = oom_kills()


def _how_it_ended(pid: int) -> str | None:
    """How process ``pid`` (not our child) ended, while its parent has not yet reaped it; None if it runs."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return "has ended"  # already reaped by its launcher: how is in the launcher's log
    if fields[0] not in ("Z", "X"):
        return None
    status = int(fields[49]) if len(fields) > 49 else 0  # field 52 of stat: waitpid's status
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status))
        return f"was killed by {sig.name}" + (" (out of memory?)" if sig == signal.SIGKILL else "")
    return f"exited with status {os.WEXITSTATUS(status)}" if os.WIFEXITED(status) else "has ended"


def dead_peers(peers: tuple, rank: int) -> list[str]:
    """What this machine can tell about the other ranks that are gone: those on this host by their pid
    (the signal or exit status while their launcher has not reaped them), and whether the kernel's OOM
    killer has killed a process in this rank's memory cgroup (the job's, under SLURM) since it started."""
    host, out = socket.gethostname(), []
    for other, (peer_host, pid) in enumerate(peers):
        if other != rank and peer_host == host:
            how = _how_it_ended(pid)
            if how is not None:
                out.append(f"rank {other} (pid {pid}) {how}")
    kills = oom_kills()
    if kills is not None and OOM_KILLS_AT_START is not None and kills > OOM_KILLS_AT_START:
        out.append(f"the kernel's OOM killer killed {kills - OOM_KILLS_AT_START} process(es) in this rank's memory "
                   "cgroup since it started: out of memory")
    remote = sorted({h for h, _ in peers} - {host})
    if not out and remote:
        out.append(f"a rank on {', '.join(remote)} stopped answering (its own log says why)")
    return out


def peer_died(err: BaseException, rank: int, peers: tuple) -> None:
    """One line instead of the backend's frames when a collective lost its peer, then exit 1."""
    dead = dead_peers(peers, rank)
    first = str(err).split(". ")[0].split("] ")[-1]
    sys.stderr.write(f"error: rank {rank}: a collective failed: {'; '.join(dead) or first}. This rank stops too; "
                     "the last complete checkpoint stands.\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


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
