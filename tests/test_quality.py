"""Quality measured while training, and the best model kept (tryon_ds/training/quality.py, the best record in
tryon_ds/training/checkpoint.py): a real 2-rank run whose quality passes, checkpoints and retention run at
frequencies that are not multiples of each other, resumed, and its best consolidated; and what a user who
hands a checkpoint to inference is told."""
import json
import shutil
import sys

import pytest

from conftest import ROOT, command, completed, run, run_tool
from tryon_ds.errors import ConfigError
from tryon_ds.training import checkpoint

sys.path.insert(0, str(ROOT / "tests" / "helpers"))

STEPS = 10
# The settings: passes at 3, 6, 9 and the last step; checkpoints at 2, 4, 6, 8, 10; one kept.
EXTRA = ["--set", "quality_freq=3", "--set", "quality_samples=6", "--set", "checkpoint_freq=2",
         "--set", "logging.keep_checkpoints=1", "--set", "validation_freq=4", "--set", "log_freq=5"]


def logged(run_dir, prefix="quality/"):
    entries = [json.loads(line) for line in (run_dir / "out" / "metrics_unet1.jsonl").read_text().splitlines()]
    return {e["step"]: {k: v for k, v in e.items() if k.startswith(prefix)} for e in entries
            if any(k.startswith(prefix) for k in e)}


@pytest.fixture(scope="module")
def best_run(shards, tmp_path_factory):
    from tiny_inception import save

    run_dir = tmp_path_factory.mktemp("best")
    save(run_dir / "inception.pt")  # a stand-in Inception: the FID/KID plumbing, from the trainer's flag
    extra = [*EXTRA, "--inception_weights", str(run_dir / "inception.pt")]
    return run_dir, run(command(run_dir, shards, steps=STEPS, extra=extra, launcher="torchrun"))


@pytest.mark.slow
def test_passes_at_their_steps_and_the_best_checkpoint_kept_beside_the_newest(best_run, tmp_path):
    run_dir, r = best_run
    passes = logged(run_dir)
    assert sorted(passes) == [3, 6, 9, 10], r.stdout[-3000:]
    for figures in passes.values():
        assert {"quality/psnr", "quality/ssim", "quality/psnr_region", "quality/ssim_region",
                "quality/seconds"} <= set(figures)
        assert 0 < figures["quality/ssim_region"] <= 1 and figures["quality/psnr_region"] > 0
    # FID/KID of the 6 samples against their own ground truth (the stand-in Inception); no LPIPS weights given
    assert all(f["quality/fid"] >= 0 and "quality/kid_x1000" in f and "quality/lpips" not in f for f in passes.values())
    assert "LPIPS (alex) skipped: no alexnet-owt-7be5be79.pth given" in r.stdout
    # the best is the highest garment-region PSNR of the passes (the default best_metric), first reached
    values = {step: f["quality/psnr_region"] for step, f in passes.items()}
    best = max(values, key=lambda s: (values[s], -s))
    record = json.loads((run_dir / "ckpt" / "unet1" / "BEST.json").read_text())
    assert record == {"checkpoint": f"step{best:08d}", "step": best, "metric": "quality/psnr_region", "mode": "max",
                      "value": values[best]}
    # retention keeps the newest (keep_checkpoints 1) and the best, whichever steps they are
    assert completed(run_dir) == sorted({f"step{best:08d}", f"step{STEPS:08d}"})
    assert (run_dir / "out" / "samples" / f"unet1_quality_step{STEPS:08d}.png").is_file()

    # --best consolidates it, and the bundle says what it holds
    bundle = tmp_path / "bundle"
    c = run_tool(["tools/consolidate_checkpoint.py", str(run_dir / "ckpt" / "unet1"), "--best", "--out", str(bundle)])
    assert c.returncode == 0, c.stderr
    meta = json.loads((bundle / "unet1" / "config.json").read_text())
    assert meta["step"] == best and meta["selected"] == {"by": "best", "metric": "quality/psnr_region",
                                                         "mode": "max", "value": values[best], "step": best}
    assert f"the best by quality/psnr_region = {values[best]:.4g}" in c.stdout


