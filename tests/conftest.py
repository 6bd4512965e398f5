import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def tiny_config():
    from tryon_ds.config import build_config, read_config_file
    return build_config(read_config_file(ROOT / "configs" / "tiny.yaml"))


def run_tool(args, **kw):
    """Run a tool from tools/ as a user would: a fresh Python process in the repository root."""
    import subprocess
    return subprocess.run([sys.executable, *args], cwd=kw.pop("cwd", ROOT), capture_output=True, text=True, **kw)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
