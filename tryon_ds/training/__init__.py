"""Training: process setup (``distributed``), the DeepSpeed config (``ds_config``), EMA (``ema``),
checkpoints (``checkpoint``) and rank-0 logging (``logger``). The loop itself is ``tryon_ds/train.py``."""
