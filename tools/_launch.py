"""Shared by the scripts in this folder: run a tool of the package from a fresh clone, before (or without)
`pip install -e .`, the way `python tryon_ds/train.py` runs."""
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tryon_ds.cli import require_dependencies  # noqa: E402


def run(module: str) -> None:
    require_dependencies()
    importlib.import_module(module).main()
    # Done and written: the exit skips the interpreter's teardown of torch's modules (a second and more).
    from tryon_ds.compat import exit_without_teardown
    exit_without_teardown(0)
