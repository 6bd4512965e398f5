from .parallel_unet import COND_KEYS, ParallelUNet, drop_conditioning

__all__ = ["COND_KEYS", "ParallelUNet", "drop_conditioning"]
