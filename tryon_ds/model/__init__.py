import torch

from .efficient_unet import EfficientUNet, EfficientUNetConfig
from .parallel_unet import ParallelUNet, ParallelUNetConfig
from .presets import preset
from .spec import LOWRES, Conditioning, SpecError, UNetSpec, super_resolves

__all__ = ["ARCHITECTURES", "Conditioning", "DTYPES", "EfficientUNet", "EfficientUNetConfig", "LOWRES", "ParallelUNet",
           "ParallelUNetConfig", "SpecError", "UNetSpec", "build_unet", "compiled_graphs", "parameter_count", "preset",
           "super_resolves"]

# The precisions by the names configs, DeepSpeed and bundles use.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# A UNet spec's ARCH -> the model it describes.
ARCHITECTURES = {"parallel": ParallelUNet, "efficient": EfficientUNet}


def build_unet(spec: UNetSpec, super_resolves: bool, channels: int = 3) -> torch.nn.Module:
    """The UNet ``spec`` describes, super-resolving the UNet before it or starting the cascade."""
    return ARCHITECTURES[spec.ARCH](spec, super_resolves=super_resolves, channels=channels)


def parameter_count(module: torch.nn.Module, numel=torch.Tensor.numel) -> int:
    """The module's parameters; ``numel`` counts one (tryon_ds/compat.py full_numel: also a ZeRO-3 partitioned one)."""
    return sum(numel(p) for p in module.parameters())


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far: one per distinct input shape and grad mode of
    a compiled UNet once it runs steadily; a count that keeps growing is a recompile per step."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
