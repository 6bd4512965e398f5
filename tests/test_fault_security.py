"""Security: no pickle loading, and names from shards or manifests never escape the output folder."""
import dataclasses
import json
import re

import pytest

from conftest import ROOT


def test_shard_keys_and_manifest_names_never_escape_the_output_folder(tmp_path):
    from tryon_ds.errors import UserError
    from tryon_ds.data.shards import FORMAT_VERSION, ShardOptions, write_shards
    from tryon_ds.inference import safe_name
    assert safe_name("../../etc/passwd") == "_.._etc_passwd" and "/" not in safe_name("a/b\\c")
    out = tmp_path / "shards"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"settings": {}, "shards": {"train": [
        {"name": "../../outside.tar", "samples": 1, "bytes": 1, "sha256": "x"}]}}))
    from tryon_ds.data.sources import synthetic_samples
    opts = ShardOptions(image_size=(32, 32), layout="synthetic")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["settings"] = {"format_version": FORMAT_VERSION, **dataclasses.asdict(opts), "image_size": [32, 32]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="is not of the form train-NNNNNN.tar"):
        write_shards(out, synthetic_samples(2, 0, 64), opts, validate=False, log=lambda _: None)


def test_no_pickle_loading_in_the_package():
    sources = "".join(p.read_text() for p in (ROOT / "tryon_ds").rglob("*.py"))
    for unsafe in ("import pickle", "allow_pickle=True", "weights_only=False"):
        assert unsafe not in sources, unsafe
    # torch.load only as the tensors-only unpickler (the metrics' .pth weights)
    calls = re.findall(r"torch\.load\(([^)]*)\)", sources)
    assert calls and all("weights_only=True" in c for c in calls), calls
