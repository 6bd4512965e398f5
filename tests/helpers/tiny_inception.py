"""A stand-in for the FID Inception with its TorchScript interface as clean-fid uses it (``layers`` takes
299x299 images normalised to (x - 128) / 128 and gives 2048 features), randomly initialised: enough to run
the FID/KID plumbing."""
import torch
from torch import nn


class Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1))


class TinyInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = Layers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x.float() - 128) / 128)


def save(path) -> None:
    torch.manual_seed(0)
    torch.jit.script(TinyInception()).save(str(path))
