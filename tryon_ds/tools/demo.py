"""The main job end to end on the built-in small default (synthetic data, tiny preset, CPU, DeepSpeed):

    synthetic shards at 128 px -> UNet 1 (32 px), UNet 2 (64 px) and UNet 3 (128 px, trained on 32 px crops),
    each on 2 ranks with ZeRO-2 -> bundle -> the three-UNet cascade on held-out validation pairs -> a PNG grid,
    the quality table at 128 px, and UNets 2 and 3 alone against bilinear upsampling.

Every step runs the same command a cluster user runs (tools/make_shards.py, tryon_ds/train.py under the
deepspeed launcher, tools/consolidate_checkpoint.py, tools/infer.py, tools/evaluate.py); each command is
printed before it runs.

    python tools/demo.py                # about 14 minutes on 2 CPU cores
    python tools/demo.py --seed 3       # the same data set, another run: weights, data order, every draw
    python tools/demo.py --quick        # a few steps of everything, for a smoke test
    python tools/demo.py --set unets.0.attn_patch=2   # another setting, to hold against the seed table

One run's figure depends on its trajectory: BENCHMARKS.md has the mean and spread over seeds, which a claim
that a change is "within the spread" cites.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..cli import exit_on_user_error
from ..errors import UserError
from ..evaluation import format_table, markdown
from ..training.distributed import free_port

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str]) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO)
    if result.returncode != 0:
        raise UserError(f"the step above failed (exit {result.returncode}); its output is above")
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="everything the demo writes goes here")
    p.add_argument("--samples", type=int, default=4000, help="synthetic samples")
    # UNet 1 makes the try-on, the others sharpen it: the base UNet gets most of the 15 minutes.
    p.add_argument("--base_steps", type=int, default=900)
    p.add_argument("--sr_steps", type=int, default=300)
    p.add_argument("--base_batch", type=int, default=8, help="micro-batch per rank, UNet 1")
    # Twice the steps at half the batch trained the SR UNet better in the same time (BENCHMARKS.md).
    p.add_argument("--sr_batch", type=int, default=4, help="micro-batch per rank, UNet 2")
    p.add_argument("--sr3_steps", type=int, default=600)
    p.add_argument("--sr3_batch", type=int, default=8, help="micro-batch per rank, UNet 3 (32 px crops)")
    # Guidance 2 (the paper's) lost 0.5-0.6 dB of garment-region PSNR to guidance 1 with these tiny,
    # briefly trained UNets, for a little more SSIM (BENCHMARKS.md); sampling is also twice as fast.
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight for inference")
    p.add_argument("--eval_pairs", type=int, default=32)
    p.add_argument("--sr_alone_pairs", type=int, default=16,
                   help="pairs for each super-resolution UNet alone vs bilinear upsampling")
    p.add_argument("--seed", type=int, default=0,
                   help="the seed of the whole run (initial weights, data order and augmentation, the training "
                        "draws, the sampling noise); the synthetic data set stays the same")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--val_fraction", type=float, default=0.03)
    p.add_argument("--quick", action="store_true", help="a few steps of everything (the test suite's version)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="a config override for every training run, as train.py takes it (repeatable), e.g. "
                        "--set unets.0.attn_patch=2: the demo of a changed setting, to hold against the seed table")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.base_steps, args.sr_steps, args.sr3_steps = 120, 4, 3, 3
        args.eval_pairs, args.val_fraction = 4, 0.15
        args.sr_alone_pairs = 2
    out = (REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    py = sys.executable
    start = time.perf_counter()
    shards = out / "shards"
    _run([py, "tools/make_shards.py", "--synthetic", str(args.samples), "--out", str(shards), "--image-size", "128",
          "--val-fraction", str(args.val_fraction), "--shard-size", "500", "--workers", "2"])
    # Validation, a quality pass, a preview and a checkpoint once, at each run's end (steps spent elsewhere are
    # steps not trained). The pass runs on the validation samples the evaluation below reports on: choosing a
    # step by it would report the chosen on the set it was chosen by, so the best is the last step here.
    common = ["--deepspeed_config", "ds_configs/cpu_zero2.json", "--config", "configs/tiny.yaml",
              "--set", f"data_dir={shards}", "--set", f"checkpoint_dir={out / 'checkpoints'}",
              "--set", f"output_dir={out / 'outputs'}", "--set", f"log_dir={out / 'logs'}",
              "--set", "validation_freq=100000", "--set", "checkpoint_freq=100000", "--set", "sample_freq=100000",
              "--set", "quality_freq=100000", "--set", "quality_samples=16",
              "--set", f"seed={args.seed}", "--set", f"data.seed={args.seed}"]
    common += [arg for override in args.overrides for arg in ("--set", override)]
    if args.quick:
        common += ["--set", "diffusion.sample_steps=[4,4,4]", "--set", "data.num_workers=0"]
    launcher = [py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks)]
    unets = ((1, args.base_steps, args.base_batch), (2, args.sr_steps, args.sr_batch), (3, args.sr3_steps, args.sr3_batch))
    for unet, steps, batch in unets:
        _run(launcher + ["--master_port", str(free_port()), "tryon_ds/train.py", *common, "--train_unet",
                         str(unet), "--max_steps", str(steps), "--batch_size", str(batch)])
    bundle = out / "bundle"
    for unet, _, _ in unets:
        _run([py, "tools/consolidate_checkpoint.py", str(out / "checkpoints" / f"unet{unet}"), "--best", "--out",
              str(bundle)])
    val = str(shards / "val-*.tar")
    sampling = (["--guidance", str(args.guidance), "--seed", str(args.seed)]
                + (["--steps", "4", "3", "3"] if args.quick else []))
    _run([py, "tools/infer.py", "--checkpoint", str(bundle), "--shards", val, "--max-samples", "8",
          "--output_dir", str(out / "results"), *sampling])
    table = out / "quality.json"
    # The field's table too, at the cascade's 128 px and at 64x64; FID/KID and LPIPS need weight files the
    # demo does not download (the table says which), the rest is computed.
    _run([py, "tools/evaluate.py", "--checkpoint", str(bundle), "--shards", val, "--max-samples", str(args.eval_pairs),
          "--eval-size", "64x64", "--sr-alone", str(args.sr_alone_pairs), "--json", str(table), *sampling])

    quality = json.loads(table.read_text())
    print(f"\nDone in {(time.perf_counter() - start) / 60:.1f} min (seed {args.seed}, torch {torch.__version__}).")
    print(f"  try-on grid (ca | garment | try-on result | target): {out / 'results' / 'grid.png'}")
    print(f"  cascade bundle: {bundle}")
    print(f"  try it on a web page: python tools/app.py --checkpoint {bundle} --shards '{val}'   (the extra: "
          f"pip install -e \".[app]\")")
    print(f"  training samples and logs: {out / 'outputs' / 'samples'}, {out / 'logs'} (tensorboard --logdir)")
    print(f"  quality table: {table}\n")
    print("The field's protocol (paired: the person in their own garment; this split has no unpaired samples):")
    print(markdown(quality["field"], quality["skipped"], quality["lpips_net"]) + "\n")
    print(format_table(quality["rows"], quality["pairs"], quality["region_pixels"]))
    m = quality["margins"]
    print(f"  inside the garment region the cascade beats the better baseline by {m['psnr_region']:+.2f} dB PSNR "
          f"and {m['ssim_region']:+.3f} SSIM\n")
    for name, sr in quality["sr_alone"].items():
        print(format_table(sr["rows"], sr["pairs"], sr["region_pixels"]))
        print(f"  {name.replace('unet', 'UNet ')} alone, given the true low-res image: {sr['margins']['psnr']:+.2f} dB "
              f"PSNR and {sr['margins']['ssim']:+.3f} SSIM from bilinear upsampling of it (whole image)\n")


if __name__ == "__main__":
    main()
