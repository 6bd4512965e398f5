"""Input-pipeline throughput: WebDataset shards vs a plain loader over the ``folders`` layout,
on the same synthetic samples, plus the conversion rate of make_shards.

    python tools/bench_data.py --samples 400 --batches 30
    python tools/bench_data.py --convert-only --source-size 768x1024 --samples 100   # VITON-HD-sized sources
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..cli import exit_on_user_error
from ..config import build_config, deep_merge, read_config_file
from ..data import sources
from ..data.pipeline import TrainLoader, collate
from ..data.preprocess import to_tensor, unet_inputs
from ..data.shards import ShardOptions, write_shards
from ..data.synthetic import export_folders


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
            out[name] = to_tensor(getattr(s, name))
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
    args = p.parse_args(argv)
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
    base = read_config_file(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
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


if __name__ == "__main__":
    main()
