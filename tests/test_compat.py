"""The contract with DeepSpeed's (and torch's) internals: every function of tryon_ds/compat.py on real
engines of ZeRO-0 (fp32 and bf16), ZeRO-2 and ZeRO-3 on 2 CPU ranks (tests/helpers/compat_probe.py). A DeepSpeed
release that moves one of them fails here, naming it; and nothing else in the package reaches past DeepSpeed's
public API."""
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, free_port
from tryon_ds import compat

# What only compat.py may name: DeepSpeed's modules past its public API, its checkpoint engine, ZeRO's
# parameter attributes, the optimizers' fp32 groups and loss scale, torch's c10d store and DataLoader workers.
PRIVATE = re.compile(r"deepspeed\.runtime|deepspeed\.utils|checkpoint_engine|\bds_(id|tensor|numel|shape|status)\b|"
                     r"_hp_mapping|fp32_groups|fp32_partitioned|single_partition_of|averaged_gradients|cur_scale|"
                     r"loss_scale_config|_get_default_store|__compatible_ops__|_shutdown_workers|_run_exitfuncs")


def test_nothing_but_compat_reaches_into_deepspeed_internals():
    found = []
    for path in [*(ROOT / "tryon_ds").rglob("*.py"), *(ROOT / "tools").rglob("*.py")]:
        if path.name == "compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line.split("#")[0]):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_deepspeed_is_bounded_to_the_minor_release_compat_was_checked_on():
    major, minor, _ = compat.CHECKED["deepspeed"].split(".")
    setup = (ROOT / "setup.cfg").read_text()
    assert f"deepspeed>={compat.CHECKED['deepspeed']},<{major}.{int(minor) + 1}" in setup


@pytest.mark.slow
def test_every_touchpoint_holds_on_real_engines(tmp_path):
    out = tmp_path / "compat.json"
    r = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                        str(free_port()), "tests/helpers/compat_probe.py", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    versions = report.pop("versions")
    broken = {name: why for name, why in report.items() if why != "ok"}
    assert not broken, (f"DeepSpeed {versions['deepspeed']} / torch {versions['torch']} (compat.py was checked on "
                        f"{compat.CHECKED}) changed: " + "; ".join(f"{k}: {v}" for k, v in broken.items()))
    assert len(report) == 4 * 5 + 4


def test_a_dataloaders_workers_stop_when_told():
    """compat.shutdown_workers: PyTorch's own shutdown of an iterator's worker processes, at once."""
    from torch.utils.data import DataLoader

    batches = iter(DataLoader(list(range(64)), batch_size=2, num_workers=2))
    next(batches)
    workers = list(batches._workers)
    assert workers and all(w.is_alive() for w in workers)
    compat.shutdown_workers(batches)
    assert not any(w.is_alive() for w in workers)
    compat.shutdown_workers(iter(DataLoader(list(range(4)))))  # no workers: nothing to stop


def test_an_exit_without_teardown_still_runs_the_exit_handlers_and_flushes(tmp_path):
    """compat.exit_without_teardown: what atexit holds runs (a library's flush, the reaper of loader workers),
    buffered output reaches the pipe, the code is the one given; only the modules' teardown is skipped."""
    marker = tmp_path / "handler_ran"
    code = (f"import atexit, pathlib, sys; from tryon_ds import compat; "
            f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('yes')); "
            f"sys.stdout.write('buffered, no newline'); sys.stderr.write('and on stderr'); "
            f"compat.exit_without_teardown(3)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (3, "buffered, no newline", "and on stderr")
    assert marker.read_text() == "yes"
