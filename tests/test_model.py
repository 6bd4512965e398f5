import dataclasses
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tryon_ds.config import preset
from tryon_ds.model import ParallelUNet
from tryon_ds.model.parallel_unet import WarpBlock
from tryon_ds.model import attention as attention_module
from tryon_ds.model.attention import attention
from tryon_ds.cascade import CascadeUNet
from tryon_ds.cascade import random_batch

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from fixed_inputs import fixed_inputs  # noqa: E402


def _count_on_meta(name, unet):
    with torch.device("meta"):
        model = ParallelUNet(preset(name), super_resolves=unet == 2)
    assert all(p.is_meta for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, unet, target, tolerance", [
    ("base", 1, 850e6, 0.05), ("sr", 2, 950e6, 0.05),             # the original training guide's sizes
    ("paper-base", 1, 1.13e9, 0.03), ("paper-sr", 2, 1.06e9, 0.03),  # the paper's
])
def test_preset_parameter_counts_on_meta(name, unet, target, tolerance):
    assert abs(_count_on_meta(name, unet) - target) <= tolerance * target


def test_tiny_presets_are_small():
    assert _count_on_meta("tiny", 1) < 5e6 and _count_on_meta("tiny-sr", 2) < 5e6


def _live(model, std=0.02):
    """Zero-initialised output layers give zero gradients upstream at step 0; perturb them as training would."""
    for p in model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=std)
    return model


@pytest.mark.parametrize("unet", [1, 2, 3, 4])
def test_every_family_at_every_place_of_a_four_unet_cascade_learns_and_samples(unet):
    """configs/tiny4.yaml: Parallel-UNets at places 1 (generating), 2 and 3 (super-resolving), an Efficient-UNet
    at 4, from configuration alone: each UNet's loss reaches every parameter, it embeds the noise level of
    exactly its noisy inputs, and it samples its whole image from the inputs its conditioning names."""
    from tryon_ds.config import build_config, read_config_file
    config = build_config(read_config_file(Path(__file__).parents[1] / "configs" / "tiny4.yaml"))
    model = _live(CascadeUNet(config, unet))
    assert type(config.unet(unet)).__name__ == ("EfficientUNetConfig" if unet == 4 else "ParallelUNetConfig")
    assert model.super_resolves == (unet > 1) and sorted(model.unet.noise_level_embed) == sorted(model.conditioning.noisy)
    batch = random_batch(config, unet, 2)
    torch.manual_seed(0)
    model(batch).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead
    out = model.eval().sample({k: batch[k] for k in model.conditioning.keys}, steps=2, sampler="ddim",
                              generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, *config.image_size(unet)) and torch.isfinite(out).all()


@pytest.mark.parametrize("unet", [1, 2])
def test_gradients_reach_every_parameter(tiny_config, unet):
    """Every parameter of the Parallel-UNet takes part: each noise-level embedding, every attention block
    after every attending block (down, middle and up), the pose tokens and their pooling, both UNets."""
    model = _live(CascadeUNet(tiny_config, unet))
    batch = random_batch(tiny_config, unet, 4)
    x, t, cond, levels = fixed_inputs(tiny_config, unet)
    assert model.unet(x, t, cond, levels).shape == x.shape
    model.zero_grad()
    torch.manual_seed(0)
    model(batch).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead
    assert sorted(model.unet.noise_level_embed) == sorted({1: ["ca", "garment"], 2: ["ca", "garment", "lowres"]}[unet])
    # one WarpBlock after each residual block of an attending level (down, middle, up), none elsewhere
    attends = tiny_config.unet(unet).attn_levels
    u = model.unet
    for i, level in enumerate(u.person_down):
        assert (len(level.attn) if level.attn is not None else 0) == (len(level.res) if attends[i] else 0)
    for k, level in enumerate(u.person_up):
        i = len(attends) - 1 - k
        assert (len(level.attn) if level.attn is not None else 0) == (len(level.res) if attends[i] else 0)
    assert len(u.person_mid.attn) == len(u.person_mid.res) == 2
    assert len(u.garment_up) == len(attends) - attends.index(True)  # the garment-UNet stops at its top attending level
    assert all(level.attn is None for level in [*model.unet.garment_down, model.unet.garment_mid, *model.unet.garment_up])


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
    model = _live(CascadeUNet(tiny_config, 1).eval(), std=0.05)
    x, t, cond, levels = fixed_inputs(tiny_config, 1)
    full = model.unet(x, t, cond, levels)
    cond["garment_pose_valid"] = torch.zeros_like(cond["garment_pose_valid"])
    assert not torch.allclose(full, model.unet(x, t, cond, levels))


@pytest.mark.parametrize("pose", ["person_pose", "garment_pose"])
def test_an_invalid_keypoint_is_never_attended_to_a_valid_one_is(tiny_config, pose):
    """Moving a keypoint marked invalid changes nothing (its token is the learned null token); moving a valid
    one changes the output."""
    model = _live(CascadeUNet(tiny_config, 1).eval(), std=0.05)
    x, t, cond, levels = fixed_inputs(tiny_config, 1)
    cond[f"{pose}_valid"][:, 3] = False
    cond[f"{pose}_valid"][:, 5] = True
    before = model.unet(x, t, cond, levels)
    moved = dict(cond)
    moved[pose] = cond[pose].clone()
    moved[pose][:, 3] = 1 - moved[pose][:, 3]
    torch.testing.assert_close(model.unet(x, t, moved, levels), before, rtol=0, atol=0)
    moved[pose][:, 5] = 1 - moved[pose][:, 5]
    assert not torch.allclose(model.unet(x, t, moved, levels), before)