@pytest.mark.slow
def test_a_resumed_run_knows_its_best_and_a_fresh_one_measures_its_own(best_run, shards, tmp_path):
    run_dir, _ = best_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed, ignore=shutil.ignore_patterns("logs"))
    record = json.loads((resumed / "ckpt" / "unet1" / "BEST.json").read_text())
    # 3 more steps: a pass at 12 and at the last step, 13, each held against the best the first run found
    r = run(command(resumed, shards, steps=STEPS + 3, extra=[*EXTRA, "--resume", "auto"], launcher="torchrun"))
    assert f"best so far: step {record['step']}, quality/psnr_region {record['value']:.4g}" in r.stdout
    after = logged(resumed)
    assert sorted(after) == [3, 6, 9, 10, 12, 13]
    new = {s: after[s]["quality/psnr_region"] for s in (12, 13)}
    now = json.loads((resumed / "ckpt" / "unet1" / "BEST.json").read_text())
    if max(new.values()) > record["value"]:
        assert now["step"] == max(new, key=lambda s: (new[s], -s))
    else:  # not beaten: the first run's best survives the resumed run's retention
        assert now == record and f"step{record['step']:08d}" in completed(resumed)
    assert completed(resumed)[-1] == f"step{STEPS + 3:08d}"

    fresh = run(command(resumed, shards, steps=3, extra=EXTRA, launcher="torchrun"))
    assert "set aside as BEST.json.earlier: this fresh run keeps its own" in fresh.stdout
    assert json.loads((resumed / "ckpt" / "unet1" / "BEST.json").read_text())["step"] == 3


def test_best_metric_is_checked_at_start_up(tiny_config):
    import dataclasses

    assert tiny_config.best() == ("val/loss", "min")  # no quality pass: the validation loss
    on = dataclasses.replace(tiny_config, quality_freq=100)
    assert on.best() == ("quality/psnr_region", "max")
    assert dataclasses.replace(on, best_metric="quality/fid").best() == ("quality/fid", "min")
    assert dataclasses.replace(on, best_metric="val/loss", best_mode="max").best() == ("val/loss", "max")
    assert dataclasses.replace(tiny_config, quality_freq=0, validation_freq=0).best() is None
    assert dataclasses.replace(on, best_metric="none").best() is None
    with pytest.raises(ConfigError, match=r"'best_metric': 'quality/psnr' is not measured by this run; it measures "
                                          r"val/loss"):
        dataclasses.replace(tiny_config, best_metric="quality/psnr").validate()
    with pytest.raises(ConfigError, match="best_mode"):
        from tryon_ds.config import build_config, read_config_file
        build_config({**read_config_file(ROOT / "configs" / "tiny.yaml"), "best_mode": "highest"})


def make_checkpoint(root, step):
    folder = root / f"step{step:08d}"
    folder.mkdir(parents=True)
    (folder / "COMPLETE").write_text("{}")
    return folder


def test_retention_never_removes_the_best(tmp_path):
    root = tmp_path / "unet1"
    for step in (2, 4, 6, 8):
        make_checkpoint(root, step)
    checkpoint.prune(root, keep=1, protect="step00000004")
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step00000004", "step00000008"]
    checkpoint.prune(root, keep=1, protect="step00000008")
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step00000008"]


def test_checkpoints_handed_to_inference_get_the_command_that_makes_a_bundle(tmp_path):
    root = tmp_path / "checkpoints"
    step = make_checkpoint(root / "unet1", 6)
    make_checkpoint(root / "unet2", 4)
    checkpoint.write_best(root / "unet1", {"checkpoint": step.name, "step": 6, "metric": "quality/psnr_region",
                                           "mode": "max", "value": 12.0})
    both = ("python tools/consolidate_checkpoint.py {0}/unet1 --best --out bundle/; "
            "python tools/consolidate_checkpoint.py {0}/unet2 --best --out bundle/").format(root)
    for given in (root, root / "best_model.pt"):  # the training guide's path
        r = run_tool(["tools/infer.py", "--checkpoint", str(given), "--ca_image", "x.png", "--garment_image", "y.png"])
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert both in r.stderr and "then pass --checkpoint bundle/" in r.stderr
    assert (f"`python tools/consolidate_checkpoint.py {root / 'unet2'} --out bundle/`"
            in checkpoint.consolidate_hint(root / "unet2" / "step00000004"))  # no BEST.json there: the newest
    r = run_tool(["tools/consolidate_checkpoint.py", str(root / "unet2"), "--best", "--out", str(tmp_path / "b")])
    assert r.returncode == 2 and f"{root / 'unet2'} has no BEST.json" in r.stderr
    (root / "unet1" / "BEST.json").write_text("{")
    r = run_tool(["tools/consolidate_checkpoint.py", str(root / "unet1"), "--best", "--out", str(tmp_path / "b")])
    assert r.returncode == 2 and "BEST.json is not readable JSON" in r.stderr
    assert checkpoint.consolidate_hint(tmp_path / "nothing-here") is None
