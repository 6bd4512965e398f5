"""Writing WebDataset shards: the sample format, the splits, the manifest and resumable writing.

A sample in a shard holds ``__key__`` and
    person.jpg, ca.jpg, garment.jpg    letterboxed to the shard's image size (aspect kept, padded); JPEG at
                                       ``--jpeg-quality`` in train and val, PNG (``person.png``, ...) in a
                                       release's test split, whose person images are the evaluation's targets:
                                       they keep the release's pixels (q95 would change them, BENCHMARKS.md)
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

import io
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import webdataset as wds
from PIL import Image

from .. import atomic
from ..batch import CA, GARMENT, GARMENT_POSE, MASK, MEMBERS, PERSON, PERSON_POSE, SHARD_IMAGES, file_name
from ..errors import UserError
from .preprocess import letterbox, normalise_pose
from .sources import LoadedSample, SampleError, SourceSample, load_sample

FORMAT_VERSION = 3  # 2: a release's test split kept apart, samples marked paired/unpaired; 3: test images PNG
SHARD_NAME = re.compile(r"^(train|val|test)-(?:p\d{4}-)?\d{6}\.tar$")  # pNNNN-: written by part NNNN
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


def part_of(key: str, parts: int) -> int:
    """Which of ``parts`` conversion jobs writes this key: by a hash of its own (salted, so that each part
    gets its share of the validation keys), stable across machines like ``is_val``."""
    return zlib.crc32(b"part/" + key.encode()) % parts


@dataclass(frozen=True)
class Part:
    """Part ``index`` of ``count``: its shards are named split-pNNNN-MMMMMM.tar, its manifest
    manifest.part-NNNN.json; ``merge_parts`` writes the folder's manifest.json from all of them."""
    index: int
    count: int

    def __post_init__(self):
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise UserError(f"--part {self.index} --parts {self.count}: expected 0 <= part < parts")

    @property
    def tag(self) -> str:
        return f"p{self.index:04d}"

    @property
    def manifest(self) -> str:
        return f"manifest.part-{self.index:04d}.json"


# --------------------------------------------------------------------------- one sample
def _image_bytes(img: Image.Image, quality: int | None) -> bytes:
    """JPEG at ``quality``, or PNG (lossless) when it is None."""
    buf = io.BytesIO()
    if quality is None:
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def shard_key(key: str) -> str:
    """A sample's key as a tar member's prefix. WebDataset (its own reader and ours) splits a member's name at
    the first dot, so ``look.v1.person.jpg`` would join ``look.v2``'s members under the key ``look``: dots (and
    the escape character) are percent-encoded, reversibly; the sample's json keeps its name as it was."""
    return key.replace("%", "%25").replace(".", "%2E")


def encode_sample(s: LoadedSample, opts: ShardOptions) -> dict:
    size = opts.image_size
    person, scale, pad = letterbox(s.person, size)
    ca, _, _ = letterbox(s.ca, size)
    garment, g_scale, g_pad = letterbox(s.garment, size)
    lossless = s.meta.get("split") == "test"
    quality = None if lossless else opts.jpeg_quality
    sample = {
        "__key__": shard_key(s.key),
        **{file_name(name, lossless): _image_bytes(img, quality)
           for name, img in ((PERSON, person), (CA, ca), (GARMENT, garment))},
        file_name(PERSON_POSE): _npy(normalise_pose(s.person_pose, scale, pad, size, opts.num_keypoints)),
        file_name(GARMENT_POSE): _npy(normalise_pose(s.garment_pose, g_scale, g_pad, size, opts.num_keypoints)),
        "json": json.dumps({"key": s.key, "person_size": list(s.person.size), "garment_size": list(s.garment.size),
                            "garment_pose": s.garment_pose is not None, **s.meta}).encode(),
    }
    if s.mask is not None:
        mask, _, _ = letterbox(s.mask.convert("L"), size, 0, Image.NEAREST)
        buf = io.BytesIO()
        mask.save(buf, format="PNG")
        sample[file_name(MASK)] = buf.getvalue()
    return sample


def reason(problem: str) -> str:
    return next((name for text, name in REASONS if text in problem), "other")


# Worker functions take (sample, options) so that a process pool can run them.
def _check(job):
    sample, opts = job
    try:
        return sample.key, [], load_sample(sample, opts.num_keypoints, build=False).meta.get("keypoints", {})
    except SampleError as err:
        return sample.key, err.problems, {}


def _convert(job):
    sample, opts = job
    return encode_sample(load_sample(sample, opts.num_keypoints, size=opts.image_size), opts)


def _parallel(fn, jobs: list, workers: int) -> Iterable:
    if workers <= 1:
        yield from map(fn, jobs)
        return
    with get_context("fork").Pool(workers) as pool:
        yield from pool.imap(fn, jobs, chunksize=4)


