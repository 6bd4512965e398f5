"""The training and validation input pipelines over WebDataset shards.

Training data is a function of the global micro-batch *slot*, never of which process reads it. Step ``s``,
micro-step ``m`` of rank ``r`` in a world of ``N`` ranks with ``A`` accumulation steps consumes slot
``g = (s*A + m)*N + r``; slot ``g`` is batch ``g // V`` of virtual stream ``g % V`` (``data.streams``). A
virtual stream is cut into segments of ``segment_batches`` batches; each segment draws shards with
replacement (``wds.ResampledShards``) and shuffles them through a buffer, both seeded by (seed, stream,
segment), and each sample's augmentation is seeded by its position. Hence:
- no two ranks read the same batch, and with ``data.streams`` fixed, 1 rank x A accumulation steps sees
  the same global batches as A ranks;
- a run resumed at step ``S`` rebuilds the segments holding its next slots, skips what came before in
  them (decoding, not augmenting), and sees exactly the batches the uninterrupted run would have seen.
Each loader worker serves every W-th of its rank's slots (PyTorch's DataLoader takes batches from its
workers in turn) and reads the virtual streams those slots belong to; with ``V`` a multiple of ranks x
workers (the default, ``streams: 0``) each worker reads exactly one stream.

Validation reads every sample exactly once across all ranks and workers: by shard when there are enough
shards, else by sample index.

A sample is decoded only as far as the UNet reads it: its target and the inputs the UNet is conditioned on
(its conditioning's ``sample_inputs``); UNet 3, conditioned on the low-res image alone, which is derived from the target,
decodes only the person image. Every image is decoded whole, as evaluation and inference decode it, and
resized by the one function they resize with (``preprocess.unet_inputs``): a UNet trains on the pixels it is
later given, to the bit (tests/test_same_pixels.py). A JPEG decoded at a reduced DCT scale (libjpeg's 1/2, 1/4,
1/8) is a box-filtered picture, up to 45 grey levels from the antialiased resize of the whole one.

Images travel from the decoder through the loader workers to the trainer as uint8 and become [-1, 1] floats
on the device (``preprocess.to_device``).

Bad samples (a corrupt or missing member, a pose of the wrong shape or with NaN) are skipped and counted;
each batch carries its worker's counts so the trainer can report them. A shard that cannot be opened is
named in the counts; if nothing at all can be read, the stream raises :class:`DataError`. Remote shards
(``http(s)://``, ``pipe:``) are read with timeouts and retries (remote.py).
"""
from __future__ import annotations

import functools
import glob
import io
import json
import signal
from collections import Counter
from pathlib import Path
from typing import Callable

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..batch import INPUTS, MEMBERS, PERSON
from ..compat import shutdown_workers
from ..config import Config, DataConfig
from ..errors import DataError
from ..seeding import rng_for, seed_for
from .preprocess import pose_tensors, unet_inputs
from .remote import read_shards


class BadSample(Exception):
    pass


