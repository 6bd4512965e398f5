"""Named UNet sizes: values for the keys of a UNet's entry in the cascade (tryon_ds/config/schema.py); any key given
beside ``preset`` in a config overrides the preset's value. The preset's family decides the architecture.

Parallel-UNets (``PRESETS``; tryon_ds/model/parallel_unet.py), all with the paper's structure: UNet 1
(128 px, 4 levels) attends at its two lowest resolutions (32 and 16 px), UNet 2 (256 px, 5 levels) at its
lowest (16 px).
- ``base`` / ``sr``: ~850M / ~950M parameters, the sizes of the original training guide;
- ``paper-base`` / ``paper-sr``: the paper's widths and block counts (1.13B / 1.06B in the paper);
- ``tiny`` / ``tiny-sr``: the same structure at CPU size (32 / 64 px), for the demo and the tests.

Efficient-UNets (``EFFICIENT_PRESETS``; tryon_ds/model/efficient_unet.py), the paper's third UNet:
- ``sr1024``: 256 -> 1024 px, trained on 256 px crops, the shape of Imagen's 1024 px model as imagen-pytorch's
  ``SRUnet1024`` gives it (dim 128, mults 1/2/4/8, 2/4/8/8 residual blocks);
- ``tiny-sr3``: the same structure at CPU size (64 -> 128 px on 32 px crops).
tests/test_model.py checks the parameter counts on the meta device.
"""
from .spec import SpecError

_PAPER_ATTENTION = dict(attn_heads=8, attn_dim_head=64, cond_dim=768, pose_dim=512, groups=32)
_UNET1 = (False, False, True, True)
_UNET2 = (False, False, False, False, True)

PRESETS: dict[str, dict] = {
    "tiny": {},  # the dataclass defaults: 3 levels at 32 px (32, 16, 8), attending at 16 and 8
    "tiny-sr": dict(attn_levels=(False, False, True)),  # 3 levels at 64 px, attending at 16
    "base": dict(dim=192, dim_mults=(1, 2, 3, 4), num_res_blocks=(3, 4, 6, 7), attn_levels=_UNET1, **_PAPER_ATTENTION),
    "sr": dict(dim=128, dim_mults=(1, 1, 2, 4, 8), num_res_blocks=(2, 3, 4, 6, 6), attn_levels=_UNET2,
               **_PAPER_ATTENTION),
    "paper-base": dict(dim=128, dim_mults=(1, 2, 4, 8), num_res_blocks=(3, 4, 6, 7), attn_levels=_UNET1,
                       **_PAPER_ATTENTION),
    "paper-sr": dict(dim=128, dim_mults=(1, 1, 2, 4, 8), num_res_blocks=(2, 3, 4, 7, 7), attn_levels=_UNET2,
                     **_PAPER_ATTENTION),
}

EFFICIENT_PRESETS: dict[str, dict] = {
    # The dataclass defaults, trained on 32 px crops of 128 px images (configs/tiny.yaml; a quarter of the side,
    # as Imagen's 256 of 1024): levels at 16, 8 and 4 px of a crop.
    "tiny-sr3": dict(crop_size=(32, 32)),
    "sr1024": dict(dim=128, dim_mults=(1, 2, 4, 8), num_res_blocks=(2, 4, 8, 8), cond_dim=1024, groups=32,
                   crop_size=(256, 256)),
}

# The UNet of the cascade each preset is made for: the tools' default when only a preset is named.
POSITION = {"tiny": 1, "base": 1, "paper-base": 1, "tiny-sr": 2, "sr": 2, "paper-sr": 2, "tiny-sr3": 3, "sr1024": 3}


def preset(name: str):
    """The spec of a named preset: a ParallelUNetConfig or an EfficientUNetConfig by the preset's family."""
    from .efficient_unet import EfficientUNetConfig
    from .parallel_unet import ParallelUNetConfig

    for cls, presets in ((ParallelUNetConfig, PRESETS), (EfficientUNetConfig, EFFICIENT_PRESETS)):
        if name in presets:
            return cls(preset=name, **presets[name])
    raise SpecError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS) + sorted(EFFICIENT_PRESETS)}")
