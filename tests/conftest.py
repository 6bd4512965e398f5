import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tryon_ds.training.distributed import free_port  # noqa: F401 (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks' shard server: tools.bench.shard_server
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def tiny_config():
    from tryon_ds.config import build_config, read_config_file
    return build_config(read_config_file(ROOT / "configs" / "tiny.yaml"))


def run_tool(args, **kw):
    """Run a tool from tools/ as a user would: a fresh Python process in the repository root."""
    return subprocess.run([sys.executable, *args], cwd=kw.pop("cwd", ROOT), capture_output=True, text=True, **kw)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


STEPS = 30


def make_synthetic_shards(out, samples=160, shard_size=20, val_fraction=0.1, image_size=64):
    r = run_tool(["tools/make_shards.py", "--synthetic", str(samples), "--out", str(out), "--image-size",
                  str(image_size), "--shard-size", str(shard_size), "--val-fraction", str(val_fraction)])
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def demo_quick(tmp_path_factory):
    """tools/demo.py --quick, run once: test_demo reads what it wrote, test_app serves its bundle."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    r = run_tool(["tools/demo.py", "--quick", "--out", str(out)], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("shards"))


def command(run_dir, shards, ranks=2, ds="cpu_zero2", steps=STEPS, extra=(), launcher="deepspeed"):
    """A training run of the tiny config as the README starts it: ``deepspeed`` (the launcher users start with,
    whose ending every lifecycle test is about), or ``torchrun``, for runs that only need to succeed: the
    README's other launcher, 4.5 s less per run here (deepspeed's launcher imports deepspeed twice before a
    rank starts)."""
    train = ["tryon_ds/train.py", "--deepspeed_config", f"ds_configs/{ds}.json", "--config", "configs/tiny.yaml",
             "--max_steps", str(steps), "--set", f"data_dir={shards}", "--set", f"checkpoint_dir={run_dir}/ckpt",
             "--set", f"output_dir={run_dir}/out", "--set", f"log_dir={run_dir}/logs", "--set", "log_freq=1",
             "--set", "validation_freq=10", "--set", "sample_freq=1000", "--set", "checkpoint_freq=10",
             "--set", "batch_size=4", "--set", "data.num_workers=0", "--set", "data.streams=2",
             "--set", "diffusion.sample_steps=[4,4,4]", "--set", "warmup_steps=5", "--set", "learning_rate=2e-3",
             *extra]
    if ranks == 1:
        return [sys.executable, *train]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                "--master_port", str(free_port()), *train]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(free_port()), *train]


def rank_commands(run_dir, shards, extra=(), steps=20):
    """Two ranks as srun starts them: separate processes, rank and world from the environment, no launcher
    watching over them."""
    cmd = command(run_dir, shards, ranks=1, steps=steps, extra=extra)
    port = str(free_port())
    return [(cmd, {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in (0, 1)]


def run(cmd, timeout=300, env=None):
    # One thread per process whatever the world size, so runs compared across world sizes sum alike.
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**(env or os.environ), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def losses(run_dir, unet=1):
    """step -> loss; a resumed run's entries replace those the killed run wrote for the same steps."""
    out = {}
    for line in (Path(run_dir) / "out" / f"metrics_unet{unet}.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "train/loss" in entry:
            out[entry["step"]] = entry["train/loss"]
    return out


def _flat(tree, prefix=""):
    """A nested report as {path: leaf}."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}/{i}").items()}
    return {prefix: tree}


def assert_reports_close(got, want, rel, abs_):
    """Two nested reports alike: the same keys, numbers within a tolerance, everything else (a metric that
    was skipped, None; names; flags) exactly. Written out rather than pytest.approx, whose handling of a
    None inside a mapping changed between pytest 8 and 9."""
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())
    for key, expected in want.items():
        value = got[key]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, expected))
        if numbers and not (math.isnan(value) and math.isnan(expected)):
            assert math.isclose(value, expected, rel_tol=rel, abs_tol=abs_), (key, value, expected)
        elif not numbers:
            assert value == expected, (key, value, expected)


def wait_for(path, proc, timeout=180):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, "the run ended before it was interrupted"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def rank_processes(launcher):
    """The training processes under a deepspeed launcher: not the launcher's own helper processes, not a
    rank's data-loader workers (forked, with the rank's command line; a validation pass's workers come and
    go), nor a short-lived child that exited and is not reaped yet (a zombie has no command line to read)."""
    def command_line(p):
        try:
            return " ".join(p.cmdline())
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            return ""

    def parent(p):
        try:
            return p.ppid()
        except psutil.NoSuchProcess:
            return None

    found = [p for p in psutil.Process(launcher).children(recursive=True)
             if "train.py" in (line := command_line(p)) and "deepspeed.launcher" not in line]
    pids = {p.pid for p in found}
    return [p for p in found if parent(p) is not None and parent(p) not in pids]


def completed(run_dir, unet=1):
    """The checkpoint folders --resume auto may pick (those with a COMPLETE marker), oldest first."""
    from tryon_ds.training.checkpoint import complete_checkpoints
    return [p.name for p in complete_checkpoints(run_dir / "ckpt" / f"unet{unet}")]


BOUND_S = 60  # from the event that ends a run to the last of its processes gone


def group_alive(pgid):
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return out


class Run:
    """A training command in its own process group; ``end()`` waits for it and for every process of it."""

    def __init__(self, cmd, env=None):
        self.proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.out = self.err = ""

    def wait_for(self, predicate, timeout=180):
        deadline = time.time() + timeout
        while not predicate():
            assert self.proc.poll() is None, "the run ended before the moment the test waits for"
            assert time.time() < deadline, "the moment the test waits for never came"
            time.sleep(0.02)

    def signal_ranks(self, sig):
        ranks = rank_processes(self.proc.pid)
        assert ranks, "no training process found"
        for p in ranks:
            p.send_signal(sig)

    def end(self, bound=BOUND_S):
        start = time.time()
        try:
            self.out, self.err = self.proc.communicate(timeout=bound)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()
            raise AssertionError(f"the run did not end within {bound} s")
        while group_alive(self.proc.pid) and time.time() - start < bound:
            time.sleep(0.2)
        left = group_alive(self.proc.pid)
        for p in left:
            p.kill()
        assert not left, f"processes left behind: {[' '.join(p.cmdline())[:120] for p in left]}"
        return self.proc.returncode


