"""Disk faults: an unwritable output folder at start, a checkpoint write that fails, a disk that fills up.
Each is a clear error naming what to fix, and the earlier checkpoints stay intact."""
import subprocess

import pytest
from safetensors.torch import load_file

from conftest import ROOT, command, completed


def test_unwritable_output_folder_is_an_error_at_start(shards, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = subprocess.run(command(tmp_path, shards, ranks=1, steps=2, extra=["--set", f"output_dir={blocker}/out"]),
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"config key 'output_dir': cannot write to {blocker}/out" in r.stderr


@pytest.mark.slow
def test_failed_checkpoint_write_keeps_the_previous_checkpoints(shards, tmp_path):
    root = tmp_path / "ckpt" / "unet1"
    root.mkdir(parents=True)
    (root / "step00000010").write_text("a file where the step-10 checkpoint folder must go")
    r = subprocess.run(command(tmp_path, shards, ranks=1, steps=10, extra=["--set", "checkpoint_freq=5"]),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "could not write the step-10 checkpoint" in r.stderr and "earlier checkpoints are intact: step00000005" \
        in r.stderr
    assert completed(tmp_path) == ["step00000005"]
    assert (root / "step00000005" / "ema.safetensors").is_file()


@pytest.mark.slow
def test_full_disk_at_checkpoint_time_keeps_the_previous_checkpoint(shards, tmp_path):
    """A real full disk: a 50 MB tmpfs holds one checkpoint of the tiny model (35 MB) but not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=50m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        r = subprocess.run(command(tmp_path, shards, ranks=1, steps=10, extra=[
            "--set", "checkpoint_freq=5", "--set", f"checkpoint_dir={disk}"]),
            cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        assert "could not write the step-10 checkpoint" in r.stderr and "No space left on device" in r.stderr
        assert "earlier checkpoints are intact: step00000005" in r.stderr
        root = disk / "unet1"
        assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step00000005"]  # the partial one removed
        assert (root / "step00000005" / "COMPLETE").is_file()
        load_file(str(root / "step00000005" / "ema.safetensors"))
    finally:
        subprocess.run(["umount", "-l", str(disk)])
