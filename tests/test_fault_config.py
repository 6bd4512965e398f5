"""Config faults, fuzzed over every key: wrong types and out-of-range values are refused naming the key; the
command line exits 2 without a traceback."""
import dataclasses
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, run_tool
from tryon_ds.config import Config, build_config, deep_merge, read_config_file
from tryon_ds.errors import ConfigError


def _leaf_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        if f.name == "unets":  # each entry's class is its preset's (configs/tiny.yaml's)
            for i, unet in enumerate(TINY.unets):
                yield from _leaf_keys(type(unet), f"{prefix}unets.{i}.")
        elif dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        elif f.name != "preset":
            yield f"{prefix}{f.name}", hints[f.name], f.metadata


TINY = build_config(read_config_file(ROOT / "configs" / "tiny.yaml"))
KEYS = list(_leaf_keys(Config))
CHOICES = ("no", "fp16", "bf16", "cosine", "linear", "eps", "v", "ddpm", "ddim", "sdpa", "xformers", "math", "online",
           "offline", "disabled")


def _nested(key, value):
    """``a.b.c`` = value as an override: list entries by index, as ``--set unets.1.dim=64`` gives them."""
    out = node = {}
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
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
    if "dict" in str(tp):  # a mapping of names to levels
        return st.one_of(st.integers(), st.lists(st.integers(), min_size=1, max_size=2), st.text(max_size=3),
                         st.dictionaries(st.text(max_size=3), st.text(max_size=3), min_size=1, max_size=2))
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
        build_config(deep_merge(base, _nested(key, value)))
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
        build_config(deep_merge(base, _nested(key, value)))


def test_every_config_fault_exits_2_without_traceback(tmp_path):
    for args in (["--set", "data.num_workers=-1"], ["--set", "logging.wandb=sometimes"],
                 ["--set", "diffusion.guidance=[1]"], ["--set", "unet2.attn_levels=[true]"]):
        r = run_tool(["tryon_ds/train.py", "--config", "configs/tiny.yaml", *args], timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "config key" in r.stderr, (args, r.stderr)
    # The guide's two-UNet config has no UNet 3 to train: the error names the missing section.
    r = run_tool(["tryon_ds/train.py", "--config", "configs/config.json", "--train_unet", "3"], timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "config key 'train_unet_number': got 3, but the config defines no 'unet3' section" in r.stderr
