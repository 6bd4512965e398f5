"""The field's protocol around the metrics: FID/KID against the reference set (every test person once, per
category), its cache, KID's spread in the JSON and the table, the conventions the table names."""
import json

import numpy as np
import pytest
import torch

from tryon_ds import metrics
from tryon_ds.evaluation import ReferenceSet, markdown, size_name, summarise


def _records(rng, keys, pairs, categories):
    return {k: {"pair": p, "category": c, "sizes": {"8x6": {"fake": rng.normal(size=4), "ssim": 0.5, "psnr": 20.0}
                                                     if p == "paired" else {"fake": rng.normal(size=4)}}}
            for k, p, c in zip(keys, pairs, categories)}


@pytest.fixture
def reference():
    rng = np.random.default_rng(0)
    persons = {f"{i:064x}": (["upper_body", "lower_body"][i % 2], {"8x6": rng.normal(size=4) + 1.0}) for i in range(9)}
    # Two ranks' parts, one person in both (a paired and an unpaired sample of them on different ranks).
    first, second = dict(list(persons.items())[:5]), dict(list(persons.items())[4:])
    return ReferenceSet.merge([second, first], ["8x6"]), persons


def test_fid_and_kid_compare_with_every_test_person_of_the_group_whatever_subset_was_generated(reference):
    ref, persons = reference
    assert len(ref.categories) == 9 and ref.features["8x6"].shape == (9, 4)
    rng = np.random.default_rng(1)
    records = _records(rng, ["a", "b", "c", "d", "e"], ["paired", "paired", "unpaired", "unpaired", "unpaired"],
                       ["upper_body", "lower_body", "upper_body", "lower_body", "upper_body"])
    out = summarise(records, ["8x6"], ref, seed=3)
    for group, n in (("all", 9), ("upper_body", 5), ("lower_body", 4)):
        assert out[group]["8x6"]["reference_n"] == n
    real = torch.from_numpy(np.stack([f["8x6"] for h, (c, f) in sorted(persons.items()) if c == "upper_body"]))
    fake = torch.from_numpy(np.stack([records[k]["sizes"]["8x6"]["fake"] for k in ("c", "e")]))
    row = out["upper_body"]["8x6"]["unpaired"]
    assert row["fid"] == round(metrics.frechet_distance(real, fake), 4)
    kid, spread = metrics.kernel_distance(real, fake, seed=3)
    assert (row["kid_x1000"], row["kid_x1000_std"]) == (round(1000 * kid, 4), round(1000 * spread, 4))
    assert row["kid_subset_size"] == 2 and out["all"]["8x6"]["paired"]["n"] == 2
    # The same measures split another way (another rank order): the same report.
    assert summarise(dict(reversed(list(records.items()))), ["8x6"], ref, seed=3) == out
    table = markdown(out, ["a note"], "squeeze")
    assert "| upper_body | 8x6 | 5 | 1 |" in table and "±" in table
    assert "KID on subsets smaller than 1000 images in all (2), lower_body (1)" not in table  # 1 image: no KID
    assert "all (2)" in table and "upper_body (2)" in table
    assert "LPIPS v0.1 with SqueezeNet" in table and "border of 5 pixels" in table and "- a note" in table
    # Without the Inception, no reference set: FID/KID and reference_n are absent, the rest is there.
    bare = summarise(records, ["8x6"], None)
    assert bare["all"]["8x6"]["reference_n"] is None and bare["all"]["8x6"]["paired"]["ssim"] == 0.5


def test_the_reference_cache_is_keyed_by_the_shards_the_size_and_the_network(reference, tmp_path):
    ref, _ = reference
    shards = tmp_path / "s"
    shards.mkdir()
    (shards / "test-000000.tar").write_bytes(b"x" * 10)
    (shards / "manifest.json").write_text(json.dumps({"shards": {"test": [{"name": "test-000000.tar",
                                                                            "sha256": "aa"}]}}))
    network = tmp_path / "inception.pt"
    network.write_bytes(b"weights")
    urls = [str(shards / "test-000000.tar")]

    def cache_file(size, base):
        return ReferenceSet.cache_paths(tmp_path / "cache", urls, [(16, 12), size], base, network)[size_name(size)]

    cached = cache_file((8, 6), (8, 6))
    assert cached == cache_file((8, 6), (8, 6))
    assert cached != cache_file((16, 12), (8, 6))
    assert cached != cache_file((8, 6), (16, 12))
    (shards / "manifest.json").write_text(json.dumps({"shards": {"test": [{"name": "test-000000.tar", "sha256": "bb"}]}}))
    assert cached != cache_file((8, 6), (8, 6))
    network.write_bytes(b"other weights")
    assert cache_file((8, 6), (8, 6)) != cached
    paths = {"8x6": cached}
    ref.save(paths)
    again = ReferenceSet.load(paths)
    assert again.categories == ref.categories and np.array_equal(again.features["8x6"], ref.features["8x6"])
    paths["8x6"].write_bytes(paths["8x6"].read_bytes()[:100])  # damaged: made again, not trusted
    assert ReferenceSet.load(paths) is None
    assert ReferenceSet.load({"8x6": tmp_path / "nowhere.npz"}) is None
