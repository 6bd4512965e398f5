import json

import pytest
from hypothesis import given, strategies as st

from tryon_ds.config import deep_merge, parse_override, build_config, read_config_file
from tryon_ds.errors import ConfigError
from conftest import ROOT, run_tool


def test_seed_config_json_loads_with_its_exact_keys():
    data = read_config_file(ROOT / "configs" / "config.json")
    cfg = build_config(data)
    # The guide's keys land on the list: two UNets, 128 then 256 px, 1000 timesteps each.
    assert [(u.preset, u.image_size, u.timesteps, u.sample_steps) for u in cfg.unets] == [
        ("base", (128, 128), 1000, 256), ("sr", (256, 256), 1000, 128)]
    assert cfg.learning_rate == 1e-4 and cfg.mixed_precision is True


def test_seed_guide_keys_are_all_accepted():
    keys = ["data_dir", "output_dir", "checkpoint_dir", "log_dir", "base_image_size", "sr_image_size", "timesteps",
            "channels", "batch_size", "learning_rate", "num_epochs", "gradient_accumulation_steps", "max_grad_norm",
            "warmup_steps", "cosine_decay_max_steps", "validation_freq", "checkpoint_freq", "log_freq",
            "sample_freq", "train_unet_number", "use_ema", "mixed_precision"]
    data = read_config_file(ROOT / "configs" / "config.json")
    assert sorted(data) == sorted(keys)


def test_yaml_preset_with_overrides_and_extends(tmp_path):
    (tmp_path / "child.yaml").write_text(f"extends: {ROOT / 'configs' / 'tiny.yaml'}\nunet1: {{dim: 48}}\n"
                                         "learning_rate: 2e-4\n")
    cfg = build_config(read_config_file(tmp_path / "child.yaml"))
    assert cfg.unet(1).preset == "tiny" and cfg.unet(1).dim == 48 and cfg.learning_rate == 2e-4
    assert cfg.image_size(1) == (32, 32) and len(cfg.unets) == 3


@pytest.mark.parametrize("data, message", [
    ({"learning_rat": 1e-4}, "unknown config key 'learning_rat'"),
    ({"learning_rat": 1e-4}, "did you mean 'learning_rate'"),
    ({"unet1": {"preset": "tiny", "dimm": 3}}, "did you mean 'unet1.dim'"),
    ({"batch_size": "eight"}, "config key 'batch_size': got 'eight' (str), expected an integer"),
    ({"batch_size": 0}, "config key 'batch_size': got 0, expected a value >= 1"),
    ({"use_ema": "yes"}, "config key 'use_ema'"),
    ({"train_unet_number": 3}, "config key 'train_unet_number': got 3, but the config defines no 'unet3' section"),
    ({"train_unet_number": 0}, "config key 'train_unet_number': got 0, expected a value >= 1"),
    ({"unet3": {"preset": "tiny-sr3", "image_size": [1024, 1024]}, "timesteps": [1000, 1000]},
     "config key 'timesteps': got [1000, 1000], "
                                                                       "expected one entry per UNet of the cascade (3"),
    ({"unet3": {"preset": "sr1024"}, "timesteps": [1000] * 3, "diffusion": {"sample_steps": [1, 1, 1]}},
     "config key 'unet3.image_size': UNet 3 needs its [H, W] output size"),
    ({"unet3": {"preset": "sr1024", "image_size": [1024, 768], "crop_size": [256, 200]}, "timesteps": [1000] * 3,
      "diffusion": {"sample_steps": [1, 1, 1]}}, "config key 'unet3.crop_size': [256, 200] must be divisible by 16"),
    ({"unet3": {"preset": "sr1024", "image_size": [1024, 768]}, "timesteps": [1000] * 3,
      "diffusion": {"sample_steps": [1, 1, 1]}}, "config key 'unet3.image_size': [1024, 768] must be a multiple of "
                                                 "'sr_image_size' [256, 256] with the same aspect ratio"),
    ({"unet1": {"preset": "tiny-sr3"}}, "config key 'unet1.preset': 'tiny-sr3' is conditioned on a low-resolution "
                                        "image alone"),
    ({"unet2": {"preset": "sr", "image_size": [256, 256]}}, "config key 'unet2.image_size': UNet 2 takes its size "
                                                            "from 'sr_image_size'"),
    ({"unet2": {"preset": "sr", "crop_size": [64, 64]}}, "unknown config key 'unet2.crop_size'"),
    ({"base_image_size": [128]}, "expected a list of 2 integers"),
    ({"unet1": {"preset": "huge"}}, "config key 'unet1.preset': got 'huge'"),
    ({"diffusion": {"schedule": "sigmoid"}}, "config key 'diffusion.schedule'"),
    ({"base_image_size": [30, 30], "unet1": {"preset": "tiny"}}, "not divisible by 4"),
    ({"base_image_size": [36, 36], "unet1": {"preset": "tiny", "attn_patch": 4}},
     "config key 'base_image_size': [36, 36] is not divisible by 8, which the 3 levels of 'unet1' and its 4x4 "
     "patches ('unet1.attn_patch') at level 1 need"),
    ({"unet1": {"preset": "tiny", "attn_patch": 0}}, "config key 'unet1.attn_patch': got 0, expected a value >= 1"),
    ({"unet1": {"preset": "tiny", "num_res_blocks": [1, 1]}}, "'unet1.num_res_blocks': has 2 entries"),
])
def test_bad_config_names_key_value_and_expectation(data, message):
    with pytest.raises(ConfigError) as err:
        build_config(data)
    assert message in str(err.value)


