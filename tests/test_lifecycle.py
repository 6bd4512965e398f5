"""Every way a run ends ends it: with the right exit status, within a bound, and with no process left (the
ranks, their data-loader workers, wandb's service). Real DeepSpeed ranks on CPU with real loader workers;
each run starts its own process group, so whatever it leaves behind is found by that group."""
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from conftest import ROOT, Run, command, completed, free_port, rank_commands, rank_processes
from tryon_ds.training import lifecycle

WORKERS = ["--set", "data.num_workers=2"]


def metric_steps(run_dir):
    path = run_dir / "out" / "metrics_unet1.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def catches_sigterm(process) -> bool:
    """Whether the process has a handler for SIGTERM installed (its SigCgt mask in /proc)."""
    try:
        status = (Path("/proc") / str(process.pid) / "status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@contextlib.contextmanager
def busy_machine(busy: bool):
    """Two more processes than the machine has cores, each spinning, while the block runs."""
    spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range((os.cpu_count() or 2) + 2 if busy else 0)]
    try:
        yield
    finally:
        for p in spinning:
            p.kill()
            p.wait()


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["start-up", "validation", "preview", "checkpoint"])
def test_a_stop_signal_at_any_moment_saves_and_exits_0(shards, tmp_path, moment):
    """SIGTERM/SIGUSR1 while DeepSpeed starts, in the middle of validation (which it cuts short), while a
    preview is drawn, or while a checkpoint is written: the run saves and exits 0."""
    extra = [*WORKERS, "--set", "validation_freq=1000", "--set", "sample_freq=1000", "--set", "checkpoint_freq=1000"]
    if moment == "validation":  # a long validation from step 3: the whole shard set, 2 samples a batch
        extra += ["--set", "validation_freq=3", "--set", "batch_size=2", "--set", f"data.val_shards=[{shards}/train-*.tar]"]
    if moment == "preview":
        extra += ["--set", "sample_freq=3", "--set", "logging.preview_steps=150"]
    if moment == "checkpoint":
        extra += ["--set", "checkpoint_freq=3"]
    with busy_machine(moment == "start-up"):  # more spinning processes than cores, at start-up
        run = Run(command(tmp_path, shards, steps=1000, extra=extra))
        if moment == "start-up":  # as soon as both ranks have their handler: inside imports and DeepSpeed's set-up
            run.wait_for(lambda: len(ranks := rank_processes(run.proc.pid)) == 2 and all(map(catches_sigterm, ranks)),
                         timeout=60)
            assert not metric_steps(tmp_path)
        elif moment == "checkpoint":
            run.wait_for((tmp_path / "ckpt" / "unet1" / "step00000003").exists)
        else:
            run.wait_for(lambda: 3 in metric_steps(tmp_path))
            time.sleep(0.5)
        run.signal_ranks(signal.SIGUSR1 if moment == "preview" else signal.SIGTERM)
        assert run.end() == 0, run.err[-3000:]
    assert "stop requested: saved at step" in run.out
    assert completed(tmp_path), "no checkpoint saved"
    if moment == "validation":
        assert "validation cut short by the stop request" in run.out
    if moment == "checkpoint":
        assert "step00000003" in completed(tmp_path)
    if moment == "start-up":  # the stop honoured at the first step, and nothing compiled on the way there (#38)
        assert completed(tmp_path) == ["step00000001"] and metric_steps(tmp_path) == [1]
        assert "built successfully" not in run.out + run.err


@pytest.mark.slow
@pytest.mark.parametrize("when", ["at start", "mid-run on one rank"])
def test_a_user_error_is_printed_once_and_every_rank_exits_2(shards, tmp_path, when):
    if when == "at start":  # every rank meets it: bf16 asked for, fp32-only DeepSpeed config
        extra = ["--set", "mixed_precision=bf16", "--deepspeed_config", str(tmp_path / "fp32.json")]
        ds = json.loads((ROOT / "ds_configs" / "cpu_zero2.json").read_text())
        ds["bf16"] = {"enabled": False}
        (tmp_path / "fp32.json").write_text(json.dumps(ds))
        expected = "has no \"bf16\": {\"enabled\": \"auto\"} block"
    else:  # only rank 0 writes the step-5 checkpoint's files; a file is in its way
        extra = ["--set", "checkpoint_freq=5"]
        (tmp_path / "ckpt" / "unet1").mkdir(parents=True)
        (tmp_path / "ckpt" / "unet1" / "step00000005").write_text("in the way")
        expected = "could not write the step-5 checkpoint"
    runs = [Run(cmd, env) for cmd, env in rank_commands(tmp_path, shards, [*WORKERS, *extra])]
    codes = [r.end(bound=120) for r in runs]
    assert codes == [2, 2], [r.err[-2000:] for r in runs]
    stderr = "".join(r.err for r in runs)
    assert stderr.count(expected) == 1, stderr[-3000:]
    assert any(line.startswith("error: ") and expected in line for line in stderr.splitlines()), stderr[-3000:]
    assert "Traceback" not in stderr


