"""What the web page (tools/app.py) adds to a try-on: the same held-out sample sampled by the pipeline in this
process (TryOnPipeline.generate, as tools/infer.py runs it) and through the page in Debian's Chromium, from
the click to the result on the page; the page's own seconds per UNet beside them.

    python tools/bench/app.py --checkpoint runs/demo/bundle --shards 'runs/demo/shards/val-*.tar' --runs 5
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # a script run from a fresh clone: the repository's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import re
import statistics
import time

import torch

from tools.bench.browser import chromium, page_server, pick_sample, wait_for_message
from tryon_ds.inference import TryOnPipeline
from tryon_ds.tools.app import Playground


def direct(args) -> float:
    """Median seconds of the cascade on the first held-out sample, in this process."""
    play = Playground(TryOnPipeline.from_pretrained(args.checkpoint), args.shards, 1)
    key = next(iter(play.samples))
    job = play.from_sample(key)
    times = []
    for _ in range(args.runs + 1):
        start = time.perf_counter()
        play.pipe.generate(job.conds, keys=[key], seed=len(times))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first pays for one-off allocations, as on the page's first run


def through_the_page(args) -> tuple[float, float, list[float]]:
    """Median seconds from the click to the result's file on the page (after the last UNet's picture), the
    page's own total, and its seconds per UNet (each median over the runs after the first)."""
    clicks, totals, per_unet = [], [], []
    with page_server(args.checkpoint, args.shards, None, "--max-samples", "1") as (url, _), chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(url)
        page.wait_for_selector("#run")
        pick_sample(page, 0)
        for run in range(args.runs + 1):
            page.fill("#seed input", str(run))  # each run's result is named by its seed: the end is unambiguous
            start = time.perf_counter()
            page.click("#run")
            page.wait_for_function(f"/_seed{run}\\b/.test(document.querySelector('#result').innerText)",
                                   timeout=args.timeout * 1000)
            clicks.append(time.perf_counter() - start)
            totals.append(float(re.search(r"Done in ([0-9.]+) s", wait_for_message(page, "Done in")).group(1)))
            per_unet.append([float(t.split()[0]) for t in page.locator("#progress .seconds").all_inner_texts()])
    median = statistics.median
    return (median(clicks[1:]), median(totals[1:]),
            [median(r[i] for r in per_unet[1:]) for i in range(len(per_unet[0]))])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--timeout", type=float, default=600, help="seconds a run on the page may take")
    args = p.parse_args()
    here = direct(args)
    click, total, per_unet = through_the_page(args)
    print(f"{args.checkpoint}: one held-out sample, the bundle's sampler, steps and guidance; median of {args.runs} "
          f"runs after a first; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  in this process (TryOnPipeline.generate): {here:.2f} s")
    print(f"  the page's own count: {total:.2f} s ({' + '.join(f'{s:.2f}' for s in per_unet)} per UNet)")
    print(f"  click to the last picture, in Chromium: {click:.2f} s = {click / here:.2f}x the pipeline alone "
          f"(+{click - here:.2f} s)")


if __name__ == "__main__":
    main()
