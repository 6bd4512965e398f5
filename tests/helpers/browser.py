"""A real browser for tests: Debian's Chromium driven by Playwright, nothing downloaded at run time.

``chromium()`` installs Debian's ``chromium`` package when it is missing (apt-get, as root, as
tests/helpers/slurm_cluster.py installs SLURM) and launches it headless through Playwright pointed at
/usr/bin/chromium (no ``playwright install``), with Chromium's own background traffic (updates, sync,
Google's hosts) off: this machine's network is closed and the page must not need it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

BINARY = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-domain-reliability", "--no-pings"]


class BrowserUnavailable(RuntimeError):
    pass


def install() -> None:
    if os.path.exists(BINARY):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BrowserUnavailable("Chromium is not installed and cannot be (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise BrowserUnavailable(f"{' '.join(cmd)} failed: {r.stderr[-500:]}")


@contextlib.contextmanager
def chromium():
    """A headless Playwright Browser on Debian's Chromium (Playwright gives it a fresh profile)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        raise BrowserUnavailable(f"playwright is not installed ({err}): pip install -e '.[dev]'") from None
    install()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BINARY, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()
