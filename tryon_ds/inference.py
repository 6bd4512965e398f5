"""Running the cascade: base UNet at 128, then the SR UNet at 256 conditioned on its output.

    pipe = TryOnPipeline.from_pretrained("bundle/")                 # EMA weights, fp32, CPU
    image = pipe(ca_image, garment_image, person_pose, garment_pose, seed=0)   # PIL in, PIL out

Inputs are prepared as tools/make_shards.py prepares training data (letterboxed, keypoints normalised to
the letterboxed image), and the result is cropped back to the ca image's aspect ratio.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .bundle import read_stage
from .config import Config, UserError
from .data.shards import PAD_COLOUR, letterbox, normalise_pose
from .model import COND_KEYS
from .stage import CascadeStage


def to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_image(x: torch.Tensor) -> Image.Image:
    arr = ((x.float().clamp(-1, 1).permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
    return Image.fromarray(arr)


class TryOnPipeline:
    def __init__(self, stages: dict[int, CascadeStage], configs: dict[int, Config], device: torch.device):
        self.stages, self.configs, self.device = stages, configs, device

    @classmethod
    def from_pretrained(cls, bundle: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> "TryOnPipeline":
        bundle = Path(bundle)
        if not bundle.is_dir():
            raise UserError(f"bundle folder {bundle} does not exist")
        if not (bundle / "unet1").is_dir():
            raise UserError(f"{bundle} has no unet1/: consolidate the base UNet's checkpoint into it first")
        device = torch.device(device)
        stages, configs = {}, {}
        for stage in (1, 2):
            if stage == 2 and not (bundle / "unet2").is_dir():
                break
            config, weights, _ = read_stage(bundle, stage, ema)
            model = CascadeStage(config, stage)
            model.unet.load_state_dict({k: v.float() for k, v in weights.items()})
            stages[stage], configs[stage] = model.to(device).eval(), config
        if 2 in configs and tuple(configs[2].base_image_size) != tuple(configs[1].base_image_size):
            raise UserError(f"{bundle}: unet2 was trained on {list(configs[2].base_image_size)} inputs but unet1 "
                            f"makes {list(configs[1].base_image_size)} images")
        return cls(stages, configs, device)

    @property
    def output_size(self) -> tuple[int, int]:
        last = max(self.stages)
        return tuple(self.configs[last].image_size(last))

    def prepare(self, ca: Image.Image, garment: Image.Image, person_pose: np.ndarray,
                garment_pose: np.ndarray | None) -> dict[int, dict]:
        """Conditioning tensors (a batch of one) for each stage. Poses are (K, 3) pixel (x, y, confidence)
        of their own image; ``garment_pose`` None for a flat product garment."""
        conds = {}
        for stage, config in self.configs.items():
            size = config.image_size(stage)
            k = config.unet(stage).num_keypoints
            ca_l, scale, pad = letterbox(ca.convert("RGB"), size, PAD_COLOUR)
            g_l, g_scale, g_pad = letterbox(garment.convert("RGB"), size, PAD_COLOUR)
            p = torch.from_numpy(normalise_pose(person_pose, scale, pad, size, k))
            g = torch.from_numpy(normalise_pose(garment_pose, g_scale, g_pad, size, k))
            conds[stage] = {"ca": to_tensor(ca_l)[None], "garment": to_tensor(g_l)[None],
                            "person_pose": p[None, :, :2], "person_pose_valid": p[None, :, 2] > 0,
                            "garment_pose": g[None, :, :2], "garment_pose_valid": g[None, :, 2] > 0,
                            "crop": (scale, pad, ca.size)}
        return conds

    @torch.no_grad()
    def generate(self, conds: dict[int, dict], sampler: str | None = None, steps: tuple | None = None,
                 guidance: float | None = None, seed: int = 0) -> dict[int, torch.Tensor]:
        """Samples in [-1, 1] from every stage of the bundle: {1: base output, 2: SR output}."""
        generator = torch.Generator(self.device).manual_seed(seed)
        out, lowres = {}, None
        for stage, model in self.stages.items():
            cond = {k: conds[stage][k].to(self.device) for k in COND_KEYS}
            out[stage] = lowres = model.sample(cond, lowres=lowres, steps=steps[stage - 1] if steps else None,
                                               sampler=sampler, guidance=guidance, generator=generator)
        return out

    def __call__(self, ca: Image.Image, garment: Image.Image, person_pose: np.ndarray,
                 garment_pose: np.ndarray | None = None, **kwargs) -> Image.Image:
        conds = self.prepare(ca, garment, person_pose, garment_pose)
        last = max(self.stages)
        result = to_image(self.generate(conds, **kwargs)[last][0])
        scale, pad, (w, h) = conds[last]["crop"]
        return result.crop((pad[0], pad[1], pad[0] + round(w * scale), pad[1] + round(h * scale)))
