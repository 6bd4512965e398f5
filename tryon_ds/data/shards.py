"""Writing WebDataset shards: the sample format, the splits, the manifest and resumable writing.

A sample in a shard holds ``__key__`` and
    person.jpg, ca.jpg, garment.jpg    letterboxed to the shard's image size (aspect kept, padded)
    person_pose.npy, garment_pose.npy  (K, 3) float32: x, y normalised to that image in [0, 1], valid (0/1)
    mask.png                           optional: the region the ca image removed (synthetic data has it)
    json                               key, source files, original sizes, whether the garment has a pose, the
                                       release's split, "paired"/"unpaired", DressCode's category

Splits: a release's own test split becomes ``test-NNNNNN.tar`` (never train or val); validation is carved
from its training split alone, by a hash of each key (``is_val``). The manifest records where each split
came from, the paired and unpaired counts, and the keypoints clipped or dropped.

Every shard is written to a temporary name and renamed when complete; ``manifest.json`` (written the same
way after each shard) lists the finished shards with their sizes and SHA-256, so a re-run into the same
folder keeps them and goes on from there, and a killed run never leaves a shard that looks finished.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zlib
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import webdataset as wds
from PIL import Image

from .. import atomic
from ..errors import UserError
from .preprocess import letterbox, normalise_pose
from .sources import LoadedSample, SampleError, SourceSample, load_sample

FORMAT_VERSION = 2  # 2: a release's test split kept apart, samples marked paired/unpaired
SHARD_NAME = re.compile(r"^(train|val|test)-\d{6}\.tar$")
SPLITS = ("train", "val", "test")
# Kinds of problem, to count why samples were left out: (what the message says, how the count names it).
REASONS = (("missing counterpart", "missing file"), ("unreadable or truncated image", "unreadable image"),
           ("of shape", "pose of the wrong shape"), ("NaN", "NaN in a pose"), ("unreadable pose", "unreadable pose"),
           ("no person in the OpenPose", "no person in the pose file"), ("no joint", "no joint detected"),
           ("differs from the person image", "ca image of another size"), ("columns", "malformed pairs line"))


@dataclass(frozen=True)
class ShardOptions:
    image_size: tuple[int, int] = (256, 256)  # (H, W)
    jpeg_quality: int = 95
    num_keypoints: int = 18
    val_fraction: float = 0.05
    shard_samples: int = 1000
    shard_bytes: int = 1 << 30
    layout: str = "folders"
    source: str = ""


def is_val(key: str, fraction: float) -> bool:
    """A stable split: the same key always lands on the same side, whatever the order or machine."""
    return (zlib.crc32(key.encode()) % 100_000) < fraction * 100_000


# --------------------------------------------------------------------------- one sample
def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def encode_sample(s: LoadedSample, opts: ShardOptions) -> dict:
    size = opts.image_size
    person, scale, pad = letterbox(s.person, size)
    ca, _, _ = letterbox(s.ca, size)
    garment, g_scale, g_pad = letterbox(s.garment, size)
    sample = {
        "__key__": s.key,
        "person.jpg": _jpeg(person, opts.jpeg_quality),
        "ca.jpg": _jpeg(ca, opts.jpeg_quality),
        "garment.jpg": _jpeg(garment, opts.jpeg_quality),
        "person_pose.npy": _npy(normalise_pose(s.person_pose, scale, pad, size, opts.num_keypoints)),
        "garment_pose.npy": _npy(normalise_pose(s.garment_pose, g_scale, g_pad, size, opts.num_keypoints)),
        "json": json.dumps({"key": s.key, "person_size": list(s.person.size), "garment_size": list(s.garment.size),
                            "garment_pose": s.garment_pose is not None, **s.meta}).encode(),
    }
    if s.mask is not None:
        mask, _, _ = letterbox(s.mask.convert("L"), size, 0, Image.NEAREST)
        buf = io.BytesIO()
        mask.save(buf, format="PNG")
        sample["mask.png"] = buf.getvalue()
    return sample


def reason(problem: str) -> str:
    return next((name for text, name in REASONS if text in problem), "other")


# Worker functions take (sample, options) so that a process pool can run them.
def _check(job):
    sample, opts = job
    try:
        return sample.key, [], load_sample(sample, opts.num_keypoints).meta.get("keypoints", {})
    except SampleError as err:
        return sample.key, err.problems, {}


def _convert(job):
    sample, opts = job
    return encode_sample(load_sample(sample, opts.num_keypoints), opts)


def _parallel(fn, jobs: list, workers: int) -> Iterable:
    if workers <= 1:
        yield from map(fn, jobs)
        return
    with get_context("fork").Pool(workers) as pool:
        yield from pool.imap(fn, jobs, chunksize=4)


# --------------------------------------------------------------------------- the folder
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _finished_shards(out: Path, manifest: dict, split: str) -> list[dict]:
    """The prefix of a previous run's shards of ``split`` that are on disk exactly as recorded."""
    kept = []
    for entry in manifest.get("shards", {}).get(split, []):
        if not SHARD_NAME.match(str(entry.get("name", ""))):  # a manifest never names a file outside `out`
            raise UserError(f"{out / 'manifest.json'}: shard name {entry.get('name')!r} is not of the form "
                            f"{split}-NNNNNN.tar; delete the manifest to start over")
        path = out / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            break
        kept.append(entry)
    return kept


