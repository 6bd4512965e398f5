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
