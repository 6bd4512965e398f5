"""A stand-in for the FID Inception with its TorchScript interface (uint8 images of any size in, 2048
features out with ``return_features=True``), randomly initialised: enough to run the FID/KID plumbing."""
import torch
from torch import nn


class TinyInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, 2048)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.proj(nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1))


def save(path) -> None:
    torch.manual_seed(0)
    torch.jit.script(TinyInception()).save(str(path))