def write_shards(out: Path, samples: list[SourceSample], opts: ShardOptions, workers: int = 1,
                 skip_bad: bool = False, validate: bool = True, scan_problems: list[str] = (),
                 sources: dict[str, str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Check every sample, then write ``out/{train,val,test}-NNNNNN.tar`` and ``out/manifest.json``. Raises
    UserError listing every problem (before anything is written) unless ``skip_bad``; with no usable sample
    at all, always."""
    problems = {p: None for p in scan_problems}
    bad_keys: dict[str, list[str]] = {}
    keypoints: dict[str, list[str]] = {"clipped": [], "dropped": []}
    if validate:
        for i, (key, found, notes) in enumerate(_parallel(_check, [(s, opts) for s in samples], workers), 1):
            if found:
                bad_keys[key] = found
            for what, joints in notes.items():
                keypoints[what].extend(joints)
            if i % 1000 == 0:
                log(f"checked {i}/{len(samples)} samples")
    for key, found in bad_keys.items():
        problems.update({p: None for p in found})
    good = [s for s in samples if s.key not in bad_keys]
    counted = {}  # samples (and unmatched files) by why they were left out
    for why in [reason(p) for p in scan_problems] + [r for found in bad_keys.values() for r in {reason(p) for p in found}]:
        counted[why] = counted.get(why, 0) + 1
    if not good:
        raise UserError(f"no usable samples among {len(samples)} found: "
                        + (", ".join(f"{n} x {r}" for r, n in counted.items()) or "the source holds none")
                        + "".join(f"\n  {p}" for p in list(problems)[:20]))
    if problems and not skip_bad:
        raise UserError(f"{len(problems)} problem(s) in the input, nothing written (--skip-bad writes the "
                        "good samples and a report):\n  " + "\n  ".join(problems))
    for what, joints in keypoints.items():
        if joints:
            log(f"keypoints {what}: {len(joints)}, e.g. {joints[0]}")

    out.mkdir(parents=True, exist_ok=True)
    settings = {"format_version": FORMAT_VERSION, **asdict(opts)}
    settings["image_size"] = list(opts.image_size)
    manifest_path = out / "manifest.json"
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if previous and previous.get("settings") != settings:
        changed = sorted(k for k in settings if previous.get("settings", {}).get(k) != settings[k])
        raise UserError(f"{out} holds shards made with other settings ({', '.join(changed)} differ); "
                        "write to another folder or delete that one")
    train = [s for s in good if s.split == "train"]
    splits = {"train": [s for s in train if not is_val(s.key, opts.val_fraction)],
              "val": [s for s in train if is_val(s.key, opts.val_fraction)],
              "test": [s for s in good if s.split == "test"]}
    sources = sources or {"train": opts.source}
    provenance = {"train": sources.get("train", ""),
                  "val": f"{opts.val_fraction:g} of the training split ({sources.get('train', '')}), by key hash",
                  "test": sources.get("test", "")}
    manifest = {"settings": settings, "complete": False, "shards": {}, "samples": {},
                "splits": {k: {"source": provenance[k],
                               "pairs": {p: sum(s.pair == p for s in v) for p in ("paired", "unpaired")}}
                           for k, v in splits.items()},
                "keypoints": {k: len(v) for k, v in keypoints.items()},
                "skipped": {k: v for k, v in bad_keys.items()}, "skipped_reasons": counted,
                "scan_problems": list(scan_problems)}
    if skip_bad and problems:
        atomic.write_json(out / "skipped.json", {"problems": list(problems)})
        log(f"skipping {len(bad_keys)} bad sample(s) and {len(scan_problems)} unmatched file(s); "
            f"see {out / 'skipped.json'}")

    for split, items in splits.items():
        kept = _finished_shards(out, previous, split)
        manifest["shards"][split] = list(kept)
        done = sum(e["samples"] for e in kept)
        if kept:
            log(f"{split}: keeping {len(kept)} finished shard(s) ({done} samples) from an earlier run")
        todo = items[done:]
        index, writer, tmp, count, nbytes, first = len(kept), None, None, 0, 0, None

        def finish():
            nonlocal writer
            writer.close()
            name = f"{split}-{index:06d}.tar"
            final = out / name
            os.replace(tmp, final)
            manifest["shards"][split].append({"name": name, "samples": count, "bytes": final.stat().st_size,
                                              "sha256": _sha256(final), "first_key": first})
            atomic.write_json(manifest_path, manifest)
            writer = None

        for n, encoded in enumerate(_parallel(_convert, [(s, opts) for s in todo], workers), 1):
            if writer is None:
                tmp = out / f".{split}-{index:06d}.tar.tmp"
                # A fixed mtime makes shards byte-reproducible, so a resumed run equals an uninterrupted one.
                writer = wds.TarWriter(str(tmp), encoder=False, mtime=0)
                count, nbytes, first = 0, 0, encoded["__key__"]
            writer.write(encoded)
            count += 1
            nbytes += sum(len(v) for k, v in encoded.items() if k != "__key__")
            if count >= opts.shard_samples or nbytes >= opts.shard_bytes:
                finish()
                index += 1
            if n % 500 == 0:
                log(f"{split}: wrote {done + n}/{len(items)} samples")
        if writer is not None:
            finish()
        manifest["samples"][split] = len(items)
    manifest["complete"] = True
    atomic.write_json(manifest_path, manifest)
    for leftover in out.glob(".*.tar.tmp"):
        leftover.unlink()
    return manifest


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {folder} a shard folder written by tools/make_shards.py?")
    manifest = json.loads(path.read_text())
    if not manifest.get("complete"):
        raise UserError(f"{path}: the shards are incomplete (the writing run was interrupted); "
                        "re-run tools/make_shards.py into the same folder to finish them")
    return manifest
