"""The field's metrics against independent computations on known inputs: FID (clean-fid's formula), KID
(its unbiased estimator, and its spread over subsets), SSIM (scikit-image's implementation of the published
convention), LPIPS (lpips v0.1's formula for each of its nets, with the same weights read from files as
torchvision and lpips name them), the clean resize (PIL's bicubic per channel)."""
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


@pytest.mark.parametrize("n1, n2", [(8, 8), (5, 11), (63, 63), (64, 64), (70, 20)])
def test_fid_with_fewer_samples_than_features_is_the_closed_form(n1, n2):
    """A test split has fewer samples than Inception has features, and the covariances are then singular:
    the sample-space route (the singular values of a b^T) and the feature-space one (eigenvalues of S1 S2)
    both give the symmetric-square-root closed form, on either side of N = D (64 here)."""
    d = 64
    g = torch.Generator().manual_seed(n1 * 100 + n2)
    a = torch.randn(n1, d, generator=g, dtype=torch.float64) * 2 + 1
    b = torch.randn(n2, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    root = _sym_sqrt(s1)
    diff = a.mean(0) - b.mean(0)
    closed = float(diff @ diff + s1.trace() + s2.trace() - 2 * _sym_sqrt(root @ s2 @ root).trace())
    # the closed form takes square roots of the rounding-level eigenvalues a singular covariance has where
    # it should have zeros (each ~1e-7 after the root): it is good to about 1e-8 here, not 1e-9
    assert metrics.frechet_distance(a, b) == pytest.approx(closed, rel=3e-8)
    assert abs(metrics.frechet_distance(a, a)) < 1e-8 * float(s1.trace())


def test_kid_is_the_unbiased_mmd_of_the_cubic_polynomial_kernel():
    """With as many samples as the subset size, every subset is the whole set: the average equals the formula,
    and the subsets do not spread."""
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(30, 8, generator=g, dtype=torch.float64), torch.randn(30, 8, generator=g, dtype=torch.float64) + 0.3
    m, d = 30, 8
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    off = ~torch.eye(m, dtype=torch.bool)
    mmd = k(real, real)[off].sum() / (m * (m - 1)) + k(fake, fake)[off].sum() / (m * (m - 1)) - 2 * k(real, fake).mean()
    mean, std = metrics.kernel_distance(real, fake, num_subsets=5, max_subset_size=1000)
    assert mean == pytest.approx(float(mmd), rel=1e-9) and std < 1e-12


def test_kids_spread_is_the_std_of_the_subsets_mmd_as_torch_fidelity_reports_it():
    """On subsets smaller than the sets, each subset's unbiased MMD^2 (torch-fidelity's ``mmd2``, another
    arrangement of the sums) from the same draws: their mean and their (population) std."""
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(30, 6, generator=g, dtype=torch.float64) + 0.2
    mean, std = metrics.kernel_distance(real, fake, num_subsets=50, max_subset_size=10, seed=7)
    draws, values = torch.Generator().manual_seed(7), []
    for _ in range(50):
        x = fake[torch.randperm(30, generator=draws)[:10]]
        y = real[torch.randperm(40, generator=draws)[:10]]
        kxx, kyy, kxy = ((a @ b.T / 6 + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = ~torch.eye(10, dtype=torch.bool)
        values.append(float(kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean()))
    assert mean == pytest.approx(float(np.mean(values)), rel=1e-9)
    assert std == pytest.approx(float(np.std(values)), rel=1e-9) and std > 0


@pytest.mark.parametrize("size", [(64, 48), (256, 192), (37, 23)])
def test_ssim_is_the_published_convention_whatever_torchmetrics_is_installed(size):
    """scikit-image's structural_similarity with Gaussian weights (sigma 1.5, population covariance), which
    crops the window's border as torchmetrics did up to 1.4.1 and LaDI-VTON's 0.11.4: equal to 1e-12. The
    installed torchmetrics (>= 1.4.2 averages the whole padded map) is measurably another number."""
    from skimage.metrics import structural_similarity
    g = torch.Generator().manual_seed(size[0])
    a = torch.rand(2, 3, *size, generator=g)
    b = (a + 0.3 * torch.rand(2, 3, *size, generator=g) - 0.15).clamp(0, 1)
    ours = metrics.ssim(a, b)
    for i in range(2):
        expected = structural_similarity(a[i].permute(1, 2, 0).double().numpy(), b[i].permute(1, 2, 0).double().numpy(),
                                         gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=1.0, channel_axis=2)
        assert float(ours[i]) == pytest.approx(float(expected), abs=1e-12)
    assert float(metrics.ssim(a, a).min()) == pytest.approx(1.0, abs=1e-12)
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure as installed
    except ImportError:
        return
    # A smooth picture and a gamma of it, where the padded border's windows see another structure.
    ramp = torch.linspace(0, 1, size[1])[None, None, None, :].expand(1, 3, *size)
    picture = (ramp + 0.05 * torch.rand(1, 3, *size, generator=g)).clamp(0, 1)
    assert abs(float(installed(picture, ramp ** 1.5, data_range=1.0)) - float(metrics.ssim(picture, ramp ** 1.5))) > 0.003


def test_the_clean_resize_is_pils_bicubic_per_channel():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 37, 23), generator=g, dtype=torch.uint8)
    out = metrics.clean_resize(images)
    for i in range(2):
        for c in range(3):
            channel = Image.fromarray(images[i, c].numpy().astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC)
            np.testing.assert_array_equal(out[i, c].numpy(), np.asarray(channel).clip(0, 255))


# torchvision's layouts, written out here rather than read from tryon_ds: {features index: weight shape}.
ALEX = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
FIRES = {3: (64, 16, 64), 4: (128, 16, 64), 6: (128, 32, 128), 7: (256, 32, 128), 9: (256, 48, 192),
         10: (384, 48, 192), 11: (384, 64, 256), 12: (512, 64, 256)}  # squeezenet1_1: inplanes, squeeze, expand
VGG_BLOCKS = [[(0, 3, 64), (2, 64, 64)], [(5, 64, 128), (7, 128, 128)], [(10, 128, 256), (12, 256, 256), (14, 256, 256)],
              [(17, 256, 512), (19, 512, 512), (21, 512, 512)], [(24, 512, 512), (26, 512, 512), (28, 512, 512)]]
LIN_CHANNELS = {"alex": (64, 192, 384, 256, 256), "squeeze": (64, 128, 256, 384, 384, 512, 512),
                "vgg": (64, 128, 256, 512, 512)}
TRUNK_FILES = {"alex": "alexnet-owt-7be5be79.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth", "vgg": "vgg16-397923af.pth"}


def _trunk_shapes(net):
    if net == "alex":
        return {f"features.{i}": s for i, s in ALEX.items()}
    if net == "vgg":
        return {f"features.{i}": (o, c, 3, 3) for block in VGG_BLOCKS for i, c, o in block}
    shapes = {"features.0": (64, 3, 3, 3)}
    for i, (inplanes, squeeze, expand) in FIRES.items():
        shapes.update({f"features.{i}.squeeze": (squeeze, inplanes, 1, 1),
                       f"features.{i}.expand1x1": (expand, squeeze, 1, 1),
                       f"features.{i}.expand3x3": (expand, squeeze, 3, 3)})
    return shapes


def _trunk_and_lins(tmp_path, net):
    """Random weights under torchvision's names and lpips' v0.1 names, saved as their files are."""
    g = torch.Generator().manual_seed(0)
    trunk = {}
    for name, shape in _trunk_shapes(net).items():
        trunk[f"{name}.weight"] = torch.randn(shape, generator=g) * (2 / np.prod(shape[1:])) ** 0.5
        trunk[f"{name}.bias"] = torch.randn(shape[0], generator=g) * 0.01
    trunk["classifier.1.weight"] = torch.randn(4, 4, generator=g)  # the classifier is there too, and unused
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(LIN_CHANNELS[net])}
    torch.save(trunk, tmp_path / TRUNK_FILES[net])
    torch.save(lins, tmp_path / f"{net}.pth")
    return trunk, lins


