"""One run per checkpoint folder. Two runs writing ``checkpoint_dir/unetN`` would each save checkpoints and
delete the other's old ones (``logging.keep_checkpoints``), so rank 0 holds ``RUN.lock`` there for the
whole run: who holds it (host, pid, SLURM job id, start) and a heartbeat rewritten every ``HEARTBEAT_S``.

A second run refuses with one line naming the holder, unless the holder is gone:
- on this host, its process no longer exists (a SIGKILLed run leaves its lock behind);
- on another host, its heartbeat is older than ``STALE_S`` (a node that died cannot be asked);
- it is this SLURM job (a requeued job restarts under the same id, maybe on other nodes).
Then this run takes the lock over and says whose it was and why.

The file is created with O_EXCL, so of two runs starting together exactly one gets it; a takeover replaces
a dead holder's file by rename and reads it back, so of two runs taking over together one wins.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError

LOCK_NAME = "RUN.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats


@dataclass
class Holder:
    host: str
    pid: int
    slurm_job: str | None
    started: float
    heartbeat: float

    @classmethod
    def me(cls) -> "Holder":
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID"), now, now)

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}{job}, started {started}"

    def gone(self, me: "Holder", now: float, stale_s: float) -> str | None:
        """Why this holder no longer holds the folder, or None while it may still be running."""
        if self.slurm_job and self.slurm_job == me.slurm_job:
            return "the same SLURM job, requeued"
        if self.host == me.host:
            if self.pid == me.pid:
                return "this process"
            return None if _running(self.pid) else "its process no longer exists"
        if now - self.heartbeat > stale_s:
            return f"no heartbeat for {now - self.heartbeat:.0f} s (more than {stale_s:.0f} s)"
        return None


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited: a killed run's ranks can linger as zombies until
    their parent (or init) reaps them, and those hold no folder."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): it exists


class RunLock:
    def __init__(self, folder: Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S, log=print):
        self.path = Path(folder) / LOCK_NAME
        self.heartbeat_s, self.stale_s, self.log = heartbeat_s, stale_s, log
        self.me = Holder.me()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> Holder | None:
        try:
            return Holder(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as err:  # a lock half-written by hand or by a crash of another tool
            raise UserError(f"{self.path}: not a run lock ({err}); if no run uses this folder, delete it") from None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.me), f)
        return True

    def __enter__(self) -> "RunLock":
        try:
            self.acquire()
        except OSError as err:
            raise UserError(f"config key 'checkpoint_dir': cannot write {self.path} ({err.strerror or err})") from None
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _write(self) -> None:
        # A temporary name of this process's own: two runs taking over at once must not share one.
        tmp = self.path.with_name(f".{LOCK_NAME}.{self.me.host}.{self.me.pid}.tmp")
        tmp.write_text(json.dumps(asdict(self.me)))
        os.replace(tmp, self.path)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._create():
            holder = self._read()
            if holder is not None:
                why = holder.gone(self.me, time.time(), self.stale_s)
                if why is None:
                    raise UserError(f"{self.path.parent} is in use by another run ({holder.describe()}); "
                                    f"give this run another checkpoint_dir, or stop that one")
                self._write()
                if self._read() != self.me:
                    raise UserError(f"{self.path.parent}: another run took it over at the same moment")
                self.log(f"took over {self.path} from {holder.describe()}: {why}")
            elif not self._create():  # released between our two looks: try once more, then name the new holder
                return self.acquire()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self._read() != self.me:
                    self.log(f"{self.path} now names another run: this run's heartbeat stops")
                    return
                self.me.heartbeat = time.time()
                self._write()
            except (OSError, UserError) as err:  # a full or flaky disk must not end the training
                self.log(f"{self.path}: heartbeat not written ({err})")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self._read() == self.me:
                self.path.unlink()
        except (OSError, UserError):
            pass
