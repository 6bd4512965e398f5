"""The field's protocol (VITON-HD / DressCode papers, LaDI-VTON's ``val_metrics.py``, CatVTON's ``eval.py``):
on the paired samples (each person in their own garment: a ground truth exists) SSIM, LPIPS, FID and KID; on
the unpaired ones (another person's garment) FID and KID; at the cascade's output size and at the sizes the
field reports, per DressCode category and over all. FID and KID compare with the **reference set**: every test
person's ground truth in the test shards (each person once; per DressCode category for its groups), whatever
subset was generated, as LaDI-VTON's ``make_custom_stats`` and CatVTON's ``gt_folder`` do (:class:`ReferenceSet`,
its features cached on disk like clean-fid's custom statistics). Each metric as its reference computes it
(tryon_ds/metrics.py). :class:`FieldMetrics` measures one rank's samples and keeps per-sample values and
Inception features, so that ranks send features, not images, and :func:`summarise` gives the same table
however the test set was split.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from .. import atomic, metrics
from .quality import psnr, size_name

class FieldMetrics:
    """The field's metrics for one rank's try-ons, per sample: SSIM, LPIPS and PSNR of paired samples, and
    the Inception features of every try-on, at each size. Networks whose weight files are absent are left
    out, and ``notes`` says which metrics that skips and what file they need."""

    def __init__(self, sizes: list[tuple[int, int]], weights: dict[str, Path | None], device: torch.device,
                 lpips_net: str = "alex"):
        self.sizes, self.device = sizes, device
        self.notes = []
        self.inception = self.lpips = None
        if weights.get("inception"):
            self.inception = metrics.InceptionFeatures(weights["inception"], device)
        else:
            self.notes.append(metrics.missing_note("inception"))
        trunk = metrics.LPIPS_NETS[lpips_net].weights
        if weights.get(trunk) and weights.get("lpips"):
            self.lpips = metrics.LPIPS.from_files(lpips_net, weights[trunk], weights["lpips"], device)
        else:
            self.notes.append(metrics.missing_note(trunk if not weights.get(trunk) else "lpips"))
        self.records: dict[str, dict] = {}

    def add(self, keys: list[str], pairs: list[str], categories: list[str], tryons: torch.Tensor,
            targets: torch.Tensor) -> None:
        """uint8 (B, 3, H, W) try-ons and the shards' person images (the targets, for paired samples)."""
        paired = torch.tensor([p == "paired" for p in pairs])
        for key, pair, category in zip(keys, pairs, categories):
            self.records[key] = {"pair": pair, "category": category, "sizes": {}}
        for size in self.sizes:
            fake, real = metrics.resize_to(tryons, size), metrics.resize_to(targets[paired], size)
            values = {}
            if paired.any():
                mine, theirs = metrics.to_unit(fake[paired]), metrics.to_unit(real)
                values = {"ssim": metrics.ssim(mine, theirs), "psnr": psnr(mine, theirs, torch.ones_like(theirs[:, :1]))}
                if self.lpips is not None:
                    values["lpips"] = self.lpips((mine * 2 - 1).to(self.device), (theirs * 2 - 1).to(self.device)).cpu()
            fake_features = self.inception(fake).float().numpy() if self.inception is not None else None
            j = 0
            for i, key in enumerate(keys):
                entry = {}
                if fake_features is not None:
                    entry["fake"] = fake_features[i]
                if paired[i]:
                    entry.update({name: float(v[j]) for name, v in values.items()})
                    j += 1
                self.records[key]["sizes"][size_name(size)] = entry


def _recorded_sha256(manifest: Path) -> dict[str, str]:
    """{shard name: SHA-256} as tools/make_shards.py recorded them; empty without a readable manifest."""
    try:
        return {e["name"]: e["sha256"] for split in json.loads(manifest.read_text()).get("shards", {}).values()
                for e in split if e.get("sha256")}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