# --------------------------------------------------------------------------- shard specs
def resolve_shards(specs: list[str] | str, what: str) -> list[str]:
    """Brace patterns, globs, lists, local paths and ``pipe:`` commands -> a list of shard URLs. Local
    names are checked now, so a typo is an error naming the spec rather than an empty stream later."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    urls: list[str] = []
    for spec in specs:
        if spec.startswith("pipe:") or "://" in spec:
            urls.extend(braceexpand.braceexpand(spec))
            continue
        matched = []
        for name in braceexpand.braceexpand(spec):
            matched.extend(sorted(glob.glob(name)) if glob.has_magic(name) else [name] if Path(name).is_file() else [])
        if not matched:
            raise DataError(f"{what} shard spec {spec!r} matches no file")
        urls.extend(matched)
    if not urls:
        raise DataError(f"no {what} shards given")
    return urls


def shard_urls(config: Config, split: str) -> list[str]:
    specs = config.data.train_shards if split == "train" else config.data.val_shards
    if specs:
        return resolve_shards(specs, split)
    pattern = Path(config.data_dir) / f"{split}-*.tar"
    if not glob.glob(str(pattern)):
        raise DataError(f"data_dir '{config.data_dir}' holds no {split} shards ({pattern.name}); convert your "
                        "data with tools/make_shards.py, or name shards in data.train_shards/data.val_shards")
    return resolve_shards(str(pattern), split)


# --------------------------------------------------------------------------- one sample
def _image(raw: dict, name: str, grey: bool = False) -> Image.Image:
    """A member decoded whole (a corrupt one fails here)."""
    try:
        with Image.open(io.BytesIO(raw[name])) as img:
            return img.convert("L" if grey else "RGB")
    except Exception as err:
        raise BadSample(f"unreadable {name} ({type(err).__name__})") from None


def _pose(raw: dict, name: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        a = np.load(io.BytesIO(raw[name]), allow_pickle=False)
    except Exception as err:
        raise BadSample(f"unreadable {name} ({type(err).__name__})") from None
    if a.shape != (k, 3):
        raise BadSample(f"{name} of shape {a.shape}, expected ({k}, 3)")
    if not np.isfinite(a).all():
        raise BadSample(f"{name} has NaN or infinite values")
    return pose_tensors(a)


def decode(raw: dict, num_keypoints: int, inputs: tuple[str, ...] = INPUTS) -> dict:
    """The target and ``inputs`` of a raw shard sample (PIL images, pose tensors); nothing else is decoded.
    An optional member (the mask) is read where the shard has it; ``source`` gives the release's (person,
    garment) file names from the sample's json."""
    wanted = [PERSON, *(name for name in inputs if name in MEMBERS and MEMBERS[name].files)]
    member = {name: next((f for f in MEMBERS[name].files if f in raw), None) for name in wanted}
    missing = [MEMBERS[name].files[0] for name in wanted if member[name] is None and not MEMBERS[name].optional]
    if missing:
        raise BadSample(f"missing member(s) {', '.join(missing)}")
    sample = {"key": raw["__key__"]}
    for name in (name for name in wanted if member[name] is not None):
        kind = MEMBERS[name].kind
        if kind == "pose":
            sample[name], sample[f"{name}_valid"] = _pose(raw, member[name], num_keypoints)
        else:
            sample[name] = _image(raw, member[name], grey=kind == "mask")
    if len({sample[name].size for name in wanted if MEMBERS[name].kind == "image"}) > 1:
        raise BadSample("images of different sizes")
    # Whether the person wears this garment (a ground truth exists) or another's (a release's unpaired test),
    # and DressCode's category, by which the evaluation reports too; with ``source`` among the inputs, the
    # release's file names (person, garment), by which other methods name their results.
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
        sample["pair"], sample["category"] = meta.get("pair", "paired"), meta.get("category", "")
        if "source" in inputs:
            source = meta.get("source") or {}
            sample["source"] = tuple(Path(str(source.get(role, ""))).stem for role in ("person", "garment"))
    except (ValueError, AttributeError) as err:
        raise BadSample(f"unreadable json ({type(err).__name__})") from None
    return sample


def collate(samples: list[dict]) -> dict:
    keys = set.intersection(*(set(s) for s in samples))
    return {k: torch.stack([s[k] for s in samples]) if torch.is_tensor(samples[0][k]) else [s[k] for s in samples]
            for k in keys}


# --------------------------------------------------------------------------- skip accounting
RETRIED = "shard read again: "  # a count of reads retried, not of samples skipped
UNREADABLE = "unreadable shard "


def _by_kind(counts: Counter) -> tuple[dict[str, int], dict[str, int]]:
    """(samples skipped and shards given up on, by reason; reads retried, by shard)."""
    retried = {r: n for r, n in counts.items() if r.startswith(RETRIED)}
    return {r: n for r, n in counts.items() if r not in retried}, retried


def store_trouble(counts: Counter) -> dict[str, int]:
    """Reads retried and shards given up on, as the metrics name them; empty while there were none."""
    skipped, retried = _by_kind(counts)
    unreadable = sum(n for r, n in skipped.items() if r.startswith(UNREADABLE))
    return ({"data/shard_retries": sum(retried.values()), "data/shards_unreadable": unreadable}
            if retried or unreadable else {})


def skip_report(counts: Counter) -> str:
    """The run's data report: samples skipped and reads retried, each by reason."""
    skipped, retried = _by_kind(counts)
    return (f"data: {sum(skipped.values())} sample(s) skipped" + "".join(f"\n  {n} x {r}" for r, n in skipped.items())
            + (f"; {sum(retried.values())} shard read(s) retried" if retried else "")
            + "".join(f"\n  {n} x {r}" for r, n in retried.items()))


