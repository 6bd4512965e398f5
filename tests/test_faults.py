"""Faults: nothing lost, nothing silently wrong. Real processes, real files, real DeepSpeed engines on CPU."""
import dataclasses
import io
import json
import re
import signal
import subprocess
import tarfile
import time
import typing

import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import ROOT, command, run_tool
from tryon_ds.config import Config, ConfigError, build_config, read_config_file


def _completed(run_dir, stage=1):
    return sorted(p.name for p in (run_dir / "ckpt" / f"unet{stage}").glob("step*") if (p / "COMPLETE").is_file())


# --------------------------------------------------------------------------- numerical faults
def test_non_finite_steps_never_reach_weights_or_ema_and_stop_the_run(shards, tmp_path):
    """An absurd learning rate without clipping makes the loss overflow; those steps are discarded, and after
    max_bad_steps in a row the run saves the last good state and stops with a message saying so."""
    r = subprocess.run(command(tmp_path, shards, ranks=1, steps=60, extra=[
        "--set", "learning_rate=1e30", "--set", "max_grad_norm=0", "--set", "warmup_steps=0", "--set", "max_bad_steps=3"]),
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "3 steps in a row had a non-finite loss or gradients" in r.stderr and "Traceback" not in r.stderr
    assert "weights and EMA unchanged" in r.stdout
    saved = _completed(tmp_path)
    assert saved
    ckpt = tmp_path / "ckpt" / "unet1" / saved[-1]
    ema = load_file(str(ckpt / "ema.safetensors"))
    assert all(torch.isfinite(v).all() for v in ema.values())
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    assert all(torch.isfinite(v).all() for v in weights.values())


# --------------------------------------------------------------------------- disk faults
def test_unwritable_output_folder_is_an_error_at_start(shards, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = subprocess.run(command(tmp_path, shards, ranks=1, steps=2, extra=["--set", f"output_dir={blocker}/out"]),
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"config key 'output_dir': cannot write to {blocker}/out" in r.stderr


def test_failed_checkpoint_write_keeps_the_previous_checkpoints(shards, tmp_path):
    root = tmp_path / "ckpt" / "unet1"
    root.mkdir(parents=True)
    (root / "step00000010").write_text("a file where the step-10 checkpoint folder must go")
    r = subprocess.run(command(tmp_path, shards, ranks=1, steps=10, extra=["--set", "checkpoint_freq=5"]),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "could not write the step-10 checkpoint" in r.stderr and "earlier checkpoints are intact: step00000005" \
        in r.stderr
    assert _completed(tmp_path) == ["step00000005"]
    assert (root / "step00000005" / "ema.safetensors").is_file()


# --------------------------------------------------------------------------- rank faults
@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_dead_or_hung_rank_ends_the_job_non_zero(shards, tmp_path, fault):
    proc = subprocess.Popen(command(tmp_path, shards, steps=10_000, extra=["--set", "dist_timeout_s=20"]), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "out" / "metrics_unet1.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "train.py" in " ".join(p.cmdline()) and "deepspeed.launcher" not in " ".join(p.cmdline())]
    victim = next(p for p in ranks if "--local_rank=1" in " ".join(p.cmdline()))
    victim.send_signal(signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
    start = time.time()
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if fault == "hangs" and victim.is_running():
            victim.send_signal(signal.SIGKILL)
    assert proc.returncode != 0
    assert time.time() - start < 90
    if fault == "hangs":
        assert "rank 0: no training progress for" in out and "another rank died or hangs" in out, out[-2000:]
    else:
        # the launcher names the failed process by its command line, which carries the rank
        assert re.search(r"local_rank=1\S*.* exits with return code = -9", out), out[-2000:]


# --------------------------------------------------------------------------- data faults
def test_run_log_counts_skipped_samples_by_reason(shards, tmp_path):
    good = sorted(shards.glob("train-*.tar"))[0]
    with tarfile.open(good) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad_key = members[0][0].split(".")[0]
    with tarfile.open(tmp_path / "corrupt.tar", "w") as tar:
        for name, data in members:
            if name == f"{bad_key}.person_pose.npy":
                buf = io.BytesIO()
                __import__("numpy").save(buf, __import__("numpy").zeros((5, 3), "float32"))
                data = buf.getvalue()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "empty.tar").write_bytes(b"")
    r = subprocess.run(command(tmp_path, shards, ranks=1, steps=6, extra=[
        "--set", f"data.train_shards=[{tmp_path / 'corrupt.tar'}, {tmp_path / 'empty.tar'}]",
        "--set", "data.shuffle_buffer=5"]), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sample(s) skipped" in r.stdout and "person_pose.npy of shape (5, 3), expected (18, 3)" in r.stdout
    assert "unreadable shard" in r.stdout and "empty.tar" in r.stdout


# --------------------------------------------------------------------------- config faults
def _leaf_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        elif f.name != "preset":
            yield f"{prefix}{f.name}", hints[f.name], f.metadata


KEYS = list(_leaf_keys(Config))
CHOICES = ("no", "fp16", "bf16", "cosine", "linear", "eps", "v", "ddpm", "ddim", "sdpa", "xformers", "math", "online",
           "offline", "disabled")


def _merge(a, b):
    from tryon_ds.config import deep_merge
    return deep_merge(a, b)


def _nested(key, value):
    out = node = {}
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {"preset": "tiny"} if part.startswith("unet") else {})
    node[parts[-1]] = value
    return out


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _wrong_values(tp):
    """Values of a type the key does not take: a string is right for a path key, a list of strings for a
    shard list, a numeric string for a float key (YAML reads 1e-4 as one)."""
    dicts = st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2)
    if tp is str:
        return st.one_of(dicts, st.lists(st.integers(), min_size=1, max_size=3), st.booleans())
    if "list[str]" in str(tp):
        return st.one_of(dicts, st.integers(), st.lists(st.integers(), min_size=1, max_size=2))
    text = st.text(max_size=6).filter(lambda t: t not in CHOICES and not _is_number(t))
    return st.one_of(text, dicts, st.lists(st.text(max_size=3), min_size=3, max_size=4), st.just("nan"),
                     st.just(float("inf")))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_wrong_types_name_the_key(data):
    key, tp, _ = data.draw(st.sampled_from(KEYS))
    value = data.draw(_wrong_values(tp))
    base = read_config_file(ROOT / "configs" / "tiny.yaml")
    with pytest.raises(ConfigError) as err:
        build_config(_merge(base, _nested(key, value)))
    assert f"'{key}'" in str(err.value), (key, value, str(err.value))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([k for k in KEYS if k[2].get("ge") is not None or k[2].get("gt") is not None
                        or k[2].get("le") is not None]), st.integers(min_value=1, max_value=10**9))
def test_fuzzed_out_of_range_values_name_the_key(key_info, magnitude):
    key, tp, meta = key_info
    low = meta.get("ge") if meta.get("ge") is not None else meta.get("gt")
    value = (low - magnitude) if low is not None else (meta["le"] + magnitude)
    if "tuple" in str(tp) or "list" in str(tp):
        return
    if tp is float or "float" in str(tp):
        value = float(value)
    base = read_config_file(ROOT / "configs" / "tiny.yaml")
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        build_config(_merge(base, _nested(key, value)))


def test_every_config_fault_exits_2_without_traceback(tmp_path):
    for args in (["--set", "data.num_workers=-1"], ["--set", "logging.wandb=sometimes"],
                 ["--set", "diffusion.guidance=[1]"], ["--set", "unet2.attn_levels=[true]"]):
        r = run_tool(["tryon_ds/train.py", "--config", "configs/tiny.yaml", *args], timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "config key" in r.stderr, (args, r.stderr)


# --------------------------------------------------------------------------- security
def test_shard_keys_and_manifest_names_never_escape_the_output_folder(tmp_path):
    from tryon_ds.config import UserError
    from tryon_ds.data.shards import ShardOptions, write_shards
    from tryon_ds.tools.infer import safe_name
    assert safe_name("../../etc/passwd") == "_.._etc_passwd" and "/" not in safe_name("a/b\\c")
    out = tmp_path / "shards"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"settings": {}, "shards": {"train": [
        {"name": "../../outside.tar", "samples": 1, "bytes": 1, "sha256": "x"}]}}))
    from tryon_ds.data.sources import synthetic_samples
    opts = ShardOptions(image_size=(32, 32), layout="synthetic")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["settings"] = {"format_version": 1, **dataclasses.asdict(opts), "image_size": [32, 32]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="is not of the form train-NNNNNN.tar"):
        write_shards(out, synthetic_samples(2, 0, 64), opts, validate=False, log=lambda _: None)


def test_no_pickle_loading_in_the_package():
    sources = "".join(p.read_text() for p in (ROOT / "tryon_ds").rglob("*.py"))
    for unsafe in ("torch.load(", "import pickle", "allow_pickle=True", "weights_only=False"):
        assert unsafe not in sources, unsafe
