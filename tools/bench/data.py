"""Input-pipeline throughput: WebDataset shards vs a plain loader over the ``folders`` layout,
on the same synthetic samples, plus the conversion rate of make_shards; and what one loader core gives each
UNet of the whole cascade from shards at the top size, with the cores a GPU needs to be fed.

    python tools/bench/data.py --samples 400 --batches 30
    python tools/bench/data.py --convert-only --source-size 768x1024 --samples 100   # VITON-HD-sized sources
    python tools/bench/data.py --top-size 1024 --samples 200 --batches 20            # UNets 1, 2, 3 per core
    python tools/bench/data.py --store --latency-ms 50 --bandwidth 8M               # shards over slow HTTP
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # a script run from a fresh clone: the repository's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import random
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tryon_ds.cli import exit_on_user_error
from tryon_ds.config import build_config, deep_merge, read_config_file
from tryon_ds.data import sources
from tryon_ds.data.pipeline import TrainLoader, collate
from tryon_ds.data.preprocess import unet_inputs
from tryon_ds.data.shards import ShardOptions, write_shards
from tryon_ds.data.sources import synthetic_samples
from tryon_ds.data.synthetic import export_folders

REPO = Path(__file__).resolve().parents[2]

# Samples/s one GPU consumes, per UNet, for the cores-per-GPU column: the training guide's A100 figures for
# UNets 1 and 2 (4.0 it/s at micro-batch 16, 2.0 it/s at 8); for UNet 3, a stated 4.0 it/s at 16 crops of
# 256 px until tools/gpu_check.sh has measured it.
GPU_SAMPLES_PER_S = (64.0, 16.0, 64.0)


class FolderDataset(Dataset):
    """The obvious loader for the folders layout: open the files of one sample per __getitem__."""

    def __init__(self, root: Path, config, unet_number: int):
        self.samples = sources.scan_folders(root).samples
        self.config, self.unet_number = config, unet_number

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = sources.load_sample(self.samples[i])
        size = s.person.size
        out = {"key": s.key}
        for name in ("person", "ca", "garment"):
            out[name] = getattr(s, name)
        for name in ("person_pose", "garment_pose"):
            pose = getattr(s, name)
            out[name] = torch.from_numpy(pose[:, :2] / np.array(size, np.float32))
            out[f"{name}_valid"] = torch.from_numpy(pose[:, 2] > 0)
        return unet_inputs(out, self.config, self.unet_number, random.Random(i))


def _crop_width(root: Path, width: int) -> None:
    """Cut a folders-layout tree of square images to ``width``, centred, keypoints moved along."""
    for folder in ("person_images", "ca_images", "garment_images"):
        for path in (root / folder).iterdir():
            with Image.open(path) as img:
                left = (img.width - width) // 2
                img.crop((left, 0, left + width, img.height)).save(path, quality=95)
    for folder in ("person_poses", "garment_poses"):
        for path in (root / folder).glob("*.npy"):
            pose = np.load(path)
            pose[pose[:, 2] > 0, 0] -= left
            np.save(path, pose)


def rate(iterator, batches: int, batch_size: int) -> float:
    it = iter(iterator)
    next(it)  # start-up (workers, first shard) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (("--samples", 400), ("--batches", 30), ("--batch-size", 16)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--source-size", default="256x256", help="WxH of the source images (VITON-HD's: 768x1024)")
    p.add_argument("--convert-only", action="store_true", help="measure make_shards only")
    p.add_argument("--top-size", type=int, metavar="N",
                   help="only: one loader core per UNet of configs/cascade1024.yaml, from N px shards")
    p.add_argument("--store", action="store_true",
                   help="only: UNet 2's training stream from a local HTTP server (latency, bandwidth cap) vs disk")
    p.add_argument("--latency-ms", type=float, default=50.0, help="with --store: per request")
    p.add_argument("--bandwidth", default="8M", help="with --store: bytes/s per connection, e.g. 8M")
    args = p.parse_args(argv)
    if args.top_size:
        return loader_per_core(args.top_size, args.samples, args.batches, args.batch_size)
    if args.store:
        from tryon_ds.tools.make_shards import parse_bytes

        return from_store(args.samples, args.batches, args.batch_size, args.latency_ms / 1000,
                          parse_bytes(args.bandwidth))
    root = Path(tempfile.mkdtemp(prefix="tryon-bench-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data under {root}")
    width, height = (int(v) for v in args.source_size.split("x"))
    export_folders(root / "folders", args.samples, size=height)
    if width != height:  # the people are centred: cut the sides to the source's aspect
        _crop_width(root / "folders", width)
    samples = sources.scan_folders(root / "folders").samples
    for workers in (1, 2):
        start = time.perf_counter()
        write_shards(root / f"shards{workers}", samples, ShardOptions(image_size=(256, 256), val_fraction=0.0),
                     workers=workers, log=lambda _: None)
        print(f"make_shards, {width}x{height} sources -> 256 px shards, {workers} worker(s): "
              f"{args.samples / (time.perf_counter() - start):.1f} samples/s (check + convert + write)")
    if args.convert_only:
        return
    base = read_config_file(REPO / "configs" / "tiny.yaml")
    # UNets 1 and 2 at 128 / 256 px: the two-UNet cascade
    base["unets"] = [{**u, "sample_steps": steps} for u, steps in zip(base["unets"][:2], (50, 25))]
    print(" unet  size  workers  shards samples/s  folder samples/s  ratio")
    for unet in (1, 2):
        for workers in (0, 1, 2):
            cfg = build_config(deep_merge(base, {"data_dir": str(root / "shards1"), "base_image_size": [128, 128],
                                                 "sr_image_size": [256, 256],
                                                 "data": {"num_workers": workers, "shuffle_buffer": 200}}))
            shards = rate(TrainLoader(cfg, unet, 0, args.batch_size), args.batches, args.batch_size)
            plain = DataLoader(FolderDataset(root / "folders", cfg, unet), batch_size=args.batch_size, shuffle=True,
                               num_workers=workers, collate_fn=collate, persistent_workers=workers > 0)

            def forever():
                while True:
                    yield from plain
            folder = rate(forever(), args.batches, args.batch_size)
            size = cfg.image_size(unet)[0]
            print(f"{unet:>5}  {size:>4}  {workers:>7}  {shards:16.1f}  {folder:16.1f}  {shards / folder:5.2f}")


def loader_per_core(top: int, samples: int, batches: int, batch_size: int) -> None:
    """Each UNet's training stream in the main process (no loader workers: one core) over shards written at
    ``top`` px, the sizes of configs/cascade1024.yaml, and the cores a GPU needs at GPU_SAMPLES_PER_S."""
    root = Path(tempfile.mkdtemp(prefix="tryon-bench-top-"))
    start = time.perf_counter()
    write_shards(root, synthetic_samples(samples, 0, top), ShardOptions(image_size=(top, top), val_fraction=0.0,
                                                                        layout="synthetic"),
                 workers=2, validate=False, log=lambda _: None)
    per_sample = sum(f.stat().st_size for f in root.glob("train-*.tar")) / samples
    print(f"torch {torch.__version__}; {samples} synthetic samples at {top} px written in "
          f"{time.perf_counter() - start:.0f} s, {per_sample / 1024:.0f} KiB per sample on disk; under {root}")
    cfg = build_config(deep_merge(read_config_file(REPO / "configs" / "cascade1024.yaml"), {
        "data_dir": str(root), "unet3": {"preset": "sr1024", "image_size": [top, top]},
        "data": {"num_workers": 0, "shuffle_buffer": 100}}))
    print(" unet  trains on         samples/s per core  GPU samples/s  cores per GPU")
    for unet in cfg.unet_numbers:
        size = cfg.crop_size(unet) or cfg.image_size(unet)
        what = f"{size[0]}x{size[1]}" + (" crops" if cfg.crop_size(unet) else "")
        got = rate(TrainLoader(cfg, unet, 0, batch_size), batches, batch_size)
        need = GPU_SAMPLES_PER_S[unet - 1]
        print(f"{unet:>5}  {what:<16} {got:19.1f}  {need:13.0f}  {need / got:13.1f}")


def from_store(samples: int, batches: int, batch_size: int, latency_s: float, bandwidth: int) -> None:
    """UNet 2's training stream (256 px shards, every member decoded) read from disk and from a local HTTP
    server with ``latency_s`` per request and ``bandwidth`` bytes/s per connection, side by side, at each
    number of loader workers and prefetch depth."""
    from tools.bench.shard_server import ShardServer

    root = Path(tempfile.mkdtemp(prefix="tryon-bench-store-"))
    write_shards(root, synthetic_samples(samples, 0, 256), ShardOptions(image_size=(256, 256), val_fraction=0.0,
                                                                        shard_samples=50, layout="synthetic"),
                 workers=2, validate=False, log=lambda _: None)
    names = sorted(p.name for p in root.glob("train-*.tar"))
    per_sample = sum((root / n).stat().st_size for n in names) / samples
    print(f"{samples} samples at 256 px in {len(names)} shards ({per_sample / 1024:.0f} KiB per sample); server: "
          f"{latency_s * 1000:.0f} ms per request, {bandwidth / 2**20:.0f} MiB/s per connection")
    base = read_config_file(REPO / "configs" / "tiny.yaml")
    base["unets"] = base["unets"][:2]  # UNet 2 at 256 px: the two-UNet cascade
    print(" workers  prefetch  disk samples/s  http samples/s  http/disk")
    with ShardServer(root, latency_s=latency_s, bandwidth=bandwidth) as server:
        for workers in (1, 2, 4):
            for prefetch in (2, 4):
                got = []
                for shards in ([], [server.url(n) for n in names]):
                    cfg = build_config(deep_merge(base, {
                        "data_dir": str(root), "sr_image_size": [256, 256],
                        "data": {"num_workers": workers, "prefetch_factor": prefetch, "shuffle_buffer": 100,
                                 "train_shards": shards}}))
                    loader = TrainLoader(cfg, 2, 0, batch_size)
                    got.append(rate(loader, batches, batch_size))
                    loader.close()
                print(f"{workers:>8}  {prefetch:>8}  {got[0]:14.1f}  {got[1]:14.1f}  {got[1] / got[0]:9.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
