import dataclasses

import pytest
import torch

from tryon_ds.diffusion import GaussianDiffusion, dynamic_threshold, make_betas
from tryon_ds.cascade import CascadeUNet
from tryon_ds.cascade import random_batch


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
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp"])
def test_sampler_with_an_oracle_denoiser_recovers_the_image(objective, sampler):
    """A model that knows x0 must lead DDPM, DDIM and DPM-Solver++(2M) to exactly that x0."""
    d = GaussianDiffusion(1000, "cosine", objective)
    x0 = torch.rand(2, 3, 8, 8) * 1.6 - 0.8

    def oracle(x, t):
        eps = (x - d.sqrt_ac[t].view(-1, 1, 1, 1) * x0) / d.sqrt_1m_ac[t].view(-1, 1, 1, 1)
        return d.target(x0, t, eps)

    out = d.sample(oracle, x0.shape, steps=20, sampler=sampler, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    # Started part-way (SDEdit) from a blurred guess noised there, the oracle still leads to x0.
    guess = torch.nn.functional.avg_pool2d(x0, 3, 1, 1)
    out = d.sample(oracle, x0.shape, steps=8, sampler=sampler, generator=torch.Generator().manual_seed(0),
                   start=(guess, 0.3))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    assert d.sample_timesteps(8, first=299)[0] == 299


def _k_diffusion_dpmpp_2m(model, x, sigmas):
    """k-diffusion's sample_dpmpp_2m (crowsonkb/k-diffusion, k_diffusion/sampling.py), transcribed: the
    variance-exploding form, x = x0 + sigma * eps, time t = -log(sigma), model(x, sigma) -> denoised x0."""
    t_fn, sigma_fn = (lambda s: -s.log()), (lambda t: t.neg().exp())
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_dpmpp_2m_takes_the_reference_implementations_steps(objective):
    """Our DPM-Solver++(2M) in the variance-preserving form, with an imperfect model (the predicted x0 is
    shrunk and shifted, as a real one errs), equals k-diffusion's update rule run in its variance-exploding
    form on the same sigmas (sigma = sqrt((1 - a) / a), x_VE = x_VP / sqrt(a)), step for step."""
    d = GaussianDiffusion(1000, "cosine", objective)
    truth = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 1.6 - 0.8

    def x0_of(x_vp, t):  # a model's guess of x0 from x_t: not the truth, and dependent on x_t
        a = d.alphas_cumprod[t].double().view(-1, 1, 1, 1)
        return 0.8 * truth + 0.1 * x_vp / a.sqrt() + 0.05

    def model(x, t):  # as a UNet answers: eps or v for that x0
        a = d.alphas_cumprod[t].double().view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0_of(x, t)) / (1 - a).sqrt()
        return eps if objective == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0_of(x, t)

    start = torch.randn(truth.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ts = d.sample_timesteps(12)
    ours = d.sample(model, truth.shape, 12, "dpmpp", generator=torch.Generator().manual_seed(3), threshold=None,
                    dtype=torch.float64)
    # The reference on the same schedule: the VE sigmas of our timesteps, then 0 (x0).
    ac = d.alphas_cumprod.double()
    sigmas = torch.cat([((1 - ac[ts]) / ac[ts]).sqrt(), torch.zeros(1, dtype=torch.float64)])
    by_sigma = dict(zip(sigmas.tolist(), ts))

    def denoiser(x_ve, sigma):  # the same model, asked in VE terms; static clip as our threshold=None does
        t = torch.full((len(x_ve),), by_sigma[float(sigma)])
        x_vp = x_ve * ac[t].sqrt().view(-1, 1, 1, 1)
        return x0_of(x_vp, t).clamp(-1, 1)

    reference = _k_diffusion_dpmpp_2m(denoiser, start * (1 + sigmas[0] ** 2).sqrt(), sigmas)
    # Our coefficients come from the schedule's float32 tables: agreement to ~1e-5, where a first-order
    # solver (DDIM, the same ODE) is 1e-2 away: the second-order correction is the reference's.
    torch.testing.assert_close(ours, reference, rtol=0, atol=5e-5)
    ddim = d.sample(model, truth.shape, 12, "ddim", generator=torch.Generator().manual_seed(3), threshold=None,
                    dtype=torch.float64)
    assert (ddim - reference).abs().max() > 1e-2


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
    high = sr.sample({**hi_cond, "lowres": low}, steps=3, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert high.shape == (2, 3, 64, 64) and torch.isfinite(high).all() and high.abs().max() <= 1
