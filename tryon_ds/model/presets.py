"""Named Parallel-UNet sizes: values for the keys of ``UNetConfig`` (tryon_ds/config.py); any key given
beside ``preset`` in a config overrides the preset's value. All follow the paper's structure: UNet 1
(128 px, 4 levels) attends at its two lowest resolutions (32 and 16 px), UNet 2 (256 px, 5 levels) at its
lowest (16 px). tests/test_model.py checks the parameter counts on the meta device.

- ``base`` / ``sr``: ~850M / ~950M parameters, the sizes of the original training guide;
- ``paper-base`` / ``paper-sr``: the paper's widths and block counts (1.13B / 1.06B in the paper);
- ``tiny`` / ``tiny-sr``: the same structure at CPU size (32 / 64 px), for the demo and the tests.
"""

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