def test_the_whole_cascade_configs_add_unet3_and_keep_the_guides_two_unets():
    """configs/cascade1024.yaml adds the paper's third UNet to the guide's config.json, which stays two UNets;
    the portrait one runs 128x96 -> 256x192 -> 1024x768. Sizes are [H, W] throughout."""
    two = build_config(read_config_file(ROOT / "configs" / "config.json"))
    assert two.unet_numbers == [1, 2]
    with pytest.raises(ConfigError, match="UNet 3 is not defined: the cascade has 2 UNet"):
        two.unet(3)
    cfg = build_config(read_config_file(ROOT / "configs" / "cascade1024.yaml"))
    assert cfg.unet_numbers == [1, 2, 3] and type(cfg.unet(3)).__name__ == "EfficientUNetConfig"
    assert [cfg.image_size(n) for n in cfg.unet_numbers] == [(128, 128), (256, 256), (1024, 1024)]
    assert cfg.crop_size(3) == (256, 256) and cfg.crop_size(2) is None
    assert cfg.unet(3).num_res_blocks == (2, 4, 8, 8) and cfg.unet(3).dim_mults == (1, 2, 4, 8)
    portrait = build_config(read_config_file(ROOT / "configs" / "cascade1024x768.yaml"))
    assert [portrait.image_size(n) for n in portrait.unet_numbers] == [(128, 96), (256, 192), (1024, 768)]
    # The bundle round trip: a config's dict builds the same config, UNet 3's architecture included.
    assert build_config(cfg.to_dict()) == cfg


def test_cli_overrides_and_user_errors_exit_2_without_traceback(tmp_path):
    ok = run_tool(["tools/model_info.py", "--config", "configs/tiny.yaml", "--set", "unet1.dim=64"])
    assert ok.returncode == 0, ok.stderr
    assert "preset 'tiny'" in ok.stdout
    ok = run_tool(["tools/model_info.py", "--preset", "sr1024"])
    assert ok.returncode == 0 and "preset 'sr1024', unet3 (Efficient-UNet, super-resolution): 619,181,652" in ok.stdout
    # overrides go over a named preset (the tiny preset's 1,885,187 parameters with 2x2-patch attention)
    ok = run_tool(["tools/model_info.py", "--preset", "tiny", "--set", "unets.0.attn_patch=2"])
    assert ok.returncode == 0 and "preset 'tiny', unet1 (Parallel-UNet, base): 2,109,827" in ok.stdout, ok.stderr
    for args, expected in [
        (["--config", "configs/config.json", "--learning_rate", "-1"], "config key 'learning_rate': got -1.0"),
        (["--config", "configs/config.json", "--train_unet", "3"], "config key 'train_unet_number'"),
        (["--set", "unet1.dimm=3"], "did you mean 'unet1.dim'"),
        (["--set", "nonsense"], "expected KEY=VALUE"),
        (["--config", str(tmp_path / "missing.json")], "missing.json' does not exist"),
    ]:
        result = run_tool(["tools/model_info.py", *args])
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_malformed_json_names_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"batch_size": 4})[:-1])
    with pytest.raises(ConfigError, match="config.json' is not valid json"):
        read_config_file(bad)