class SkipCounter:
    """Counts skipped samples and unreadable shards by reason; raises once nothing can be read at all
    (shards resampled forever would otherwise fail forever, silently)."""

    def __init__(self, num_urls: int):
        self.counts: Counter = Counter()
        self.limit = max(20, 2 * num_urls)
        self.read_failures = self.bad_in_a_row = 0

    def shard_failed(self, url: str, err: Exception, attempts: int) -> None:
        """A shard given up on after ``attempts`` reads (remote.shard_samples): skipped, and counted."""
        reason = f"{UNREADABLE}{url}: {type(err).__name__}: {err}"[:300]
        self.counts[reason] += 1
        self.read_failures += 1
        if self.read_failures >= self.limit:
            raise DataError(f"no sample could be read after {self.read_failures} attempts; last: {reason}"
                            + (f" ({attempts} reads each)" if attempts > 1 else ""))

    def shard_retried(self, url: str, err: Exception) -> None:
        self.counts[f"{RETRIED}{url}"] += 1

    def arrived(self, raw: dict) -> dict:
        self.read_failures = 0
        return raw

    def bad_sample(self, key: str, reason: str) -> None:
        self.counts[f"bad sample: {reason}"] += 1
        self.bad_in_a_row += 1
        if self.bad_in_a_row >= self.limit * 10:
            raise DataError(f"no good sample among the last {self.bad_in_a_row}; last: {key}: {reason}")

    def ok(self) -> None:
        self.bad_in_a_row = 0


def _worker_init(_):
    # A stop signal is for the training process, which finishes its step and saves; launchers send it to
    # the whole process tree, and a loader worker dying of it would fail that step. Workers exit with it.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


# --------------------------------------------------------------------------- training
class TrainStream(IterableDataset):
    def __init__(self, urls: list[str], config: Config, unet_number: int, rank: int, world_size: int,
                 batch_size: int, accumulation: int = 1, start_step: int = 0):
        super().__init__()
        self.urls, self.config, self.unet_number = urls, config, unet_number
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.first_local = start_step * accumulation  # this rank's micro-batches already consumed
        self.workers = max(1, config.data.num_workers)
        self.streams = config.data.streams or world_size * self.workers

    def _samples(self, stream: int, segment: int, counter: SkipCounter):
        seed = seed_for(self.config.data.seed, stream, segment)
        buf = self.config.data.shuffle_buffer
        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=seed, worker_seed=lambda: 0, deterministic=True),
            read_shards(self.config.data, counter),
            wds.map(counter.arrived),
            wds.shuffle(buf, initial=min(buf, 100), seed=seed),
        )
        position = 0
        for raw in pipeline:
            try:
                sample = decode(raw, self.config.num_keypoints, self.config.conditioning(self.unet_number).sample_inputs)
            except BadSample as err:
                counter.bad_sample(raw.get("__key__", "?"), str(err))
                continue
            counter.ok()
            yield seed, position, sample
            position += 1

    def _stream(self, stream: int, first: int, counter: SkipCounter):
        """(index, batch) of one virtual stream from batch ``first`` on."""
        seg_len = self.config.data.segment_batches
        segment, skip = divmod(first, seg_len)
        while True:
            samples = self._samples(stream, segment, counter)
            for _ in range(skip * self.batch_size):
                next(samples)
            for k in range(skip, seg_len):
                batch = [unet_inputs(sample, self.config, self.unet_number, rng_for(seed, position))
                         for seed, position, sample in (next(samples) for _ in range(self.batch_size))]
                yield segment * seg_len + k, collate(batch)
            segment, skip = segment + 1, 0

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"TrainStream built for {self.workers} workers, run with {info.num_workers}")
        counter, open_streams = SkipCounter(len(self.urls)), {}
        # The loader restarts with worker 0, which therefore serves the first micro-batch not yet consumed.
        local = self.first_local + worker
        while True:
            slot = local * self.world_size + self.rank
            stream, index = slot % self.streams, slot // self.streams
            if stream not in open_streams:
                open_streams[stream] = self._stream(stream, index, counter)
            at, batch = next(open_streams[stream])
            while at < index:  # a stream shared with other workers: skip their batches
                at, batch = next(open_streams[stream])
            batch["skipped"], batch["worker"] = dict(counter.counts), worker
            yield batch
            local += self.workers


class TrainLoader:
    """A rank's training micro-batches from ``start_step`` on; sums the workers' skip counts."""

    def __init__(self, config: Config, unet_number: int, rank: int, batch_size: int, world_size: int = 1,
                 accumulation: int = 1, start_step: int = 0):
        urls = shard_urls(config, "train")
        self.stream = TrainStream(urls, config, unet_number, rank, world_size, batch_size, accumulation, start_step)
        w = config.data.num_workers
        self.loader = DataLoader(self.stream, batch_size=None, num_workers=w, persistent_workers=w > 0,
                                 prefetch_factor=config.data.prefetch_factor if w > 0 else None, worker_init_fn=_worker_init,
                                 pin_memory=torch.cuda.is_available())
        self.skipped_by_worker: dict[int, dict] = {}
        self._iterator = None

    def skipped(self) -> Counter:
        total: Counter = Counter()
        for counts in self.skipped_by_worker.values():
            total.update(counts)
        return total

    def __iter__(self):
        self._iterator = iter(self.loader)
        for batch in self._iterator:
            self.skipped_by_worker[batch.pop("worker")] = batch.pop("skipped")
            yield batch

    def close(self) -> None:
        """Stop the loader workers now, on every way a run ends."""
        shutdown_workers(self._iterator)
        self._iterator = None


