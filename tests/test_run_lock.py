"""One run per checkpoint folder: a second run refuses naming the holder; a holder that is gone (a killed
process on this host, a silent other host, the same SLURM job requeued) is taken over, and says so."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, command, group_alive, wait_for

from tryon_ds.errors import UserError
from tryon_ds.training.run_lock import LOCK_NAME, RunLock


def _holder(folder, **fields):
    now = time.time()
    entry = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": None, "started": now, "heartbeat": now,
             **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(entry))


def test_who_may_take_a_lock_over(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    said = []
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _holder(tmp_path, pid=sleeper.pid, slurm_job="41")
        with pytest.raises(UserError, match=rf"in use by another run \(pid {sleeper.pid} on {socket.gethostname()}, "
                                            r"SLURM job 41, started \d{4}-"):
            RunLock(tmp_path).acquire()
        monkeypatch.setenv("SLURM_JOB_ID", "41")  # the same job after a requeue
        with RunLock(tmp_path, log=said.append):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert "the same SLURM job, requeued" in said[-1] and not (tmp_path / LOCK_NAME).exists()
        monkeypatch.delenv("SLURM_JOB_ID")

        sleeper.kill()
        sleeper.wait()
        _holder(tmp_path, pid=sleeper.pid)
        with RunLock(tmp_path, log=said.append):
            pass
        assert f"from pid {sleeper.pid}" in said[-1] and "its process no longer exists" in said[-1]
    finally:
        sleeper.kill()

    _holder(tmp_path, host="node-b", pid=1, heartbeat=time.time() - 30)  # another host, beating
    with pytest.raises(UserError, match="in use by another run .pid 1 on node-b"):
        RunLock(tmp_path, stale_s=300).acquire()
    _holder(tmp_path, host="node-b", pid=1, heartbeat=time.time() - 400)  # another host, silent
    with RunLock(tmp_path, stale_s=300, log=said.append):
        pass
    assert "no heartbeat for 400 s (more than 300 s)" in said[-1]

    (tmp_path / LOCK_NAME).write_text("{half")
    with pytest.raises(UserError, match="not a run lock"):
        RunLock(tmp_path).acquire()


def test_the_holder_beats_and_a_taken_over_holder_stops_beating(tmp_path):
    said = []
    lock = RunLock(tmp_path, heartbeat_s=0.05, log=said.append)
    lock.acquire()
    first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first
    _holder(tmp_path, host="node-b", pid=1)  # someone took it over (after deciding this run was gone)
    time.sleep(0.3)
    assert "now names another run" in said[-1]
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "node-b"  # not ours: left alone


def _contents(folder):
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


@pytest.mark.slow
def test_two_real_runs_on_one_folder_and_a_sigkilled_holder(shards, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command(run_dir, shards, ranks=2, steps=100000), cwd=ROOT, env=env,
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(run_dir / "out" / "metrics_unet1.jsonl", first)
        holder = json.loads((run_dir / "ckpt" / "unet1" / LOCK_NAME).read_text())
        # The holder is frozen while the second run is refused: whatever changes in the folder meanwhile is
        # the refused run's doing, however far the holder had got. (A stopped process still exists: the lock
        # stays held.)
        os.killpg(first.pid, signal.SIGSTOP)
        before = _contents(run_dir)
        second = subprocess.run(command(run_dir, shards, ranks=1, steps=2), cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"is in use by another run (pid {holder['pid']} on {holder['host']}" in second.stderr
        assert _contents(run_dir) == before  # the refused run wrote, changed and removed nothing
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    deadline = time.time() + 30
    while group_alive(first.pid) and time.time() < deadline:
        time.sleep(0.1)
    third = subprocess.run(command(run_dir, shards, ranks=1, steps=2), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"from pid {holder['pid']} on {holder['host']}" in third.stdout and "no longer exists" in third.stdout
    assert not (run_dir / "ckpt" / "unet1" / LOCK_NAME).exists()  # released at the end
