"""A real SLURM (Debian's slurm-wlm + munge) with two nodes, n1 and n2, on this one machine, for tests.

``cluster()`` installs the packages when they are missing (apt-get, as root), starts munged, slurmctld
and two slurmd, waits for both nodes to be idle, yields the environment to run SLURM commands with, and
shuts everything down afterwards. It raises ``ClusterUnavailable`` with the reason when SLURM truly
cannot start here (not root, no apt, packages not installable, daemons not coming up).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "slurmctld", "slurmd", "slurm-client", "munge"]
CONF = """ClusterName=tryon-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# How long a requeued job is held (BeginTime) while the nodes still refuse its revoked credential:
# 120 s by default, shortened so the requeue test is quick.
AuthInfo=cred_expire=10
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd-%n.log
SlurmctldPort=16817
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001 CPUs=2 RealMemory=10000
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17002 CPUs=2 RealMemory=10000
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""


class ClusterUnavailable(RuntimeError):
    pass


def _sh(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def install() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterUnavailable("SLURM is not installed and cannot be (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        r = _sh(cmd, env=env, timeout=600)
        if r.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {r.stderr[-500:]}")


def _start_munge() -> None:
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    if _sh(["pgrep", "-x", "munged"]).returncode != 0:
        r = _sh(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
        if r.returncode != 0:
            raise ClusterUnavailable(f"munged did not start: {r.stderr[-500:]}")


@contextlib.contextmanager
def cluster():
    install()
    if _sh(["pgrep", "-x", "slurmctld"]).returncode == 0:
        raise ClusterUnavailable("another slurmctld is already running on this machine")
    _start_munge()
    state = Path(tempfile.mkdtemp(prefix="tryon-slurm-"))
    for d in ("ctld", "n1", "n2"):  # slurmctld's state, each slurmd's spool (its step sockets live there)
        (state / d).mkdir()
    conf = state / "slurm.conf"
    conf.write_text(CONF.format(state=state))
    env = {**os.environ, "SLURM_CONF": str(conf), "TRYON_SLURM_STATE": str(state)}
    try:
        for cmd in (["slurmctld"], ["slurmd", "-N", "n1"], ["slurmd", "-N", "n2"]):
            r = _sh(cmd, env=env)
            if r.returncode != 0:
                raise ClusterUnavailable(f"{' '.join(cmd)} failed: {r.stderr[-500:]}")
        deadline = time.time() + 60
        while True:
            r = _sh(["sinfo", "-h", "-N", "-o", "%N %T"], env=env)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            if states.get("n1") == "idle" and states.get("n2") == "idle":
                break
            if time.time() > deadline:
                log = (state / "slurmctld.log").read_text()[-1500:] if (state / "slurmctld.log").exists() else ""
                raise ClusterUnavailable(f"the nodes did not become idle ({states}); slurmctld log:\n{log}")
            time.sleep(0.5)
        yield env
    finally:
        if os.environ.get("TRYON_SLURM_KEEP_LOGS"):
            shutil.copytree(state, os.environ["TRYON_SLURM_KEEP_LOGS"], dirs_exist_ok=True)
        _sh(["scontrol", "shutdown"], env=env)
        deadline = time.time() + 20
        while time.time() < deadline and _sh(["pgrep", "-x", "slurmctld"]).returncode == 0:
            time.sleep(0.3)
        _sh(["pkill", "-x", "slurmd"])
        shutil.rmtree(state, ignore_errors=True)