@pytest.mark.parametrize("unet", [1, 2])
def test_a_conditioning_images_noise_level_changes_the_output(tiny_config, unet):
    """The UNet is told each conditioning image's noise level: the same pixels at another stated level give
    another output, and CascadeUNet noises each image to its own level (level 0 leaves it as is)."""
    model = _live(CascadeUNet(tiny_config, unet).eval(), std=0.05)
    x, t, cond, levels = fixed_inputs(tiny_config, unet)
    before = model.unet(x, t, cond, levels)
    for name in model.conditioning.noisy:
        other = {**levels, name: levels[name] + 0.3}
        assert not torch.allclose(model.unet(x, t, cond, other), before), name
    if unet == 2:
        cond = {**cond, "lowres": torch.rand(2, 3, *tiny_config.image_size(1)) * 2 - 1}
    zero = {k: torch.zeros(2) for k in model.conditioning.noisy}
    clean = model.inputs(cond, zero)
    half = model.inputs(cond, {**zero, "garment": torch.full((2,), 0.5)})
    torch.testing.assert_close(clean["ca"], cond["ca"]) and torch.testing.assert_close(clean["garment"], cond["garment"])
    assert torch.equal(half["ca"], clean["ca"]) and not torch.allclose(half["garment"], clean["garment"])


