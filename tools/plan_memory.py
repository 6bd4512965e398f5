#!/usr/bin/env python
"""The memory plan alone: tools/plan.py --memory-only, under the tool's name before it planned time too."""
from _launch import run

if __name__ == "__main__":
    import sys

    sys.argv.insert(1, "--memory-only")
    run("tryon_ds.tools.plan")
