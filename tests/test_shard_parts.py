"""make_shards in parts (--part I --parts N, then --merge): the same samples in the same splits as one
process, whatever N; a merge that refuses what does not belong together; a failed part redone alone.
(tests/test_slurm.py runs the parts as a real SLURM job array.)"""
import json
import sys
from pathlib import Path

import pytest
import webdataset as wds

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from releases import write_dresscode  # noqa: E402

from tryon_ds.tools.make_shards import main as make_shards


def keys_by_split(folder: Path) -> dict:
    """Each split's sample keys, read with the stock WebDataset reader from the shards the manifest lists."""
    manifest = json.loads((folder / "manifest.json").read_text())
    out = {}
    for split, shards in manifest["shards"].items():
        urls = [str(folder / e["name"]) for e in shards]
        out[split] = sorted(json.loads(s["json"])["key"] for s in wds.WebDataset(urls, shardshuffle=False,
                                                                               empty_check=False)) if urls else []
    return out


def convert(source, out, *extra):
    make_shards([str(source), "--out", str(out), "--image-size", "64", "--val-fraction", "0.3", "--shard-size", "3",
                 "--skip-bad", *extra])


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    write_dresscode(root / "dc", per_category=4, missing=True)  # pairs lines naming missing files: skipped
    convert(root / "dc", root / "whole")
    return root


def test_parts_merge_to_what_one_process_writes(release, tmp_path):
    whole = json.loads((release / "whole" / "manifest.json").read_text())
    for parts in (2, 3):
        out = tmp_path / f"in{parts}"
        for i in range(parts):
            convert(release / "dc", out, "--part", str(i), "--parts", str(parts))
        make_shards(["--merge", "--out", str(out)])
        merged = json.loads((out / "manifest.json").read_text())
        assert keys_by_split(out) == keys_by_split(release / "whole")
        for field in ("samples", "splits", "keypoints", "skipped", "skipped_reasons"):
            assert merged[field] == whole[field], field
        assert sorted(merged["scan_problems"]) == sorted(whole["scan_problems"])
        assert all(f"-p000{parts - 1}-" in e["name"] or parts == 1 for e in merged["shards"]["train"][-1:])
        assert len(json.loads((out / "skipped.json").read_text())["problems"]) == len(
            json.loads((release / "whole" / "skipped.json").read_text())["problems"])


def test_merge_refuses_parts_that_do_not_belong_together_and_a_failed_part_is_redone_alone(release, tmp_path, capsys):
    out = tmp_path / "out"
    for i in range(3):
        convert(release / "dc", out, "--part", str(i), "--parts", str(3))

    def refused(*argv, match):
        with pytest.raises(SystemExit) as exit_:
            make_shards(list(argv))
        assert exit_.value.code == 2
        assert match in capsys.readouterr().err

    # A part lost, then re-run alone: the other parts' shards are left as they are.
    others = {p: p.stat().st_mtime_ns for p in out.glob("*-p000[02]-*.tar")}
    lost = sorted(out.glob("train-p0001-*.tar"))
    assert lost
    lost[-1].unlink()
    (out / "manifest.part-0001.json").rename(tmp_path / "part1.json")
    refused("--merge", "--out", str(out), match="of 3 parts, missing: 1 (re-run those")
    (tmp_path / "part1.json").rename(out / "manifest.part-0001.json")
    convert(release / "dc", out, "--part", "1", "--parts", "3")
    assert lost[-1].is_file() and {p: p.stat().st_mtime_ns for p in others} == others
    make_shards(["--merge", "--out", str(out)])
    assert keys_by_split(out) == keys_by_split(release / "whole")

    refused(str(release / "dc"), "--out", str(out), "--image-size", "64", "--val-fraction", "0.3", "--shard-size",
            "3", "--skip-bad", "--part", "1", "--parts", "4", match="belongs to part 1 of 3, not 1 of 4")
    other = tmp_path / "other"  # a part made at another image size, in the same folder
    for i, size in ((0, "64"), (1, "32")):
        make_shards([str(release / "dc"), "--out", str(other), "--image-size", size, "--val-fraction", "0.3",
                     "--skip-bad", "--part", str(i), "--parts", "2"])
    refused("--merge", "--out", str(other), match="manifest.part-0001.json was made with other settings than "
                                                   "manifest.part-0000.json (image_size: [32, 32] vs [64, 64])")
    refused("--merge", "--out", str(tmp_path / "nothing"), match="holds no part manifests")
    refused(str(release / "dc"), "--out", str(out), "--part", "3", "--parts", "3", match="expected 0 <= part < parts")
