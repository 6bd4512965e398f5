"""Checkpoints at their steps, and checked before they are trusted: real 2-rank runs under ZeRO-2 and
ZeRO-3 whose checkpoints are then damaged on disk (a file truncated, missing, one byte flipped) or made as an
earlier release made them (no checksums). A damaged checkpoint is named with its file and what differs,
moved aside, and the newest intact one is resumed from, reproducing the undamaged run; with none intact
the run ends with status 2 on one line; consolidation checks first too."""
import json
import shutil

import pytest

from conftest import command, completed, run, run_tool

# Real multi-rank or multi-process runs: the full suite, not the fast tier (-m "not slow").
pytestmark = pytest.mark.slow

STEPS = 12
# Frequencies that are not multiples of each other (checkpoint_freq=3 with log_freq=4 once checkpointed only
# at step 12).
# No best kept: a new best validation loss would save a checkpoint of its own (tests/test_quality.py).
EXTRA = ["--set", "checkpoint_freq=3", "--set", "log_freq=4", "--set", "validation_freq=5",
         "--set", "logging.keep_checkpoints=4", "--set", "best_metric=none"]


def metric_steps(run_dir, key):
    entries = [json.loads(line) for line in (run_dir / "out" / "metrics_unet1.jsonl").read_text().splitlines()]
    return {e["step"]: e[key] for e in entries if key in e}


def train(run_dir, shards, ds, resume=False):
    cmd = command(run_dir, shards, ds=ds, steps=STEPS, extra=[*EXTRA, *(["--resume", "auto"] if resume else [])],
                  launcher="torchrun")
    return run(cmd)


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """One undamaged run under each ZeRO stage: what the damaged copies are resumed from and compared with."""
    out = {}
    for ds in ("cpu_zero2", "cpu_zero3"):
        run_dir = tmp_path_factory.mktemp(ds)
        out[ds] = (run_dir, train(run_dir, shards, ds))
    return out


def copy_checkpoints(runs, ds, run_dir):
    shutil.copytree(runs[ds][0] / "ckpt", run_dir / "ckpt")
    return run_dir / "ckpt" / "unet1"


def test_every_action_at_its_own_steps(runs):
    for ds, (run_dir, r) in runs.items():
        saved = [int(line.split()[1].rstrip(":")) for line in r.stdout.splitlines() if ": checkpoint " in line]
        assert saved == [3, 6, 9, 12], (ds, r.stdout[-2000:])
        assert completed(run_dir) == [f"step{s:08d}" for s in (3, 6, 9, 12)]
        assert sorted(metric_steps(run_dir, "train/loss")) == [4, 8, 12]
        assert sorted(metric_steps(run_dir, "val/loss")) == [5, 10, 12]
        manifest = json.loads((run_dir / "ckpt" / "unet1" / "step00000012" / "COMPLETE").read_text())
        on_disk = {p.name for p in (run_dir / "ckpt" / "unet1" / "step00000012").iterdir()} - {"COMPLETE"}
        assert set(manifest["files"]) == on_disk  # every file the checkpoint holds, from both ranks
        assert any("rank_1" in name for name in manifest["files"])


