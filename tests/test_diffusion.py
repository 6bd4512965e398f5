import dataclasses

import pytest
import torch

from tryon_ds.diffusion import GaussianDiffusion, dynamic_threshold, make_betas
from tryon_ds.cascade import CascadeUNet
from tryon_ds.tools.bench_model import random_batch


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedules_decrease_from_one_to_zero(schedule):
    d = GaussianDiffusion(1000, schedule)
    ac = d.alphas_cumprod
    assert ac.shape == (1000,) and (ac[1:] < ac[:-1]).all()
    assert 0.99 < ac[0] <= 1 and 0 <= ac[-1] < 0.01
    assert (make_betas(schedule, 1000) > 0).all()


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_target_inverts_to_x0_and_eps(objective):
    d = GaussianDiffusion(1000, "cosine", objective)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 998])
    x_t = d.q_sample(x0, t, noise)
    x0_hat, eps_hat = d.x0_and_eps(x_t, t, d.target(x0, t, noise))
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, noise, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("objective", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_with_an_oracle_denoiser_recovers_the_image(objective, eta):
    """A model that knows x0 must lead both DDPM (eta=1) and DDIM (eta=0) to exactly that x0."""
    d = GaussianDiffusion(1000, "cosine", objective)
    x0 = torch.rand(2, 3, 8, 8) * 1.6 - 0.8

    def oracle(x, t):
        eps = (x - d.sqrt_ac[t].view(-1, 1, 1, 1) * x0) / d.sqrt_1m_ac[t].view(-1, 1, 1, 1)
        return d.target(x0, t, eps)

    out = d.sample(oracle, x0.shape, steps=20, eta=eta, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    # Started part-way (SDEdit) from a blurred guess noised there, the oracle still leads to x0.
    guess = torch.nn.functional.avg_pool2d(x0, 3, 1, 1)
    out = d.sample(oracle, x0.shape, steps=8, eta=eta, generator=torch.Generator().manual_seed(0), start=(guess, 0.3))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    assert d.sample_timesteps(8, first=299)[0] == 299


def test_sample_timesteps_descend_to_zero():
    d = GaussianDiffusion(1000)
    ts = d.sample_timesteps(50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert GaussianDiffusion(10).sample_timesteps(50) == list(range(9, -1, -1))


def test_dynamic_threshold_bounds_and_keeps_in_range_images():
    x = torch.randn(3, 3, 16, 16) * 3
    y = dynamic_threshold(x, 0.95)
    assert y.abs().max() <= 1.0
    inside = torch.rand(2, 3, 4, 4) * 2 - 1
    torch.testing.assert_close(dynamic_threshold(inside, 0.95), inside)


def _loss_with(model, batch, seed):
    torch.manual_seed(seed)
    return model(batch)


def test_cfg_dropout_really_drops_the_conditioning(tiny_config):
    """With cond_drop_prob=1 the loss cannot depend on the ca image, garment or poses; with 0 it does."""
    for p_drop, should_match in ((1.0, True), (0.0, False)):
        cfg = dataclasses.replace(tiny_config, diffusion=dataclasses.replace(tiny_config.diffusion,
                                                                             cond_drop_prob=p_drop))
        model = CascadeUNet(cfg, 1)
        for p in model.parameters():
            if p.abs().sum() == 0:
                torch.nn.init.normal_(p, std=0.05)
        a = random_batch(cfg, 1, 2, torch.Generator().manual_seed(1))
        b = random_batch(cfg, 1, 2, torch.Generator().manual_seed(2))
        b["person"] = a["person"]
        same = torch.equal(_loss_with(model, a, 0), _loss_with(model, b, 0))
        assert same == should_match, p_drop


def test_cfg_dropout_rate(tiny_config, monkeypatch):
    cfg = tiny_config
    model = CascadeUNet(cfg, 1)
    seen = []
    original = model.unet.forward
    monkeypatch.setattr(model.unet, "forward", lambda *a, **kw: (seen.append(kw["drop_cond"]), original(*a, **kw))[1])
    torch.manual_seed(0)
    batch = random_batch(cfg, 1, 64)
    for _ in range(8):
        model(batch)
    rate = torch.cat(seen).float().mean().item()
    assert 0.05 < rate < 0.16, rate


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_cascade_sampling_gives_finite_deterministic_images_in_range(tiny_config, sampler):
    base, sr = CascadeUNet(tiny_config, 1).eval(), CascadeUNet(tiny_config, 2).eval()
    for model in (base, sr):
        for p in model.parameters():
            if p.abs().sum() == 0:
                torch.nn.init.normal_(p, std=0.02)
    batch = random_batch(tiny_config, 1, 2)
    cond = {k: v for k, v in batch.items() if k != "person"}
    low = base.sample(cond, steps=4, sampler=sampler, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert low.shape == (2, 3, 32, 32) and torch.isfinite(low).all() and low.abs().max() <= 1
    again = base.sample(cond, steps=4, sampler=sampler, guidance=2.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(low, again, rtol=0, atol=0)
    hi_cond = {k: torch.nn.functional.interpolate(v, size=(64, 64)) if v.dim() == 4 else v for k, v in cond.items()}
    high = sr.sample(hi_cond, lowres=low, steps=3, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert high.shape == (2, 3, 64, 64) and torch.isfinite(high).all() and high.abs().max() <= 1
