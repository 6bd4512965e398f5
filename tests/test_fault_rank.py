"""A rank that dies or hangs: the others do not wait forever; the job ends non-zero naming the rank, within a
bound, and leaves no process (ranks, loader workers) behind."""
import re
import signal

import pytest

from conftest import Run, command, rank_processes

# Real multi-rank or multi-process runs: the full suite, not the fast tier (-m "not slow").
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_dead_or_hung_rank_ends_the_job_non_zero(shards, tmp_path, fault):
    run = Run(command(tmp_path, shards, steps=10_000, extra=["--set", "dist_timeout_s=12", "--set",
                                                               "data.num_workers=2"]))
    metrics = tmp_path / "out" / "metrics_unet1.jsonl"
    run.wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2)
    victim = next(p for p in rank_processes(run.proc.pid) if "--local_rank=1" in " ".join(p.cmdline()))
    victim.send_signal(signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
    try:
        assert run.end(bound=90) != 0
    finally:
        if victim.is_running():
            victim.kill()
    out = run.out + run.err
    if fault == "hangs":
        assert "rank 0: no training progress for" in out and "another rank died or hangs" in out, out[-2000:]
    else:
        # the launcher names the failed process by its command line, which carries the rank
        assert re.search(r"local_rank=1\S*.* exits with return code = -9", out), out[-2000:]


def test_a_rank_killed_for_memory_is_named_in_one_line_by_the_rank_that_survives(shards, tmp_path):
    """Two ranks started as srun starts them (no launcher to kill the survivor), rank 0 killed with SIGKILL
    (what the kernel's OOM killer sends) mid-run and not yet reaped: rank 1's collective fails, and it ends
    with one line naming rank 0, its pid and the signal, not gloo's frames or a traceback."""
    import os
    import subprocess
    import time

    from conftest import ROOT, rank_commands
    ranks = [subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for cmd, env in rank_commands(tmp_path, shards, steps=10_000)]
    try:
        metrics = tmp_path / "out" / "metrics_unet1.jsonl"
        deadline = time.time() + 180
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert all(p.poll() is None for p in ranks) and time.time() < deadline, "training never got going"
            time.sleep(0.05)
        os.kill(ranks[0].pid, signal.SIGKILL)  # not waited for: a zombie until rank 1 has spoken
        _, err = ranks[1].communicate(timeout=120)
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
        ranks[0].wait()
    assert ranks[1].returncode == 1, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: rank 1: a collective failed: rank 0 (pid {ranks[0].pid}) was killed by SIGKILL (out of "
                     "memory?). This rank stops too; the last complete checkpoint stands."], err[-3000:]
    assert "Traceback" not in err and "frame #" not in err, err[-3000:]
