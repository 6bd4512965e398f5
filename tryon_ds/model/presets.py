"""Named Parallel-UNet sizes: values for the keys of ``UNetConfig`` (tryon_ds/config.py); any key given
beside ``preset`` in a config overrides the preset's value. ``tiny`` is the dataclass defaults.
tests/test_model.py checks the parameter counts on the meta device."""

PRESETS: dict[str, dict] = {
    "tiny": {},
    # 128x128, attention at 32 and 16: ~850M, the size the original training guide gives.
    "base": dict(dim=192, dim_mults=(1, 2, 4, 4), num_res_blocks=(3, 4, 5, 6), attn_levels=(False, False, True, True),
                 attn_heads=8, attn_dim_head=64, ff_mult=4, attn_depth=2, mid_attn_depth=2, cond_dim=768,
                 pose_hidden=512, groups=32),
    # 256x256, attention at 32 and 16: ~950M.
    "sr": dict(dim=128, dim_mults=(1, 2, 4, 6, 6), num_res_blocks=(2, 3, 4, 6, 6),
               attn_levels=(False, False, False, True, True), attn_heads=8, attn_dim_head=64, ff_mult=4,
               attn_depth=2, mid_attn_depth=2, cond_dim=768, pose_hidden=512, groups=32),
}