# --------------------------------------------------------------------------- the folder
def _finished_shards(out: Path, manifest: dict, split: str) -> list[dict]:
    """The prefix of a previous run's shards of ``split`` that are on disk exactly as recorded."""
    kept = []
    for entry in manifest.get("shards", {}).get(split, []):
        if not SHARD_NAME.match(str(entry.get("name", ""))):  # a manifest never names a file outside `out`
            raise UserError(f"{out / 'manifest.json'}: shard name {entry.get('name')!r} is not of the form "
                            f"{split}-NNNNNN.tar; delete the manifest to start over")
        path = out / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or atomic.sha256_of(path) != entry["sha256"]:
            break
        kept.append(entry)
    return kept


def write_shards(out: Path, samples: list[SourceSample], opts: ShardOptions, workers: int = 1,
                 skip_bad: bool = False, validate: bool = True, scan_problems: list[str] = (),
                 sources: dict[str, str] | None = None, log: Callable[[str], None] = print,
                 part: Part | None = None) -> dict:
    """Check every sample, then write ``out/{train,val,test}-NNNNNN.tar`` and ``out/manifest.json``. Raises
    UserError listing every problem (before anything is written) unless ``skip_bad``; with no usable sample
    at all, always. With ``part``, only that part's samples (by ``part_of``) and its own shard and manifest
    names; the scan's problems (files matching no sample) are part 0's to report."""
    if part is not None:
        samples = [s for s in samples if part_of(s.key, part.count) == part.index]
        scan_problems = scan_problems if part.index == 0 else []
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
    if not good and (samples or part is None):  # a part of a small set may hold no sample at all
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
    manifest_path = out / (part.manifest if part else "manifest.json")
    prefix = f"{part.tag}-" if part else ""
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if previous and previous.get("settings") != settings:
        changed = sorted(k for k in settings if previous.get("settings", {}).get(k) != settings[k])
        raise UserError(f"{out} holds shards made with other settings ({', '.join(changed)} differ); "
                        "write to another folder or delete that one")
    mine = {"index": part.index, "count": part.count} if part else None
    if previous and previous.get("part") != mine:
        raise UserError(f"{manifest_path} belongs to part {previous['part']['index']} of {previous['part']['count']}, "
                        f"not {part.index} of {part.count}: the same --parts as the other parts, or another folder")
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
    if part is not None:
        manifest["part"] = mine
    if skip_bad and problems:
        skipped = out / (f"skipped.part-{part.index:04d}.json" if part else "skipped.json")
        atomic.write_json(skipped, {"problems": list(problems)})
        log(f"skipping {len(bad_keys)} bad sample(s) and {len(scan_problems)} unmatched file(s); see {skipped}")

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
            name = f"{split}-{prefix}{index:06d}.tar"
            final = out / name
            os.replace(tmp, final)
            manifest["shards"][split].append({"name": name, "samples": count, "bytes": final.stat().st_size,
                                              "sha256": atomic.sha256_of(final), "first_key": first})
            atomic.write_json(manifest_path, manifest)
            writer = None

        for n, encoded in enumerate(_parallel(_convert, [(s, opts) for s in todo], workers), 1):
            if writer is None:
                tmp = out / f".{split}-{prefix}{index:06d}.tar.tmp"
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
    for split in SPLITS:  # this run's own leftovers: other parts may be writing into the same folder
        for leftover in out.glob(f".{split}-{prefix}[0-9]*.tar.tmp"):
            leftover.unlink()
    return manifest