def _taps(net, trunk, x):
    """lpips.pretrained_networks' taps of torchvision's features, written as functional calls."""
    def conv(x, name, **kw):
        return F.relu(F.conv2d(x, trunk[f"{name}.weight"], trunk[f"{name}.bias"], **kw))

    if net == "alex":
        r1 = conv(x, "features.0", stride=4, padding=2)
        r2 = conv(F.max_pool2d(r1, 3, 2), "features.3", padding=2)
        r3 = conv(F.max_pool2d(r2, 3, 2), "features.6", padding=1)
        r4 = conv(r3, "features.8", padding=1)
        return [r1, r2, r3, r4, conv(r4, "features.10", padding=1)]
    if net == "vgg":
        taps = []
        for b, block in enumerate(VGG_BLOCKS):
            x = F.max_pool2d(x, 2, 2) if b else x
            for i, _, _ in block:
                x = conv(x, f"features.{i}", padding=1)
            taps.append(x)
        return taps

    def fire(x, i):
        x = conv(x, f"features.{i}.squeeze")
        return torch.cat([conv(x, f"features.{i}.expand1x1"), conv(x, f"features.{i}.expand3x3", padding=1)], 1)

    def pool(x):
        return F.max_pool2d(x, 3, 2, ceil_mode=True)

    r1 = conv(x, "features.0", stride=2)
    r2 = fire(fire(pool(r1), 3), 4)
    r3 = fire(fire(pool(r2), 6), 7)
    r4 = fire(pool(r3), 9)
    r5 = fire(r4, 10)
    r6 = fire(r5, 11)
    return [r1, r2, r3, r4, r5, r6, fire(r6, 12)]


@pytest.mark.parametrize("net", ["alex", "squeeze", "vgg"])
def test_lpips_is_the_lpips_formula_with_the_files_weights_for_each_net(tmp_path, net):
    trunk, lins = _trunk_and_lins(tmp_path, net)
    model = metrics.LPIPS.from_files(net, tmp_path / TRUNK_FILES[net], tmp_path / f"{net}.pth", torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.rand(2, 3, 64, 48, generator=g) * 2 - 1, torch.rand(2, 3, 64, 48, generator=g) * 2 - 1

    def scaled(x):  # lpips' ScalingLayer
        return (x - torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)) / torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)

    total = 0
    for k, (a, b) in enumerate(zip(_taps(net, trunk, scaled(x0)), _taps(net, trunk, scaled(x1)))):
        na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + ((na - nb) ** 2 * lins[f"lin{k}.model.1.weight"]).sum(1).mean(dim=(1, 2))
    torch.testing.assert_close(model(x0, x1), total, rtol=1e-5, atol=1e-6)
    assert torch.equal(model(x0, x0), torch.zeros(2))
    other = "vgg" if net != "vgg" else "alex"  # another net's linear layers: one line naming both files
    _trunk_and_lins(tmp_path, other)
    with pytest.raises(UserError, match=f"not torchvision's .* and lpips' v0.1 {net}.pth"):
        metrics.LPIPS.from_files(net, tmp_path / TRUNK_FILES[net], tmp_path / f"{other}.pth", torch.device("cpu"))


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
        metrics.LPIPS.from_files("alex", tmp_path / "bad.pth", tmp_path / "bad.pth", torch.device("cpu"))
