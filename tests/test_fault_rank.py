"""A rank that dies or hangs: the others do not wait forever; the job ends non-zero naming the rank."""
import re
import signal
import subprocess
import time

import pytest

from conftest import ROOT, command, rank_processes


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_dead_or_hung_rank_ends_the_job_non_zero(shards, tmp_path, fault):
    proc = subprocess.Popen(command(tmp_path, shards, steps=10_000, extra=["--set", "dist_timeout_s=20"]), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "out" / "metrics_unet1.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    victim = next(p for p in rank_processes(proc.pid) if "--local_rank=1" in " ".join(p.cmdline()))
    victim.send_signal(signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
    start = time.time()
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if fault == "hangs" and victim.is_running():
            victim.send_signal(signal.SIGKILL)
    assert proc.returncode != 0
    assert time.time() - start < 90
    if fault == "hangs":
        assert "rank 0: no training progress for" in out and "another rank died or hangs" in out, out[-2000:]
    else:
        # the launcher names the failed process by its command line, which carries the rank
        assert re.search(r"local_rank=1\S*.* exits with return code = -9", out), out[-2000:]
