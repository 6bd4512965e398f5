import torch

from .efficient_unet import EfficientUNet
from .parallel_unet import COND_KEYS, ParallelUNet, drop_conditioning

__all__ = ["ARCHITECTURES", "COND_KEYS", "DTYPES", "EfficientUNet", "ParallelUNet", "build_unet",
           "compiled_graphs", "drop_conditioning", "parameter_count"]

# The precisions by the names configs, DeepSpeed and bundles use.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# A UNet config's ARCH -> the model it describes.
ARCHITECTURES = {"parallel": ParallelUNet, "efficient": EfficientUNet}


def build_unet(config, unet_number: int) -> torch.nn.Module:
    """UNet ``unet_number`` of the cascade ``config`` describes; every UNet after the first super-resolves the
    one before it."""
    cfg = config.unet(unet_number)
    return ARCHITECTURES[cfg.ARCH](cfg, lowres_cond=unet_number > 1, channels=config.channels)


def parameter_count(module: torch.nn.Module) -> int:
    """The whole module's parameters, also after ZeRO-3 has partitioned them (each keeps its ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far: one per distinct input shape and grad mode of
    a compiled UNet once it runs steadily; a count that keeps growing is a recompile per step."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