def merge_parts(out: Path, log: Callable[[str], None] = print) -> dict:
    """``out/manifest.json`` from the manifests of every part written there: the shards of all parts, each
    split's counts, the keypoints and the skipped samples summed. Refuses parts missing or unfinished, or made
    from other sources or settings, naming them."""
    found = sorted(out.glob("manifest.part-*.json"))
    if not found:
        raise UserError(f"{out} holds no part manifests (manifest.part-NNNN.json): write the parts with "
                        "tools/make_shards.py ... --part I --parts N first")
    parts = {p.name: json.loads(p.read_text()) for p in found}
    first_name, first = next(iter(parts.items()))
    count = first["part"]["count"]
    for name, m in parts.items():
        if m["part"]["count"] != count:
            raise UserError(f"{out}: {name} is part of {m['part']['count']} parts, {first_name} of {count}: "
                            "the parts come from different runs; delete the stale ones")
        if m["settings"] != first["settings"]:
            changed = sorted(k for k in m["settings"] if first["settings"].get(k) != m["settings"][k])
            raise UserError(f"{out}: {name} was made with other settings than {first_name} ("
                            + ", ".join(f"{k}: {m['settings'][k]!r} vs {first['settings'].get(k)!r}" for k in changed)
                            + "); re-run it with the same source and options")
    indices = {m["part"]["index"]: m for m in parts.values()}
    missing = [i for i in range(count) if i not in indices]
    unfinished = [i for i, m in sorted(indices.items()) if not m.get("complete")]
    if missing or unfinished:
        raise UserError(f"{out}: of {count} parts, " + "; ".join(
            f"{what}: {', '.join(map(str, which))}" for what, which in (("missing", missing), ("unfinished", unfinished))
            if which) + " (re-run those with --part I --parts N: each redoes only itself)")

    ordered = [indices[i] for i in range(count)]

    def total(get) -> dict:
        sums = Counter()
        for m in ordered:
            sums.update(get(m))
        return dict(sums)

    manifest = {"settings": first["settings"], "complete": True, "parts": count,
                "shards": {s: [e for m in ordered for e in m["shards"].get(s, [])] for s in SPLITS},
                "samples": total(lambda m: m["samples"]),
                "splits": {s: {"source": first["splits"][s]["source"],
                               "pairs": total(lambda m: m["splits"][s]["pairs"])} for s in SPLITS},
                "keypoints": total(lambda m: m["keypoints"]),
                "skipped": {k: v for m in ordered for k, v in m["skipped"].items()},
                "skipped_reasons": total(lambda m: m["skipped_reasons"]),
                "scan_problems": [p for m in ordered for p in m["scan_problems"]]}
    problems = [p for f in sorted(out.glob("skipped.part-*.json")) for p in json.loads(f.read_text())["problems"]]
    if problems:
        atomic.write_json(out / "skipped.json", {"problems": problems})
    atomic.write_json(out / "manifest.json", manifest)
    log(f"merged {count} parts: " + ", ".join(f"{manifest['samples'].get(s, 0)} {s}" for s in SPLITS)
        + f" samples in {sum(len(v) for v in manifest['shards'].values())} shards")
    return manifest


def check_shard_size(config, unet_number: int) -> None:
    """Refuse shards that UNet ``unet_number`` would have to stretch: of another aspect ratio than its image
    size (every image would be distorted) or smaller than it (it would learn to sharpen upsampled images).
    Shards written at the top UNet's size serve every UNet; the lower ones resize from them."""
    path = Path(config.data_dir) / "manifest.json"
    if config.data.train_shards or not path.is_file():
        return  # shards named directly: no manifest says their size
    h, w = json.loads(path.read_text()).get("settings", {}).get("image_size", (0, 0))
    uh, uw = config.image_size(unet_number)
    key = config.key(unet_number, "image_size")
    if h * uw != w * uh:
        raise UserError(f"{config.data_dir} holds shards of {h}x{w} (HxW) but UNet {unet_number} trains at {uh}x{uw} "
                        f"('{key}'), another aspect ratio: write the shards with --image-size {uh}x{uw} (or a "
                        f"multiple of it)")
    if h < uh:
        raise UserError(f"{config.data_dir} holds shards of {h}x{w} (HxW), smaller than the {uh}x{uw} UNet "
                        f"{unet_number} trains at ('{key}'): write the shards at the top UNet's size "
                        f"(tools/make_shards.py --image-size {uh}x{uw}); the lower UNets resize from it")


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file() and any(Path(folder).glob("manifest.part-*.json")):
        raise UserError(f"{folder} holds shards written in parts but no manifest.json: merge them with "
                        f"tools/make_shards.py --merge --out {folder}")
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {folder} a shard folder written by tools/make_shards.py?")
    manifest = json.loads(path.read_text())
    if not manifest.get("complete"):
        raise UserError(f"{path}: the shards are incomplete (the writing run was interrupted); "
                        "re-run tools/make_shards.py into the same folder to finish them")
    return manifest


def preview_sheet(shards: Path, path: Path, rows: int = 6) -> None:
    """The first paired samples of the shards as written: their images (person | ca | garment), a row each."""
    urls = [str(p) for p in sorted(shards.glob("*.tar"))]
    paired = (s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)
              if json.loads(s["json"]).get("pair", "paired") == "paired")  # an unpaired one repeats a person
    images = [[Image.open(io.BytesIO(next(s[f] for f in MEMBERS[k].files if f in s))).convert("RGB")
               for k in SHARD_IMAGES] for _, s in zip(range(rows), paired)]
    w, h = images[0][0].size
    sheet = Image.new("RGB", (len(SHARD_IMAGES) * w, len(images) * h), "white")
    for r, row in enumerate(images):
        for c, img in enumerate(row):
            sheet.paste(img, (c * w, r * h))
    atomic.save_image(sheet, path)
