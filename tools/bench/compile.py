"""torch.compile against eager for each UNet of a config, side by side in one process per UNet: the time of
the first compiled training step from a cold inductor cache and from a warm one (a second process on the
same cache), the steady-state training step (forward+backward of the diffusion loss) and sampling step
(guided, so at the doubled batch) compiled over eager, and the compiled training loss against eager's.

    python tools/bench/compile.py                          # the tiny presets of configs/tiny.yaml, on CPU
    python tools/bench/compile.py --config configs/config.json --batch 16 --unets 1   # on a GPU
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # a script run from a fresh clone: the repository's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import json
import os
import subprocess
import tempfile
import time

import torch

REPS = 3


def _timed(fn, reps: int = REPS) -> float:
    fn()  # warm-up (and, the first time, the compilation)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def worker(config_path: str, unet: int, batch_size: int, cold_only: bool) -> dict:
    from tryon_ds.cascade import CascadeUNet
    from tryon_ds.config import build_config, read_config_file
    from tryon_ds.cascade import random_batch

    config = build_config(read_config_file(config_path))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = CascadeUNet(config, unet).to(device)
    batch = {k: v.to(device) for k, v in random_batch(config, unet, batch_size, torch.Generator().manual_seed(0)).items()}
    cond = {k: batch[k] for k in model.unet.cond_keys if k != "lowres"}
    lowres = batch.get("lowres")  # whole, also for a UNet trained on crops: sampling makes whole images

    def train_step():
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        loss = model(batch)
        loss.backward()
        return loss.item()

    def sample():
        model.sample(cond, lowres, steps=2, sampler="ddim", guidance=2.0,
                     generator=torch.Generator(device).manual_seed(0))

    out = {"unet": unet}
    if not cold_only:
        out["eager_loss"] = train_step()
        out["eager_train_s"] = _timed(train_step)
        with torch.no_grad():
            out["eager_sample_s"] = _timed(sample)
    model.compile_mode = "default"
    model.compile_unet()
    start = time.perf_counter()
    out["compiled_loss"] = train_step()
    out["first_step_s"] = time.perf_counter() - start
    if not cold_only:
        out["compiled_train_s"] = _timed(train_step)
        start = time.perf_counter()
        sample()
        out["first_sample_s"] = time.perf_counter() - start
        out["compiled_sample_s"] = _timed(sample)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--unets", type=int, nargs="+", help="default: every UNet of the config")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.config, *json.loads(args.worker))), flush=True)
        return
    from tryon_ds.config import build_config, read_config_file

    unets = args.unets or list(range(1, len(build_config(read_config_file(args.config)).unets) + 1))
    rows = []
    for unet in unets:
        cache = tempfile.mkdtemp(prefix="inductor-")
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        runs = []
        for cold_only in (False, True):  # cold, then warm from the cache the first run filled
            r = subprocess.run([sys.executable, __file__, "--config", args.config,
                                "--worker", json.dumps([unet, args.batch, cold_only])],
                               capture_output=True, text=True, env=env, check=True)
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        cold, warm = runs
        rows.append({**cold, "warm_first_step_s": warm["first_step_s"]})
        r = rows[-1]
        print(f"unet{unet}: first compiled step {r['first_step_s']:.1f} s cold, {r['warm_first_step_s']:.1f} s warm "
              f"(eager step {r['eager_train_s']:.3f} s); train step compiled/eager "
              f"{r['compiled_train_s'] / r['eager_train_s']:.2f}; sampling step compiled/eager "
              f"{r['compiled_sample_s'] / r['eager_sample_s']:.2f} (first compiled sample {r['first_sample_s']:.1f} s); "
              f"loss {r['compiled_loss']:.6f} vs eager {r['eager_loss']:.6f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
