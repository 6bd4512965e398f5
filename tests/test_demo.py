"""The README's main job, shortened (tools/demo.py --quick): every UNet runs and leaves its outputs, and the
quality table is finite and computed on the garment region."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tryon_ds.evaluation import QualityTable, garment_region, mean_colour_fill, tryon_candidates

# Real multi-rank or multi-process runs: the full suite, not the fast tier (-m "not slow").
pytestmark = pytest.mark.slow


def test_demo_quick_runs_every_stage(demo_quick):
    out, stdout = demo_quick
    for unet, steps in ((1, 4), (2, 3), (3, 3)):
        assert list((out / "checkpoints" / f"unet{unet}").glob("step*/COMPLETE"))
        assert (out / "bundle" / f"unet{unet}" / "ema.safetensors").is_file()
        # a quality pass at each run's last step, and the bundle holds the best (that step)
        metrics = [json.loads(line) for line in
                   (out / "outputs" / f"metrics_unet{unet}.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics if "quality/psnr_region" in m] == [steps]
        selected = json.loads((out / "bundle" / f"unet{unet}" / "config.json").read_text())["selected"]
        assert selected["by"] == "best" and selected["step"] == steps
    grid = Image.open(out / "results" / "grid.png")
    assert grid.size == (4 * 128, 8 * 128)  # the cascade's output: UNet 3's 128 px
    quality = json.loads((out / "quality.json").read_text())
    assert quality["pairs"] == 4
    assert all(np.isfinite(v) for row in quality["rows"].values() for v in row.values())
    assert 0 < quality["region_pixels"] < 128 * 128
    for n in (2, 3):
        sr = quality["sr_alone"][f"unet{n}"]
        assert sr["pairs"] == 2 and set(sr["rows"]) == {f"UNet {n} from the true low-res", "bilinear upsampling"}
        assert f"UNet {n} alone, given the true low-res image" in stdout
    assert "quality table" in stdout and "garment region" in stdout
    # The field's table: SSIM and PSNR computed; FID/KID and LPIPS skipped, naming the files they need.
    field = quality["field"]["all"]
    assert set(field) == {"128x128", "64x64"} and 0 < field["64x64"]["paired"]["ssim"] <= 1
    assert field["128x128"]["paired"]["fid"] is None and field["128x128"]["paired"]["lpips"] is None
    assert "FID and KID skipped: no inception-2015-12-05.pt given" in stdout
    assert "LPIPS (alex) skipped: no alexnet-owt-7be5be79.pth given" in stdout
    assert "| all | 128x128 | - | 4 |" in stdout  # no reference set without the Inception


def test_region_metrics_only_see_the_garment_region():
    """Errors outside the region change the whole-image numbers and leave the region's untouched."""
    target = torch.zeros(1, 3, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    batch = {"person": target, "ca": target, "garment": torch.ones(1, 3, 32, 32), "mask": mask}
    result = target.clone()
    result[..., :2, :] = 1.0  # wrong outside the region, beyond the SSIM window (5 px) around it
    table = QualityTable()
    table.add(tryon_candidates(result, batch), batch)
    ours = table.rows()["try-on (cascade)"]
    assert ours["psnr_region"] == pytest.approx(100.0) and ours["ssim_region"] > 0.99
    assert ours["psnr"] < 20 and table.region_pixels == 256
    assert torch.equal(garment_region(batch), mask)


def test_mean_colour_baseline_fills_only_the_region_with_the_garment_colour():
    ca = torch.full((1, 3, 8, 8), -1.0)
    garment = torch.ones(1, 3, 8, 8)  # white background...
    garment[:, 0, 2:6, 2:6] = 0.2  # ...and a garment of colour (0.2, 1, 1)
    region = torch.zeros(1, 1, 8, 8)
    region[..., :2, :2] = 1
    filled = mean_colour_fill(ca, garment, region)
    assert torch.allclose(filled[0, :, 0, 0], torch.tensor([0.2, 1.0, 1.0]))
    assert torch.equal(filled[..., 4:, 4:], ca[..., 4:, 4:])
