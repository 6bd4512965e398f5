"""The field's metrics against independent computations on known inputs: FID (clean-fid's formula), KID
(its unbiased estimator), SSIM (torchmetrics), LPIPS (lpips v0.1's formula, with the same weights read from
files as torchvision and lpips name them), the clean resize (PIL's bicubic per channel)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tryon_ds import metrics
from tryon_ds.errors import UserError

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from tiny_inception import save as save_inception  # noqa: E402


def _features(mean: torch.Tensor, factor: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n samples whose sample mean is exactly ``mean`` and sample covariance exactly factor^T factor."""
    z = torch.randn(n, factor.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(z - z.mean(0))  # orthonormal, zero-mean columns
    return mean + (q * (n - 1) ** 0.5) @ factor


def _sym_sqrt(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(m)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def test_fid_is_zero_for_a_set_against_itself_and_the_closed_form_for_two_gaussians():
    d = 6
    g = torch.Generator().manual_seed(0)
    a = _features(torch.zeros(d, dtype=torch.float64), torch.randn(d, d, generator=g, dtype=torch.float64), 50, 1)
    assert abs(metrics.frechet_distance(a, a)) < 1e-8
    mu2 = torch.randn(d, generator=g, dtype=torch.float64)
    f2 = torch.randn(d, d, generator=g, dtype=torch.float64)
    b = _features(mu2, f2, 40, 2)
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    torch.testing.assert_close(s2, f2.T @ f2)
    # ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2): symmetric square roots, another route than ours.
    root = _sym_sqrt(s1)
    closed = float(mu2 @ mu2 + s1.trace() + s2.trace() - 2 * _sym_sqrt(root @ s2 @ root).trace())
    assert metrics.frechet_distance(a, b) == pytest.approx(closed, rel=1e-9)
    # Diagonal covariances: Tr sqrt(S1 S2) = sum sqrt(s1_i s2_i).
    da, db = torch.rand(d, generator=g, dtype=torch.float64) + 0.5, torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    x = _features(torch.zeros(d, dtype=torch.float64), torch.diag(da), 30, 3)
    y = _features(torch.ones(d, dtype=torch.float64), torch.diag(db), 30, 4)
    expected = d + float((da ** 2 + db ** 2 - 2 * da * db).sum())
    assert metrics.frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


def test_kid_is_the_unbiased_mmd_of_the_cubic_polynomial_kernel():
    """With as many samples as the subset size, every subset is the whole set: the average equals the formula."""
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(30, 8, generator=g, dtype=torch.float64), torch.randn(30, 8, generator=g, dtype=torch.float64) + 0.3
    m, d = 30, 8
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    off = ~torch.eye(m, dtype=torch.bool)
    mmd = k(real, real)[off].sum() / (m * (m - 1)) + k(fake, fake)[off].sum() / (m * (m - 1)) - 2 * k(real, fake).mean()
    assert metrics.kernel_distance(real, fake, num_subsets=5, max_subset_size=1000) == pytest.approx(float(mmd), rel=1e-9)


def test_ssim_is_torchmetrics_and_the_clean_resize_is_pils_bicubic_per_channel():
    from torchmetrics.image import StructuralSimilarityIndexMeasure
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 40, 30, generator=g), torch.rand(3, 3, 40, 30, generator=g)
    reference = StructuralSimilarityIndexMeasure(data_range=1.0, gaussian_kernel=True, kernel_size=11, sigma=1.5)
    assert float(metrics.ssim(a, b).mean()) == pytest.approx(float(reference(a, b)), rel=1e-6)
    images = torch.randint(0, 256, (2, 3, 37, 23), generator=g, dtype=torch.uint8)
    out = metrics.clean_resize(images)
    for i in range(2):
        for c in range(3):
            channel = Image.fromarray(images[i, c].numpy().astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC)
            np.testing.assert_array_equal(out[i, c].numpy(), np.asarray(channel).clip(0, 255))


def _alexnet_and_lins(tmp_path):
    """Random weights under torchvision's AlexNet names and lpips' v0.1 names, saved as their files are."""
    g = torch.Generator().manual_seed(0)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    trunk = {}
    for i, shape in shapes.items():
        trunk[f"features.{i}.weight"] = torch.randn(shape, generator=g) * (2 / np.prod(shape[1:])) ** 0.5
        trunk[f"features.{i}.bias"] = torch.randn(shape[0], generator=g) * 0.01
    trunk["classifier.1.weight"] = torch.randn(4, 4, generator=g)  # the classifier is there too, and unused
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
            for k, c in enumerate(metrics.LPIPS.CHANNELS)}
    torch.save(trunk, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(lins, tmp_path / "alex.pth")
    return trunk, lins


def test_lpips_is_the_lpips_formula_with_the_files_weights(tmp_path):
    trunk, lins = _alexnet_and_lins(tmp_path)
    model = metrics.LPIPS.from_files(tmp_path / "alexnet-owt-7be5be79.pth", tmp_path / "alex.pth", torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, torch.rand(2, 3, 64, 64, generator=g) * 2 - 1

    def direct(x):  # lpips.pretrained_networks.alexnet: relu1 .. relu5 of torchvision's features
        x = (x - torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)) / torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
        conv = lambda x, i, **kw: F.relu(F.conv2d(x, trunk[f"features.{i}.weight"], trunk[f"features.{i}.bias"], **kw))  # noqa: E731
        r1 = conv(x, 0, stride=4, padding=2)
        r2 = conv(F.max_pool2d(r1, 3, 2), 3, padding=2)
        r3 = conv(F.max_pool2d(r2, 3, 2), 6, padding=1)
        r4 = conv(r3, 8, padding=1)
        return [r1, r2, r3, r4, conv(r4, 10, padding=1)]

    total = 0
    for k, (a, b) in enumerate(zip(direct(x0), direct(x1))):
        na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + ((na - nb) ** 2 * lins[f"lin{k}.model.1.weight"]).sum(1).mean(dim=(1, 2))
    torch.testing.assert_close(model(x0, x1), total, rtol=1e-5, atol=1e-6)
    assert torch.equal(model(x0, x0), torch.zeros(2))


def test_metric_weights_come_from_flags_or_the_environment_and_a_missing_one_names_its_file(tmp_path, monkeypatch):
    monkeypatch.delenv("TRYON_INCEPTION_WEIGHTS", raising=False)
    assert metrics.weight_path("inception", None) is None
    note = metrics.missing_note("inception")
    assert "FID and KID skipped" in note and "inception-2015-12-05.pt" in note and "--inception_weights" in note
    save_inception(tmp_path / "inception.pt")
    monkeypatch.setenv("TRYON_INCEPTION_WEIGHTS", str(tmp_path / "inception.pt"))
    assert metrics.weight_path("inception", None) == tmp_path / "inception.pt"
    features = metrics.InceptionFeatures(tmp_path / "inception.pt", torch.device("cpu"))(
        torch.randint(0, 256, (3, 3, 64, 48), dtype=torch.uint8))
    assert features.shape == (3, 2048) and features.dtype == torch.float64
    with pytest.raises(UserError, match="--alexnet_weights / TRYON_ALEXNET_WEIGHTS: .*nowhere.pth does not exist"):
        metrics.weight_path("alexnet", str(tmp_path / "nowhere.pth"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.pth: not a readable weights file"):
        metrics.LPIPS.from_files(tmp_path / "bad.pth", tmp_path / "bad.pth", torch.device("cpu"))
