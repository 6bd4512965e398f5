"""SIGKILL of a rank while a checkpoint is being written, or a stop request that cannot be answered in time
(SIGTERM while a step cannot finish, then SIGKILL after the grace, as SLURM's scancel does): the
half-written checkpoint is never the one --resume auto picks, and the resumed run reproduces the
uninterrupted losses. (SIGKILL of the whole job between checkpoints:
tests/test_train.py::test_kill_then_resume_auto_reproduces_losses...)"""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, command, completed, losses, rank_processes, run

# Real multi-rank or multi-process runs: the full suite, not the fast tier (-m "not slow").
pytestmark = pytest.mark.slow

STEPS = 20
EXTRA = ["--set", "checkpoint_freq=5", "--set", "dist_timeout_s=60"]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    run(command(folder, shards, steps=STEPS, extra=EXTRA, launcher="torchrun"))
    return folder


@pytest.mark.parametrize("ending", ["rank killed", "stop request unanswered within the grace"])
def test_rank_killed_while_writing_a_checkpoint(shards, reference, tmp_path, ending):

    killed = tmp_path / "killed"
    cmd = command(killed, shards, steps=STEPS, extra=EXTRA)
    port = cmd[cmd.index("--master_port") + 1]
    # Rank 1 stops itself as it first opens a file of the step-10 checkpoint (reading back its own files to
    # hash them, after DeepSpeed wrote them): inside the write, before the COMPLETE marker can exist,
    # however fast or busy the machine is.
    pause = {"PYTHONPATH": str(Path(__file__).parent / "helpers" / "pause_at"),
             "TRYON_TEST_PAUSE_OPEN": "step00000010/", "TRYON_TEST_PAUSE_RANK": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **pause})
    deadline = time.time() + 300
    while True:
        assert proc.poll() is None and time.time() < deadline, "rank 1 never reached the step-10 checkpoint"
        victim = next((p for p in rank_processes(proc.pid) if "--local_rank=1" in " ".join(p.cmdline())), None)
        if victim is not None and victim.status() == psutil.STATUS_STOPPED:
            break
        time.sleep(0.05)
    writing = killed / "ckpt" / "unet1" / "step00000010"
    assert writing.is_dir() and not (writing / "COMPLETE").exists()
    assert completed(killed) == ["step00000005"]
    if ending == "rank killed":
        victim.kill()
    else:  # the job asked to stop while rank 1 cannot finish; then, after the grace, SIGKILL to every process
        for p in rank_processes(proc.pid):
            p.send_signal(signal.SIGTERM)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0, out[-2000:]
    assert completed(killed) == ["step00000005"]
    # No RAM-backed file of DeepSpeed's shared-memory all-reduce is left in /dev/shm (compat skips it).
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))

    resumed = run(command(killed, shards, steps=STEPS, extra=[*EXTRA, "--resume", "auto"], launcher="torchrun"))
    assert re.search(r"resumed from \S*step00000005", resumed.stdout), resumed.stdout[-2000:]
    want, got = losses(reference), losses(killed)
    for step in range(6, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])
    assert completed(killed)[-1] == f"step{STEPS:08d}"