def test_a_closed_watchdog_has_left_the_store_before_the_interpreter_ends():
    """A daemon thread inside a store call (C++, GIL released) when the interpreter finalizes is ended by
    pthread_exit, which aborts the process ("terminate called without an active exception": seen in CI on a
    rank that had finished a compiled run). The watchdog's thread must be gone once it is closed; this one
    is caught inside a real TCPStore's wait when close() is called."""
    store = dist.TCPStore("127.0.0.1", free_port(), 1, True)
    called = threading.Event()

    def slow_announced(s):
        called.set()
        with pytest.raises(dist.DistStoreError):
            s.wait(["never"], datetime.timedelta(seconds=1))
        return False

    watchdog = lifecycle.Watchdog(600, rank=0, world_size=1)  # polls the store each second
    watchdog.store = store
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lifecycle, "_announced", slow_announced)
        assert called.wait(10)
        watchdog.close()
    assert not watchdog._thread.is_alive()


@pytest.mark.slow
@pytest.mark.parametrize("api_key", [True, False])
def test_wandb_without_a_reachable_server_costs_a_bounded_wait_and_never_hangs_the_end(shards, tmp_path, api_key):
    """wandb online, its server an address on this machine where nothing listens, with and without an API
    key: one line says it fell back, the run trains to the end and exits 0, leaving no process (the ending
    "finished", with loader workers, wandb's service and TensorBoard's writer to wind down)."""
    env = {"WANDB_MODE": "online", "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}", "WANDB_API_KEY": "",
           "WANDB_DIR": str(tmp_path)}
    if api_key:
        env["WANDB_API_KEY"] = "0123456789abcdef0123456789abcdef01234567"
    start = time.time()
    run = Run(command(tmp_path, shards, ranks=1, steps=4, extra=[*WORKERS, "--set", "logging.wandb=online",
                                                                 "--set", "logging.wandb_init_timeout_s=5"]), env)
    assert run.end(bound=150) == 0, run.err[-3000:]
    assert run.out.count("logging to TensorBoard only") == 1, run.out[-3000:]
    assert "done: unet1 at step 4" in run.out
    assert time.time() - start < 120


@pytest.mark.slow
def test_tryon_train_from_any_folder_finds_the_shipped_configs(shards, tmp_path):
    """The console script started in an empty folder, given a config and data of its own: the default
    DeepSpeed config (ds_configs/cpu_zero2.json) and `extends: configs/tiny.yaml` are the shipped ones."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "my.yaml").write_text(f"extends: {ROOT / 'configs' / 'tiny.yaml'}\ndata_dir: {shards}\n"
                                  "checkpoint_dir: ckpt\noutput_dir: out\nlog_dir: logs\ndata: {num_workers: 0}\n")
    r = subprocess.run(["tryon-train", "--config", "my.yaml", "--max_steps", "2", "--set", "validation_freq=100",
                        "--set", "sample_freq=100"], cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "ckpt" / "unet1" / "step00000002" / "COMPLETE").is_file()
    r = subprocess.run(["tryon-train", "--config", "my.yaml", "--deepspeed_config", "ds_configs/cpu_zero3.json",
                        "--max_steps", "1", "--set", "checkpoint_dir=ckpt3"], cwd=work, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "ZeRO-3" in r.stdout, r.stderr[-3000:]
    r = subprocess.run(["tryon-train", "--config", "my.yaml", "--deepspeed_config", "mine.json"], cwd=work,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"DeepSpeed config 'mine.json' does not exist (in the current folder {work})" in r.stderr


def test_a_dead_peer_is_described_by_its_signal_or_exit_status_while_unreaped():
    """What a surviving rank can tell of a peer on its host, read from /proc as an unrelated process would."""
    import os
    import socket
    import sys

    from tryon_ds.training import lifecycle
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed.send_signal(signal.SIGKILL)
        for p in (killed, failed):  # ended, not yet reaped: zombies, as under a launcher that polls
            while open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
                time.sleep(0.01)
        host = socket.gethostname()
        peers = ((host, os.getpid()), (host, killed.pid), (host, failed.pid), (host, running.pid), ("elsewhere", 1))
        assert lifecycle.dead_peers(peers, 0) == [f"rank 1 (pid {killed.pid}) was killed by SIGKILL (out of memory?)",
                                                  f"rank 2 (pid {failed.pid}) exited with status 3"]
        killed.wait()
        assert lifecycle.dead_peers(peers[:2], 0) == [f"rank 1 (pid {killed.pid}) has ended"]
        assert lifecycle.dead_peers(((host, os.getpid()), ("elsewhere", 2)), 0) == [
            "a rank on elsewhere stopped answering (its own log says why)"]
        assert lifecycle.lost_peer(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:406. GLHF"))
        assert not lifecycle.lost_peer(RuntimeError("CUDA out of memory"))
    finally:
        for p in (killed, failed, running):
            p.kill()
            p.wait()
