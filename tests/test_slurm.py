"""sbatch slurm/train_base.sh on a real two-node SLURM: runs to completion in both topologies with the same
losses, and a job sent USR1 checkpoints, requeues itself, resumes and ends where an uninterrupted job ends."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from slurm_cluster import ClusterUnavailable, cluster  # noqa: E402

# Real multi-rank or multi-process runs: the full suite, not the fast tier (-m "not slow").
# slurm-wlm is installed from Debian's packages when missing, as root (tests/helpers/slurm_cluster.py).
pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.network]

STEPS = 20


@pytest.fixture(scope="module")
def slurm():
    try:
        with cluster() as env:
            yield env
    except ClusterUnavailable as err:
        pytest.skip(f"no SLURM on this machine: {err}")


def submit(slurm, shards, run_dir, nodes, tasks_per_node, script="slurm/train_base.sh"):
    env = {**slurm, "CONFIG": "configs/tiny.yaml", "DS_CONFIG": "ds_configs/cpu_zero2.json", "DATA_DIR": str(shards),
           "OUTPUT_DIR": str(run_dir), "PYTHON": sys.executable,
           "EXTRA_ARGS": f"--max_steps {STEPS} --set log_freq=1 --set validation_freq=1000 --set sample_freq=1000 "
                         "--set checkpoint_freq=5 --set batch_size=4 --set data.num_workers=0 --set data.streams=2 "
                         "--set diffusion.sample_steps=[2,2,2]"}
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--cpus-per-task=1",
           "--gpus-per-node=0", "--partition=debug", "--time=15", f"--output={run_dir}/slurm-%j.out", script]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job_state(slurm, job):
    r = subprocess.run(["scontrol", "show", "job", job], env=slurm, capture_output=True, text=True)
    fields = dict(part.split("=", 1) for part in r.stdout.split() if "=" in part)
    return fields.get("JobState"), fields


def wait_done(slurm, job, timeout=400):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state, fields = job_state(slurm, job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state, fields
        time.sleep(1)
    raise AssertionError(f"job {job} did not finish: {job_state(slurm, job)}")


def final_loss(run_dir):
    entries = [json.loads(line) for line in (run_dir / "metrics_unet1.jsonl").read_text().splitlines()]
    return {e["step"]: e["train/loss"] for e in entries if "train/loss" in e}


@pytest.fixture(scope="module")
def uninterrupted(slurm, shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two_nodes")
    job = submit(slurm, shards, run_dir, nodes=2, tasks_per_node=1)
    state, _ = wait_done(slurm, job)
    log = next(run_dir.glob("slurm-*.out")).read_text()
    assert state == "COMPLETED", log[-3000:]
    return run_dir, log


def test_two_nodes_one_task_each_runs_to_completion(uninterrupted):
    run_dir, log = uninterrupted
    assert "2 node(s) x 1 task(s)" in log and "2 rank(s)" in log
    assert (run_dir / "checkpoints" / "unet1" / f"step{STEPS:08d}" / "COMPLETE").is_file()
    assert sorted(final_loss(run_dir)) == list(range(1, STEPS + 1))


def test_one_node_two_tasks_runs_to_completion(slurm, shards, uninterrupted, tmp_path):
    job = submit(slurm, shards, tmp_path, nodes=1, tasks_per_node=2)
    state, _ = wait_done(slurm, job)
    log = next(tmp_path.glob("slurm-*.out")).read_text()
    assert state == "COMPLETED", log[-3000:]
    assert (tmp_path / "checkpoints" / "unet1" / f"step{STEPS:08d}" / "COMPLETE").is_file()
    assert final_loss(tmp_path)[STEPS] == pytest.approx(final_loss(uninterrupted[0])[STEPS], abs=1e-6)


def test_usr1_checkpoints_requeues_resumes_and_matches(slurm, shards, uninterrupted, tmp_path):
    job = submit(slurm, shards, tmp_path, nodes=2, tasks_per_node=1)
    metrics = tmp_path / "metrics_unet1.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline and job_state(slurm, job)[0] in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    # SLURM itself relaunches the requeued job once the old credential expires (cred_expire=10 s here);
    # releasing it earlier by hand makes the nodes refuse it ("Job credential revoked").
    state, fields = wait_done(slurm, job)
    log = next(tmp_path.glob("slurm-*.out")).read_text()
    assert state == "COMPLETED", (fields, log[-3000:])
    assert int(fields["Restarts"]) == 1
    assert "start #0" in log and "start #1" in log, log
    assert "USR1: checkpointing, then requeue" in log and "stop requested" in log and "resumed from" in log
    got, ref = final_loss(tmp_path), final_loss(uninterrupted[0])
    assert max(got) == STEPS
    assert got[STEPS] == pytest.approx(ref[STEPS], abs=1e-6)


def test_rendezvous_is_the_first_nodes_address_and_an_unresolvable_one_is_an_error(slurm):
    """slurm/rendezvous.sh with the real scontrol: a node's NodeAddr (n1 -> 127.0.0.1) even when its name does
    not resolve; a first node that resolves nowhere fails a multi-node job clearly, and a one-node job falls
    back to 127.0.0.1."""
    def host(nodelist, nodes):
        return subprocess.run(["bash", "-c", "source slurm/rendezvous.sh && rendezvous_host"], cwd=ROOT,
                              env={**slurm, "SLURM_JOB_NODELIST": nodelist, "SLURM_NNODES": str(nodes)},
                              capture_output=True, text=True)
    r = host("n[1-2]", 2)
    assert r.returncode == 0 and r.stdout.strip() == "127.0.0.1", r.stderr
    r = host("nowhere[1-2]", 2)
    assert r.returncode == 1 and r.stdout == ""
    assert "the first node of this 2-node allocation, nowhere1" in r.stderr and "does not resolve" in r.stderr
    r = host("nowhere1", 1)
    assert r.returncode == 0 and r.stdout.strip() == "127.0.0.1" and "single-node allocation" in r.stderr


def test_make_shards_as_a_job_array_of_three_parts_equals_one_process(slurm, tmp_path):
    """slurm/make_shards.sh over a DressCode replica as an array of 3 tasks on the two nodes, then --merge:
    the same samples per split, and the same keys, as one process."""
    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    from releases import write_dresscode
    from test_shard_parts import keys_by_split
    write_dresscode(tmp_path / "dc", per_category=4, missing=True)
    args = [str(tmp_path / "dc"), "--image-size", "64", "--val-fraction", "0.3", "--shard-size", "3", "--skip-bad"]
    r = subprocess.run([sys.executable, "tools/make_shards.py", *args, "--out", str(tmp_path / "one")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["sbatch", "--parsable", "--array=0-2", "--cpus-per-task=1", "--partition=debug", "--time=10",
                        f"--output={tmp_path}/shards-%A_%a.out", "slurm/make_shards.sh", *args,
                        "--out", str(tmp_path / "parts")], cwd=ROOT, env={**slurm, "PYTHON": sys.executable},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    for task in range(3):
        state, _ = wait_done(slurm, f"{job}_{task}")
        assert state == "COMPLETED", "".join(p.read_text() for p in tmp_path.glob("shards-*.out"))[-3000:]
    assert sorted(p.name for p in (tmp_path / "parts").glob("manifest.part-*.json")) == [
        f"manifest.part-{i:04d}.json" for i in range(3)]
    r = subprocess.run([sys.executable, "tools/make_shards.py", "--merge", "--out", str(tmp_path / "parts")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "merged 3 parts" in r.stdout, r.stderr
    one, parts = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "parts"))
    assert parts["samples"] == one["samples"] and parts["skipped"] == one["skipped"]
    assert keys_by_split(tmp_path / "parts") == keys_by_split(tmp_path / "one")
