"""A real browser for the tests and benchmarks of the web page (tools/app.py): Debian's Chromium driven by
Playwright, nothing downloaded at run time.

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


@contextlib.contextmanager
def page_server(bundle, shards: str, env: dict | None = None, *extra: str, timeout_s: float = 120):
    """tools/app.py serving ``bundle`` (held-out samples from ``shards``) on a free port of the loopback, as a
    user starts it; yields (its URL, its process). Its output is the process's stdout (stderr joined)."""
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from tryon_ds.training.distributed import free_port

    root = Path(__file__).resolve().parents[2]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "tools/app.py", "--checkpoint", str(bundle), "--shards", shards,
                             "--port", str(port), *extra], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # whatever proxy the caller set
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tools/app.py ended with {proc.returncode}: {proc.stdout.read()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tools/app.py did not answer within {timeout_s:.0f} s")
            try:
                if direct.open(url, timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def pick_sample(page, index: int = 0) -> None:
    """Choose the ``index``-th held-out sample in the page's dropdown and wait for its pictures."""
    page.click("#sample input")
    page.get_by_role("option").nth(index).click()
    for view in ("#person-view", "#ca-view", "#garment-view"):
        page.wait_for_selector(f"{view} img")


def wait_for_message(page, text: str, timeout_s: float = 120) -> str:
    """The page's message once it holds ``text``."""
    page.wait_for_function(f"document.querySelector('#message').innerText.includes({text!r})",
                           timeout=timeout_s * 1000)
    return page.inner_text("#message")
