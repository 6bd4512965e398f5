#!/usr/bin/env python
"""What checking a checkpoint costs at a preset's real size: the files one rank writes (DeepSpeed's ZeRO-2
model and optimizer states, rank 0's EMA) written with torch.save at their real sizes, then read back and
hashed as tryon_ds/training/checkpoint.py does when it saves (SHA-256, from the page cache) and when it
resumes. Prints seconds per file and the hash time as a share of the write time.

    python tools/bench/checkpoint.py --preset base --ranks 8 --precision bf16 --folder /scratch/bench
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # a script run from a fresh clone: the repository's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import tempfile
import time

import torch

from tryon_ds.config import preset
from tryon_ds.model import build_unet, parameter_count, super_resolves
from tryon_ds.model.presets import POSITION
from tryon_ds.atomic import sha256_of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--folder", help="where to write (default: a temporary folder, removed after)")
    args = p.parse_args()
    cfg = preset(args.preset)
    with torch.device("meta"):
        n = parameter_count(build_unet(cfg, super_resolves(POSITION[args.preset])))
    weight = 2 if args.precision == "bf16" else 4
    files = {"rank 0: mp_rank_00_model_states.pt": n * weight,  # the weights in the training dtype
             "rank 0: ema.safetensors": n * 4,  # the fp32 EMA
             "each rank: zero_pp_rank_R optim_states.pt": n * 12 // args.ranks}  # fp32 master, Adam's 2 moments
    print(f"{args.preset}: {n / 1e6:.1f}M parameters, ZeRO-2, {args.precision}, {args.ranks} ranks")
    print("| file | GiB | write s | SHA-256 s | GiB/s hashed | hash / write |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        for name, size in files.items():
            path = Path(folder) / "file.pt"
            data = torch.randint(0, 256, (size,), dtype=torch.uint8)
            start = time.perf_counter()
            torch.save({"data": data}, path)
            write = time.perf_counter() - start
            del data
            start = time.perf_counter()
            sha256_of(path)
            hashed = time.perf_counter() - start
            gib = path.stat().st_size / 2**30
            print(f"| {name} | {gib:.2f} | {write:.2f} | {hashed:.2f} | {gib / hashed:.2f} | {hashed / write:.2f} |")
            path.unlink()


if __name__ == "__main__":
    main()
