import torch

from .parallel_unet import COND_KEYS, ParallelUNet, drop_conditioning

__all__ = ["COND_KEYS", "DTYPES", "ParallelUNet", "drop_conditioning", "parameter_count"]

# The precisions by the names configs, DeepSpeed and bundles use.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parameter_count(module: torch.nn.Module) -> int:
    """The whole module's parameters, also after ZeRO-3 has partitioned them (each keeps its ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
