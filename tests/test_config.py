import json

import pytest

from tryon_ds.config import build_config, read_config_file
from tryon_ds.errors import ConfigError
from conftest import ROOT, run_tool


def test_seed_config_json_loads_with_its_exact_keys():
    data = read_config_file(ROOT / "configs" / "config.json")
    cfg = build_config(data)
    assert cfg.base_image_size == (128, 128) and cfg.sr_image_size == (256, 256)
    assert cfg.timesteps == (1000, 1000) and cfg.learning_rate == 1e-4 and cfg.mixed_precision is True
    assert cfg.unet1.preset == "base" and cfg.unet2.preset == "sr"


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
    assert cfg.unet1.preset == "tiny" and cfg.unet1.dim == 48 and cfg.learning_rate == 2e-4
    assert cfg.base_image_size == (32, 32)


@pytest.mark.parametrize("data, message", [
    ({"learning_rat": 1e-4}, "unknown config key 'learning_rat'"),
    ({"learning_rat": 1e-4}, "did you mean 'learning_rate'"),
    ({"unet1": {"preset": "tiny", "dimm": 3}}, "did you mean 'unet1.dim'"),
    ({"batch_size": "eight"}, "config key 'batch_size': got 'eight' (str), expected an integer"),
    ({"batch_size": 0}, "config key 'batch_size': got 0, expected a value >= 1"),
    ({"use_ema": "yes"}, "config key 'use_ema'"),
    ({"train_unet_number": 3}, "expected one of 1, 2"),
    ({"base_image_size": [128]}, "expected a list of 2 integers"),
    ({"unet1": {"preset": "huge"}}, "config key 'unet1.preset': got 'huge'"),
    ({"diffusion": {"schedule": "sigmoid"}}, "config key 'diffusion.schedule'"),
    ({"base_image_size": [30, 30], "unet1": {"preset": "tiny"}}, "not divisible by 4"),
    ({"unet1": {"preset": "tiny", "num_res_blocks": [1, 1]}}, "'unet1.num_res_blocks': has 2 entries"),
])
def test_bad_config_names_key_value_and_expectation(data, message):
    with pytest.raises(ConfigError) as err:
        build_config(data)
    assert message in str(err.value)


def test_cli_overrides_and_user_errors_exit_2_without_traceback(tmp_path):
    ok = run_tool(["tools/model_info.py", "--config", "configs/tiny.yaml", "--set", "unet1.dim=64"])
    assert ok.returncode == 0, ok.stderr
    assert "preset 'tiny'" in ok.stdout
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
