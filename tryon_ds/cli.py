"""How every command-line entry point behaves: a user error is one line on stderr and exit status 2, no
traceback; run from a fresh clone without the dependencies installed, it says so in one line."""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import re
import sys

from .errors import UserError

# Import names of the packages setup.cfg installs (checked before anything imports them).
REQUIRED = ("torch", "deepspeed", "webdataset", "braceexpand", "einops", "yaml", "PIL", "numpy", "safetensors",
            "tqdm", "tensorboard", "wandb")
INSTALL = "pip install torch==2.13.0 && pip install -e .   (from the repository root; see README.md)"


def require_dependencies() -> None:
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: {', '.join(missing)} not installed; install tryon-ds first: {INSTALL}", file=sys.stderr)
        sys.exit(2)


def launch_rank() -> int:
    """This process's rank as its launcher states it (0 when started alone), known before any setup."""
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def exit_on_user_error(main):
    """Decorator for command-line entry points: a UserError prints one line and exits 2, no traceback.
    Every rank of a multi-rank launch meets the same error in what comes before distributed set-up (the
    config), so only rank 0 prints it; tryon_ds/training/lifecycle.py handles errors after set-up."""

    @functools.wraps(main)
    def wrapper(*a, **kw):
        try:
            return main(*a, **kw)
        except UserError as err:
            if launch_rank() == 0:
                sys.stderr.write(f"error: {err}\n")  # one write: lines of concurrent processes stay whole
                sys.stderr.flush()
            sys.exit(2)
    return wrapper


def parse_size(text: str) -> tuple[int, int]:
    """An image size on the command line: ``HxW`` in pixels, or one number for a square (``256``)."""
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", text)
    if not m or min(int(g) for g in m.groups() if g) < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIZE or HxW in pixels (8 or more), e.g. 256 or 256x192")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def parse_bytes(text: str) -> int:
    """A size in bytes on the command line: ``500M``, ``1G``, ``4096``."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 500M or 1G")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()])