def test_a_truncated_and_a_missing_file_resume_from_the_newest_intact_checkpoint(runs, shards, tmp_path):
    """ZeRO-3: the newest checkpoint's rank-1 optimizer state cut short after its COMPLETE marker (the
    reported case: an OSError traceback from torch.load), the one before it missing a rank's model state."""
    root = copy_checkpoints(runs, "cpu_zero3", tmp_path)
    cut = root / "step00000012" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = cut.stat().st_size
    with open(cut, "r+b") as f:
        f.truncate(size // 2)
    (root / "step00000009" / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()

    r = train(tmp_path, shards, "cpu_zero3", resume=True)
    note = next(line for line in r.stdout.splitlines() if line.startswith("using "))
    assert note == (f"using step00000006, the newest intact checkpoint: step00000012 is damaged "
                    f"(zero_pp_rank_1_mp_rank_00_optim_states.pt: {size // 2} bytes, {size} written), moved aside "
                    f"to step00000012.damaged; step00000009 is damaged (zero_pp_rank_0_mp_rank_00_model_states.pt: "
                    f"missing), moved aside to step00000009.damaged")
    assert "resumed from" in r.stdout and "step00000006" in r.stdout
    # Nothing deleted: the damaged checkpoints are kept aside, and retention (keep 4) passes them by.
    assert (root / "step00000012.damaged" / cut.name).stat().st_size == size // 2
    assert completed(tmp_path) == [f"step{s:08d}" for s in (3, 6, 9, 12)]
    undamaged = metric_steps(runs["cpu_zero3"][0], "val/loss")
    got = metric_steps(tmp_path, "val/loss")
    for step in (10, 12):
        assert got[step] == pytest.approx(undamaged[step], abs=1e-6), step


def test_a_flipped_byte_is_found_and_a_checkpoint_without_checksums_is_used_unchecked(runs, shards, tmp_path):
    """ZeRO-2: one byte of rank 0's model state flipped (same size); the checkpoint before it written as an
    earlier release wrote them (an empty COMPLETE): accepted, and said once."""
    root = copy_checkpoints(runs, "cpu_zero2", tmp_path)
    flipped = root / "step00000012" / "mp_rank_00_model_states.pt"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    (root / "step00000009" / "COMPLETE").write_bytes(b"")

    r = train(tmp_path, shards, "cpu_zero2", resume=True)
    assert r.stdout.count("written without checksums") == 1, r.stdout[-3000:]
    assert (f"{root}/step00000009 was written without checksums (an earlier release): used unchecked"
            in r.stdout)
    assert ("using step00000009, the newest checkpoint left: step00000012 is damaged (mp_rank_00_model_states.pt: "
            "SHA-256 differs from the one written (same size)), moved aside to step00000012.damaged") in r.stdout
    undamaged, got = metric_steps(runs["cpu_zero2"][0], "val/loss"), metric_steps(tmp_path, "val/loss")
    for step in (10, 12):
        assert got[step] == pytest.approx(undamaged[step], abs=1e-6), step


def test_with_every_checkpoint_damaged_the_run_ends_2_on_one_line(runs, shards, tmp_path):
    root = copy_checkpoints(runs, "cpu_zero2", tmp_path)
    for ckpt in completed(tmp_path):
        (root / ckpt / "trainer_state.json").write_text("{}")
    r = run_tool(command(tmp_path, shards, ds="cpu_zero2", steps=STEPS, extra=[*EXTRA, "--resume", "auto"])[1:],
                 timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert errors[0].startswith(f"error: no intact checkpoint to resume from under {root}: step00000012 is damaged "
                                "(trainer_state.json: 2 bytes, ")
    assert errors[0].count("is damaged") == 4
    assert completed(tmp_path) == [] and len(list(root.glob("step*.damaged"))) == 4


def test_consolidation_checks_the_checkpoint_first(runs, tmp_path):
    root = copy_checkpoints(runs, "cpu_zero3", tmp_path)
    (root / "step00000012" / "ema.safetensors").unlink()
    named = run_tool(["tools/consolidate_checkpoint.py", str(root / "step00000012"), "--out", str(tmp_path / "b")])
    assert named.returncode == 2 and "Traceback" not in named.stderr
    assert f"error: checkpoint {root}/step00000012 is damaged: ema.safetensors: missing" in named.stderr
    assert (root / "step00000012").is_dir()  # named by the user: reported, left where it is
    newest = run_tool(["tools/consolidate_checkpoint.py", str(root), "--out", str(tmp_path / "b")])
    assert newest.returncode == 0, newest.stderr[-2000:]
    assert "using step00000009, the newest intact checkpoint: step00000012 is damaged" in newest.stdout
    assert "consolidating" in newest.stdout and "step00000009" in newest.stdout
    assert (tmp_path / "b").is_dir() and (root / "step00000012.damaged").is_dir()