# --------------------------------------------------------------------------- validation
class Quota:
    """Which samples a pass over shards takes: the first ``total`` in the shards' order, and of those the first
    ``paired`` paired and ``unpaired`` unpaired ones (None: no limit). Applied to the raw samples before any
    decoding, by every rank alike."""

    def __init__(self, paired: int | None = None, unpaired: int | None = None, total: int | None = None):
        self.left = {"paired": paired, "unpaired": unpaired}
        self.total = total

    def __call__(self, raw: dict) -> bool:
        if self.total is not None and self.total <= 0:
            return False
        try:
            pair = json.loads(raw["json"]).get("pair", "paired") if "json" in raw else "paired"
        except (ValueError, AttributeError):
            return False  # an unreadable sample: the decoder would skip it on every rank alike
        left = self.left.get(pair, 0)
        if left is not None and left <= 0:
            return False
        if left is not None:
            self.left[pair] = left - 1
        if self.total is not None:
            self.total -= 1
        return True

    def done(self) -> bool:
        return (self.total is not None and self.total <= 0) or all(v is not None and v <= 0
                                                                   for v in self.left.values())


class ValDataset(IterableDataset):
    """Every sample of ``urls`` exactly once over ``world_size`` ranks x the loader's workers, decoded as far
    as ``inputs`` and turned into what the consumer wants by ``prepare`` (:meth:`Data.val`: one UNet's
    inputs; inference: every UNet's at once, from one decode)."""

    def __init__(self, urls: list[str], num_keypoints: int, inputs: tuple[str, ...], prepare: Callable[[dict], dict],
                 rank: int = 0, world_size: int = 1, select: Callable[[dict], bool] | None = None,
                 data: DataConfig | None = None):
        super().__init__()
        self.data = data or DataConfig()  # how remote shards are read
        self.urls, self.num_keypoints, self.inputs, self.prepare = urls, num_keypoints, inputs, prepare
        self.select = select
        self.rank, self.world_size = rank, world_size
        self.counter = SkipCounter(len(urls))

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        consumers, me = self.world_size * workers, self.rank * workers + worker
        # A selection is made in the shards' order, which every consumer must then see whole.
        by_shard = self.select is None and len(self.urls) >= consumers
        urls = self.urls[me::consumers] if by_shard else self.urls
        raw_samples = wds.DataPipeline(wds.SimpleShardList(urls), read_shards(self.data, self.counter))
        if self.select is not None:
            raw_samples = filter(self.select, raw_samples)
        for index, raw in enumerate(raw_samples):
            if not by_shard and index % consumers != me:
                continue
            try:
                sample = decode(raw, self.num_keypoints, self.inputs)
            except BadSample as err:
                self.counter.bad_sample(raw.get("__key__", "?"), str(err))
                continue
            yield self.prepare(sample)


class Data:
    """What a training run reads, from one place (open_clip's ``get_data``): ``train(...)``, this rank's
    training micro-batches; ``val(...)``, a fresh pass over the validation set, this rank's share of it or,
    with ``whole``, all of it in order (the previews' first samples). Both shard lists are resolved when it
    is made, so a wrong path is an error at start-up rather than in a loader worker later."""

    def __init__(self, config: Config, unet_number: int, rank: int = 0, world_size: int = 1):
        self.config, self.unet_number, self.rank, self.world_size = config, unet_number, rank, world_size
        shard_urls(config, "train")
        self.val_urls = shard_urls(config, "val")

    def train(self, batch_size: int, accumulation: int = 1, start_step: int = 0) -> TrainLoader:
        return TrainLoader(self.config, self.unet_number, self.rank, batch_size, self.world_size, accumulation,
                           start_step)

    def val(self, batch_size: int, whole: bool = False, extra: tuple[str, ...] = ()) -> DataLoader:
        """UNet ``unet_number``'s validation inputs (and the shard members ``extra`` names, where the shards
        have them): whole images, not augmented, each sample once."""
        config, n = self.config, self.unet_number
        rank, world_size = (0, 1) if whole else (self.rank, self.world_size)
        inputs = tuple(dict.fromkeys(config.conditioning(n).sample_inputs + tuple(extra)))
        dataset = ValDataset(self.val_urls, config.num_keypoints, inputs,
                             functools.partial(unet_inputs, config=config, unet_number=n), rank, world_size,
                             data=config.data)
        return DataLoader(dataset, batch_size=batch_size, num_workers=config.data.num_workers, collate_fn=collate,
                          worker_init_fn=_worker_init, pin_memory=torch.cuda.is_available())