class ReferenceSet:
    """The real side of FID and KID: the Inception features of every test person's ground truth, each person
    once (by the pixels of their image, so a person in both a paired and an unpaired sample counts once), in a
    fixed order, with their DressCode category; one array per evaluation size.

    Made once per (test shards, size, Inception file) and kept in ``cache`` as ``reference-<hash>.npz``, the
    hash over the shards' names and SHA-256 (from their manifest, else their size and mtime), the size, how the
    images are brought to it, and the network file's SHA-256: a later evaluation of the same test set, of any
    subset or bundle, reads it. Each rank computes its share of the shards; rank 0 merges and writes."""

    VERSION = 2  # what a cached file holds and how it was made; bump when that changes (2: JPEGs decoded whole)

    def __init__(self, features: dict[str, np.ndarray], categories: list[str]):
        self.features, self.categories = features, categories

    def rows(self, group: str) -> np.ndarray:
        return np.array([i for i, c in enumerate(self.categories) if group == "all" or c == group], dtype=np.int64)

    def real(self, group: str, size: str) -> list[np.ndarray]:
        return list(self.features[size][self.rows(group)])

    @staticmethod
    def cache_paths(cache: Path, urls: list[str], sizes: list[tuple[int, int]], base: tuple[int, int],
                    network: Path) -> dict[str, Path]:
        """{size name: its cache file}; what the sizes share (the shards, the network's SHA-256) read once."""
        shards, manifests = [], {}
        for url in urls:
            path = Path(url)
            entry: object = url
            if path.is_file():
                if path.parent not in manifests:
                    manifests[path.parent] = _recorded_sha256(path.parent / "manifest.json")
                stat = path.stat()
                entry = [path.name, manifests[path.parent].get(path.name) or f"{stat.st_size}:{stat.st_mtime_ns}"]
            shards.append(entry)
        shared = {"version": ReferenceSet.VERSION, "shards": shards, "base": list(base),
                  "network": atomic.sha256_of(network)}
        return {size_name(size): cache / "reference-{}.npz".format(
                    hashlib.sha256(json.dumps({**shared, "size": list(size)}).encode()).hexdigest()[:24])
                for size in sizes}

    @classmethod
    def load(cls, paths: dict[str, Path]) -> "ReferenceSet | None":
        """The cached set at every size, or None if one is missing or unreadable (it is then made again)."""
        features, categories = {}, None
        for size, path in paths.items():
            try:
                with np.load(path, allow_pickle=False) as f:
                    features[size], cats = f["features"], [str(c) for c in f["categories"]]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                return None
            if categories is not None and cats != categories:
                return None
            categories = cats
        return cls(features, categories or [])

    def save(self, paths: dict[str, Path]) -> None:
        for size, path in paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            np.savez(buffer, features=self.features[size], categories=np.array(self.categories, dtype=str))
            atomic.write_bytes(path, buffer.getvalue())

    @classmethod
    def merge(cls, parts: list[dict[str, tuple]], sizes: list[str]) -> "ReferenceSet":
        """Each rank's {pixel hash: (category, {size: features})} -> one set in hash order."""
        merged = {}
        for part in parts:
            merged.update(part)
        order = sorted(merged)
        features = {size: np.stack([merged[h][1][size] for h in order]) if order else np.zeros((0, 2048))
                    for size in sizes}
        return cls(features, [merged[h][0] for h in order])


def _mean(records: list[dict], size: str, name: str) -> float | None:
    values = [r["sizes"][size][name] for r in records if name in r["sizes"][size]]
    return sum(values) / len(values) if values else None


def _distances(real: list[np.ndarray], fake: list[np.ndarray], seed: int) -> dict:
    """FID and KID (x1000, its std over the subsets, the subset size) of ``fake`` against ``real``."""
    if len(real) < 2 or len(fake) < 2:
        return {"fid": None, "kid_x1000": None, "kid_x1000_std": None, "kid_subset_size": None}
    real_t, fake_t = torch.from_numpy(np.stack(real)), torch.from_numpy(np.stack(fake))
    kid, spread = metrics.kernel_distance(real_t, fake_t, seed=seed)
    return {"fid": metrics.frechet_distance(real_t, fake_t), "kid_x1000": 1000 * kid, "kid_x1000_std": 1000 * spread,
            "kid_subset_size": min(len(real), len(fake), metrics.KID_SUBSET_SIZE)}


