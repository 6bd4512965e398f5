"""Training: process set-up (``distributed``), the DeepSpeed config (``ds_config``) and engine (``engine``),
the EMA (``ema``), checkpoints and resuming (``checkpoint``), how a run ends (``lifecycle``), rank-0
logging (``logger``) and sample grids (``previews``). The loop itself is ``tryon_ds/train.py``."""
