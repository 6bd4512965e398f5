#!/usr/bin/env python
from _launch import run

if __name__ == "__main__":
    run("tryon_ds.tools.app")
