"""Data faults: bad samples and shards are skipped, counted and named (and the run's final log says how many
and why); a shard list that matches nothing, or shards of which nothing is readable, are clear errors."""
import io
import subprocess
import tarfile

import numpy as np
import pytest

from conftest import ROOT, command, run_tool
from tryon_ds.config import build_config, deep_merge, read_config_file
from tryon_ds.data.pipeline import TrainLoader
from tryon_ds.errors import DataError


def _members(shard):
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write_shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _config(shards, train_shards):
    base = read_config_file(ROOT / "configs" / "tiny.yaml")
    return build_config(deep_merge(base, {"data_dir": str(shards),  # pipe: specs retried without waiting
                                          "data": {"num_workers": 0, "train_shards": train_shards,
                                                   "shard_retry_wait_s": 0.0}}))


def test_loader_skips_counts_and_names_bad_samples_and_shards(shards, tmp_path):
    """A member that is not an image, a truncated tar and an unreachable pipe: command."""
    good = sorted(shards.glob("train-*.tar"))[0]
    members = _members(good)
    first = members[0][0].split(".")[0]
    _write_shard(tmp_path / "bad.tar", [(n, b"not a jpeg" if n == f"{first}.person.jpg" else d) for n, d in members])
    whole = good.read_bytes()
    (tmp_path / "trunc.tar").write_bytes(whole[: len(whole) // 2])
    loader = TrainLoader(_config(shards, [str(tmp_path / "bad.tar"), str(tmp_path / "trunc.tar"), "pipe:exit 3"]),
                         1, rank=0, batch_size=4)
    _take(loader, 12)
    skipped = loader.skipped()
    assert any("unreadable person.jpg" in reason for reason in skipped)
    assert any("trunc.tar" in reason for reason in skipped), skipped
    assert any("pipe:exit 3" in reason for reason in skipped), skipped


def test_nothing_readable_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(DataError, match="no sample could be read"):
        _take(TrainLoader(_config(tmp_path, [str(tmp_path / "empty.tar"), "pipe:exit 1"]), 1, rank=0, batch_size=2), 1)


@pytest.mark.slow
def test_run_log_counts_skipped_samples_by_reason(shards, tmp_path):
    """Poses of the wrong shape and with NaN in a shard, plus an empty shard: the run trains on the rest and its
    final log says how many samples were skipped and why."""
    members = _members(sorted(shards.glob("train-*.tar"))[0])
    keys = sorted({name.split(".")[0] for name, _ in members})
    broken = {f"{keys[0]}.person_pose.npy": _npy(np.zeros((5, 3), "float32")),
              f"{keys[1]}.garment_pose.npy": _npy(np.full((18, 3), np.nan, "float32"))}
    _write_shard(tmp_path / "corrupt.tar", [(n, broken.get(n, d)) for n, d in members])
    (tmp_path / "empty.tar").write_bytes(b"")
    r = subprocess.run(command(tmp_path, shards, ranks=1, steps=6, extra=[
        "--set", f"data.train_shards=[{tmp_path / 'corrupt.tar'}, {tmp_path / 'empty.tar'}]",
        "--set", "data.shuffle_buffer=5"]), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sample(s) skipped" in r.stdout
    assert "person_pose.npy of shape (5, 3), expected (18, 3)" in r.stdout
    assert "garment_pose.npy has NaN or infinite values" in r.stdout
    assert "unreadable shard" in r.stdout and "empty.tar" in r.stdout


def test_shard_list_matching_nothing_is_an_error_at_start(tmp_path):
    r = run_tool(["tryon_ds/train.py", "--config", "configs/tiny.yaml", "--max_steps", "2", "--set",
                  f"data.train_shards=[{tmp_path}/nothing-*.tar]"], timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{tmp_path}/nothing-*.tar' matches no file" in r.stderr