def summarise(records: dict[str, dict], sizes: list[str], reference: ReferenceSet | None, seed: int = 0) -> dict:
    """{group: {size: {"reference_n", "paired": {...}, "unpaired": {...}}}}, groups "all" and each DressCode
    category present. Paired: SSIM, LPIPS, PSNR of the try-ons against their targets; paired and unpaired: FID
    and KID of the try-ons against the group's reference set (every test person of the group, once). Values are
    taken in key order and rounded to 4 decimals, so the report does not depend on how the samples were split."""
    ordered = [records[k] for k in sorted(records)]
    categories = sorted({r["category"] for r in ordered if r["category"]})
    out = {}
    for group in ["all", *categories]:
        members = [r for r in ordered if group == "all" or r["category"] == group]
        paired = [r for r in members if r["pair"] == "paired"]
        unpaired = [r for r in members if r["pair"] == "unpaired"]
        out[group] = {}
        for size in sizes:
            real = reference.real(group, size) if reference is not None else []

            def fakes(rs):
                return [r["sizes"][size]["fake"] for r in rs if "fake" in r["sizes"][size]]

            row = {"paired": {"n": len(paired), **{m: _mean(paired, size, m) for m in ("ssim", "lpips", "psnr")},
                              **_distances(real, fakes(paired), seed)},
                   "unpaired": {"n": len(unpaired), **_distances(real, fakes(unpaired), seed)}}
            out[group][size] = {"reference_n": len(real) if reference is not None else None,
                                **{kind: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in values.items()}
                                   for kind, values in row.items()}}
    return out


def markdown(report: dict, notes: list[str], lpips_net: str = "alex") -> str:
    """The field's table as Markdown: a row per group and size, then how each number was computed."""
    def cell(v, digits):
        return "-" if v is None else f"{v:.{digits}f}"

    def kid(row):
        return "-" if row["kid_x1000"] is None else f"{row['kid_x1000']:.2f} ± {row['kid_x1000_std']:.2f}"

    lines = ["| group | size | reference n | paired n | SSIM ↑ | LPIPS ↓ | FID ↓ | KID x1000 ↓ | unpaired n | FID ↓ | "
             "KID x1000 ↓ |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    small = set()
    for group, by_size in report.items():
        for size, row in by_size.items():
            p, u = row["paired"], row["unpaired"]
            lines.append(f"| {group} | {size} | {cell(row['reference_n'], 0)} | {p['n']} | {cell(p['ssim'], 4)} | "
                         f"{cell(p['lpips'], 4)} | {cell(p['fid'], 2)} | {kid(p)} | {u['n']} | {cell(u['fid'], 2)} | "
                         f"{kid(u)} |")
            small |= {(group, m["kid_subset_size"]) for m in (p, u)
                      if m["kid_subset_size"] is not None and m["kid_subset_size"] < metrics.KID_SUBSET_SIZE}
    conventions = [
        "FID and KID against the reference set: every test person's ground truth in the test shards, each once "
        "(per category for a category's rows), whatever subset was generated; clean-fid's resize and Inception",
        "SSIM: Gaussian window 11, sigma 1.5, the map's border of 5 pixels left out (torchmetrics <= 1.4.1, "
        f"LaDI-VTON, scikit-image); LPIPS v0.1 with {metrics.LPIPS_NETS[lpips_net].title}",
        f"KID: mean ± std over {metrics.KID_SUBSETS} random subsets of at most {metrics.KID_SUBSET_SIZE} images"]
    if small:
        listed = ", ".join(f"{g} ({n})" for g, n in sorted(small))
        conventions.append(f"KID on subsets smaller than {metrics.KID_SUBSET_SIZE} images in {listed}: with so few "
                           "images the draw of subsets moves it by about its ± (compare runs on the same sets only)")
    return "\n".join(lines + [""] + [f"- {line}" for line in conventions + notes])