def test_tools_from_a_fresh_clone_without_dependencies_say_what_to_install(tmp_path):
    """Before `pip install -e .` the tools find the package by themselves; without the dependencies (a bare
    virtual environment) they say so in one line and exit 2, no traceback."""
    import subprocess
    import sys
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    bare = str(tmp_path / "bare" / "bin" / "python")
    for tool in (["tools/model_info.py", "--preset", "tiny"], ["tools/make_shards.py", "--help"],
                 ["tryon_ds/train.py", "--config", "configs/tiny.yaml"]):
        r = subprocess.run([bare, *tool], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (tool, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "not installed; install tryon-ds first: pip install torch==2.13.0" in lines[0]


def test_the_cascade_as_a_list_and_the_older_keys_give_the_same_config():
    """One entry per UNet; the older sections, the guide's size keys and the per-UNet lists map onto it, once,
    at load; overrides reach an entry by either name; errors name the key the file or command line used."""
    older = build_config({"base_image_size": [32, 32], "sr_image_size": [64, 64], "timesteps": [1000, 500],
                          "unet1": {"preset": "tiny"}, "unet2": {"preset": "tiny-sr", "dim": 16},
                          "diffusion": {"sample_steps": [8, 4], "cond_noise": {"train_max": 0.2, "garment": 0.1,
                                                                                "lowres": 0.3}}})
    listed = build_config({"unets": [
        {"preset": "tiny", "image_size": [32, 32], "sample_steps": 8, "cond_noise": {"garment": 0.1}},
        {"preset": "tiny-sr", "dim": 16, "image_size": [64, 64], "timesteps": 500, "sample_steps": 4,
         "cond_noise": {"garment": 0.1, "lowres": 0.3}}], "diffusion": {"cond_noise": {"train_max": 0.2}}})
    assert older == listed and build_config(listed.to_dict()) == listed
    assert "aliases" not in older.to_dict() and not hasattr(older, "aliases")  # the names stay with the load
    tiny = read_config_file(ROOT / "configs" / "tiny.yaml")
    by_index = build_config(deep_merge(tiny, parse_override("unets.1.dim=48")))
    by_section = build_config(deep_merge(tiny, parse_override("unet2.dim=48")))
    assert by_index == by_section and by_index.unet(2).dim == 48 and by_index.unet(2).preset == "tiny-sr"
    for override, message in [("unets.1.dimm=3", "did you mean 'unets.1.dim'"),
                              ("unet2.dimm=3", "did you mean 'unet2.dim'"),
                              ("unets.1.groups=7", "config key 'unets.1.groups': 7 does not divide"),
                              ("unets.2.cond_noise={ca: 0.5}", "config key 'unets.2.cond_noise.ca': this UNet "
                                                               "noise-augments lowres"),
                              ("unets.4={preset: tiny}", "config key 'unets.4': the list has 3 entries"),
                              ("diffusion.sample_steps=[1, 2]", "config key 'diffusion.sample_steps': got [1, 2], "
                                                                "expected one entry per UNet of the cascade (3")]:
        with pytest.raises(ConfigError) as err:
            build_config(deep_merge(tiny, parse_override(override)))
        assert message in str(err.value), (override, str(err.value))


def test_a_config_written_by_the_previous_release_loads():
    """trainer_state.json and bundles of the release before the list hold the config in the older keys."""
    previous = json.loads((ROOT / "tests" / "data" / "previous_release" / "config.json").read_text())
    cfg = build_config(previous)
    assert [(u.preset, u.image_size, u.sample_steps) for u in cfg.unets] == [
        ("tiny", (32, 32), 10), ("tiny-sr", (64, 64), 10), ("tiny-sr3", (128, 128), 10)]
    # Its one set of sampling levels lands on each UNet that takes the input.
    assert [u.cond_noise for u in cfg.unets] == [{"ca": 0.0, "garment": 0.0}, {"ca": 0.0, "garment": 0.0, "lowres": 0.0},
                                                 {"lowres": 0.0}]
    assert cfg.diffusion.cond_noise.train_max == 0.1


@given(st.integers(8, 4096), st.integers(8, 4096))
def test_one_size_grammar_on_every_command_line(h, w):
    """--image-size, --eval-size and the benchmarks' sizes read alike: HxW, or one number for a square."""
    import argparse
    from tryon_ds.cli import parse_size
    assert parse_size(f"{h}x{w}") == (h, w) and parse_size(str(h)) == (h, h)
    for bad in (f"{h}x", f"x{w}", f"{h}*{w}", f"{h}x{w}x3", "7x64", "64x7", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="expected SIZE or HxW"):
            parse_size(bad)
