import dataclasses
import warnings

import pytest
import torch

from tryon_ds.config import preset
from tryon_ds.model import ParallelUNet
from tryon_ds.model import attention as attention_module
from tryon_ds.model.attention import attention
from tryon_ds.cascade import CascadeUNet
from tryon_ds.tools.bench_model import random_batch


def _count_on_meta(name, unet):
    with torch.device("meta"):
        unet = ParallelUNet(preset(name), lowres_cond=unet == 2)
    assert all(p.is_meta for p in unet.parameters())
    return sum(p.numel() for p in unet.parameters())


@pytest.mark.parametrize("name, unet, target", [("base", 1, 850e6), ("sr", 2, 950e6)])
def test_preset_parameter_counts_on_meta(name, unet, target):
    assert abs(_count_on_meta(name, unet) - target) <= 0.05 * target


def test_tiny_preset_is_small():
    assert _count_on_meta("tiny", 1) < 5e6 and _count_on_meta("tiny", 2) < 5e6


@pytest.mark.parametrize("unet", [1, 2])
def test_shapes_and_gradients_reach_both_unets_and_pose_embeddings(tiny_config, unet):
    model = CascadeUNet(tiny_config, unet)
    batch = random_batch(tiny_config, unet, 2)
    # Zero-initialised output layers give zero gradients upstream at step 0; perturb them as training would.
    for p in model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    t = torch.tensor([10, 500])
    cond = {k: v for k, v in batch.items() if k not in ("person", "lowres")}
    level = None
    if unet == 2:
        cond["lowres"] = torch.nn.functional.interpolate(batch["lowres"], size=batch["person"].shape[-2:])
        level = torch.tensor([0, 100])
    out = model.unet(batch["person"], t, cond, lowres_noise_level=level)
    assert out.shape == batch["person"].shape
    model.zero_grad()
    model(batch).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for prefix in ("unet.person_in", "unet.garment_in", "unet.person_pose", "unet.garment_pose",
                   "unet.time_embed", "unet.person_down", "unet.garment_down", "unet.garment_up"):
        reached = [g for n, g in grads.items() if n.startswith(prefix) and g is not None and g.abs().sum() > 0]
        assert reached, f"no gradient reaches {prefix}"
    if unet == 2:
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("unet.noise_aug"))


@pytest.mark.parametrize("unet", [1, 2])
def test_loss_in_bf16_weights(tiny_config, unet):
    """DeepSpeed's bf16 mode casts the module to bf16 and feeds it fp32 batches and integer timesteps."""
    model = CascadeUNet(tiny_config, unet).to(torch.bfloat16)
    loss = model(random_batch(tiny_config, unet, 2))
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert all(p.grad is None or p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_missing_garment_pose_changes_the_output(tiny_config):
    """Absence is an input: masking the garment pose must change what the model computes."""
    model = CascadeUNet(tiny_config, 1).eval()
    for p in model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    batch = random_batch(tiny_config, 1, 2)
    cond = {k: v for k, v in batch.items() if k != "person"}
    t = torch.tensor([100, 100])
    full = model.unet(batch["person"], t, cond)
    cond["garment_pose_valid"] = torch.zeros_like(cond["garment_pose_valid"])
    assert not torch.allclose(full, model.unet(batch["person"], t, cond))


def test_attention_backends_agree():
    q, k, v = (torch.randn(2, 4, 37, 16, dtype=torch.float32) for _ in range(3))
    k, v = k[:, :, :29], v[:, :, :29]
    torch.testing.assert_close(attention(q, k, v, "sdpa"), attention(q, k, v, "math"), atol=1e-5, rtol=1e-5)


def test_xformers_unavailable_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(attention_module, "_warned", set())
    q = torch.randn(1, 2, 8, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = attention(q, q, q, "xformers")
        out2 = attention(q, q, q, "xformers")
    assert len([w for w in caught if "xformers" in str(w.message)]) == 1
    torch.testing.assert_close(out1, attention(q, q, q, "math"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out1, out2)


def test_unknown_backend_is_an_error():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="expected one of"):
        attention(q, q, q, "flash9")


def test_activation_checkpointing_gives_same_loss_and_gradients(tiny_config):
    cfg = dataclasses.replace(tiny_config, unet2=dataclasses.replace(tiny_config.unet2, checkpointing=False))
    cfg_ckpt = dataclasses.replace(tiny_config, unet2=dataclasses.replace(tiny_config.unet2, checkpointing=True))
    plain, ckpt = CascadeUNet(cfg, 2), CascadeUNet(cfg_ckpt, 2)
    ckpt.load_state_dict(plain.state_dict())
    batch = random_batch(cfg, 2, 2)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(1)
        loss = model(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-6, atol=1e-7, msg=name)