def test_attention_backends_agree():
    q, k, v = (torch.randn(2, 4, 37, 16, dtype=torch.float32) for _ in range(3))
    k, v = k[:, :, :29], v[:, :, :29]
    torch.testing.assert_close(attention(q, k, v, "sdpa"), attention(q, k, v, "math"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("unet", [1, 2])
def test_the_whole_model_is_the_same_with_sdpa_and_math_attention(tiny_config, unet):
    """Every attention of the model (self with pose tokens, cross to the garment, the pose pooling) through
    PyTorch's fused kernel and through the textbook reference."""
    outputs = []
    for backend in ("sdpa", "math"):
        cfg = tiny_config.with_unet(unet, dataclasses.replace(tiny_config.unet(unet), attention_backend=backend))
        torch.manual_seed(0)
        model = _live(CascadeUNet(cfg, unet).eval(), std=0.05)
        x, t, cond, levels = fixed_inputs(cfg, unet)
        outputs.append(model.unet(x, t, cond, levels))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)


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
    cfg = tiny_config.with_unet(2, dataclasses.replace(tiny_config.unet(2), checkpointing=False))
    cfg_ckpt = tiny_config.with_unet(2, dataclasses.replace(tiny_config.unet(2), checkpointing=True))
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


# --------------------------------------------------------------------------- UNet 3: Imagen's Efficient-UNet
def test_sr1024_has_the_shape_of_imagens_1024_px_model_on_meta():
    """dim 128, mults 1/2/4/8, 2/4/8/8 residual blocks (imagen-pytorch's SRUnet1024), no attention."""
    from tryon_ds.model import EfficientUNet
    with torch.device("meta"):
        model = EfficientUNet(preset("sr1024"))
    assert [len(level.res) for level in model.down] == [2, 4, 8, 8]
    assert [len(level.res) for level in reversed(model.up)] == [2, 4, 8, 8]
    assert [level.res[0].block1[2].out_channels for level in model.down] == [128, 256, 512, 1024]
    assert not any("attn" in name.lower() for name, _ in model.named_modules())
    assert 0.5e9 < sum(p.numel() for p in model.parameters()) < 0.7e9


def test_efficient_unet_downsamples_before_its_blocks_and_upsamples_after_them(tiny_config):
    """Imagen's order: only the input block and the output block run at full resolution; the blocks of down
    level i run at 1/2^(i+1) of it, those of up level i likewise, and the skips arrive scaled by 1/sqrt(2)."""
    model = CascadeUNet(tiny_config, 3).unet
    sizes, seen = {}, {}

    def record(store, key, value):  # a hook that returns None leaves the module's inputs and outputs alone
        store.setdefault(key, value)

    for name, module in model.named_modules():
        if type(module).__name__ == "ResBlock":
            module.register_forward_hook(lambda m, args, out, name=name: record(sizes, name, out.shape[-1]))
    x, t, cond, levels = fixed_inputs(tiny_config, 3)  # a training crop: 32 px
    assert model(x, t, cond, levels).shape == x.shape == (2, 3, 32, 32)
    assert sizes["block_in"] == sizes["block_out"] == 32
    for i in range(3):
        assert {v for k, v in sizes.items() if k.startswith(f"down.{i}.")} == {32 >> (i + 1)}
        assert {v for k, v in sizes.items() if k.startswith(f"up.{2 - i}.")} == {32 >> (i + 1)}
    # An up block's input is [x, skip / sqrt(2)]: its first convolution sees the skip scaled.
    model.up[0].res[0].register_forward_pre_hook(lambda m, args: record(seen, "input", args[0]))
    model.down[-1].res[-1].register_forward_hook(lambda m, args, out: record(seen, "skip", out))
    model(x, t, cond, levels)
    width = seen["skip"].shape[1]
    torch.testing.assert_close(seen["input"][:, width:], seen["skip"] * 2 ** -0.5)


def test_unet3_is_conditioned_on_the_low_res_image_alone_and_has_no_guidance(tiny_config):
    """Every parameter learns; the low-res image and its stated noise level change the output; there is no
    conditioning to drop, so sampling ignores the guidance weight (guidance 1 and 3 give the same images)."""
    model = _live(CascadeUNet(tiny_config, 3))
    assert model.conditioning.keys == ("lowres",) and model.conditioning.guided == () and model.conditioning.noisy == ("lowres",)
    batch = random_batch(tiny_config, 3, 2)
    assert batch["person"].shape[-2:] == (32, 32)  # a crop of the 128 px target
    model(batch).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead
    model.eval()
    x, t, cond, levels = fixed_inputs(tiny_config, 3)
    before = model.unet(x, t, cond, levels)
    assert not torch.allclose(model.unet(x, t, cond, {"lowres": levels["lowres"] + 0.3}), before)
    assert not torch.allclose(model.unet(x, t, {"lowres": cond["lowres"].flip(-1)}, levels), before)
    with pytest.raises(ValueError, match="no conditioning that classifier-free guidance drops"):
        model.unet(x, t, cond, levels, drop_cond=torch.ones(2, dtype=torch.bool))
    lowres = batch["lowres"]
    samples = [model.sample({"lowres": lowres}, steps=2, sampler="ddim", guidance=g,
                            generator=torch.Generator().manual_seed(0)) for g in (1.0, 3.0)]
    assert samples[0].shape == (2, 3, 128, 128)  # trained on crops, sampled whole
    torch.testing.assert_close(samples[0], samples[1], rtol=0, atol=0)


def test_a_crop_of_the_upsampled_low_res_image_is_that_crop_of_the_whole(tiny_config):
    model = CascadeUNet(tiny_config, 3)
    lowres = torch.rand(3, 3, 64, 64)
    crops = torch.tensor([[0, 0], [96, 17], [31, 96]])
    whole = model.upsample(lowres)
    got = model.upsample(lowres, crops)
    for i, (top, left) in enumerate(crops.tolist()):
        assert torch.equal(got[i], whole[i, :, top:top + 32, left:left + 32])


@settings(max_examples=30, deadline=None)
@given(patch=st.sampled_from([1, 2, 4]), rows=st.integers(1, 3), cols=st.integers(1, 3),
       width=st.sampled_from([8, 16]), batch=st.integers(1, 2))
def test_a_warp_block_at_init_gives_back_its_input_whatever_the_patch(patch, rows, cols, width, batch):
    """Its output layers start at zero, so a block must hand back exactly the pixels it took: the tokens made
    of patch x patch squares go back where they came from (rows kept from columns, channels from the pixels
    of a patch), on images that are not square."""
    cfg = preset("tiny")
    block = WarpBlock(width, cfg, patch)
    x = torch.randn(batch, width, rows * patch, cols * patch)
    garment = torch.randn_like(x)
    pose_tokens = torch.randn(batch, 2 * cfg.num_keypoints, cfg.pose_dim)
    assert torch.equal(block(x, garment, pose_tokens), x)
    _live(block)
    assert not torch.allclose(block(x, garment, pose_tokens), x)  # and a trained one does something


@pytest.mark.parametrize("unet", [1, 2])
def test_patch_attention_attends_on_patches_at_the_top_attending_level_only_and_trains(tiny_config, unet):
    """attn_patch 2: the highest attending level's self- and cross-attention see one token per 2x2 pixels (and
    the pose tokens), every other attending level one per pixel; every parameter takes part; the default is
    the paper's attention on every pixel."""
    assert tiny_config.unet(unet).attn_patch == 1
    config = dataclasses.replace(tiny_config, unets=tuple(
        dataclasses.replace(u, attn_patch=2) if n == unet else u for n, u in enumerate(tiny_config.unets, 1)))
    model = _live(CascadeUNet(config, unet))
    spec, (height, width) = config.unet(unet), config.image_size(unet)
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = args[0].shape[1]  # tokens
        return hook

    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            module.register_forward_pre_hook(record(name))
    model(random_batch(config, unet, 2)).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead
    top = spec.attn_levels.index(True)
    for name, tokens in seen.items():
        path, level = name.split(".")[1:3]
        side = {"person_mid": len(spec.dim_mults) - 1}.get(path)
        if side is None:
            side = int(level) if path == "person_down" else len(spec.dim_mults) - 1 - int(level)
        patch = 2 if side == top else 1
        assert tokens == (height >> side) * (width >> side) // patch**2, name
    assert any(tokens == (height >> top) * (width >> top) // 4 for tokens in seen.values())
