"""A web page to try a trained cascade (gradio: `pip install -e ".[app]"`):

    python tools/app.py --checkpoint bundle/ --shards 'shards/test-*.tar' [--port 7860]

then open http://127.0.0.1:7860 (from your own machine when it runs on a cluster node: an SSH tunnel,
docs/inference-and-evaluation.md). Pick a held-out sample of the shards, or upload a clothing-agnostic image,
a garment image and the poses (.npy, OpenPose or DressCode JSON, as tools/infer.py takes them; a flat garment
needs no pose); choose the sampler, the steps of each UNet, the guidance and the seed; each UNet's picture
appears as it finishes, with its progress and seconds, and the result downloads as PNG.

The bundle is loaded once. Runs queue and one cascade runs at a time; a second click during a run starts
nothing. Nothing reaches the network: gradio's analytics and version check are off, and the page is served
on this machine alone, without a share link unless --share asks for one (it downloads gradio's tunnel).
"""
from __future__ import annotations

import argparse
import importlib
import os
import queue
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import atomic
from ..batch import CA, GARMENT, GARMENT_POSE, PERSON, PERSON_POSE
from ..cli import exit_on_user_error
from ..data.keypoints import draw_pose
from ..data.preprocess import picture
from ..diffusion import SAMPLERS
from ..errors import UserError
from ..inference import TryOnPipeline, safe_name

EXTRA = 'pip install -e ".[app]"'
# A 32 px picture fills its box as a 1024 px one does, its pixels left sharp.
CSS = """
.picture img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
.unet-progress td { padding: 2px 10px; }
"""


@dataclass
class Job:
    """One try-on to run: each UNet's prepared conditioning, the output box holding the ca image, the sample
    key that seeds its noise (None for an upload: the seed alone), what the page says about the inputs."""
    conds: dict[int, dict]
    box: tuple[int, int, int, int]
    key: str | None
    notes: list[str] = field(default_factory=list)


class Playground:
    """What the page does, without the page: the bundle and the held-out samples loaded once, inputs read and
    checked into a Job (a UserError says what is wrong), and a job run one cascade at a time."""

    def __init__(self, pipe: TryOnPipeline, shards: str | None = None, max_samples: int = 24):
        self.pipe = pipe
        self.samples: dict[str, dict[int, dict]] = {}
        if shards:
            for conds in pipe.shard_batches(shards, 1, limit=max_samples):
                self.samples[conds[pipe.last]["key"][0]] = conds
            if not self.samples:
                raise UserError(f"--shards {shards}: no sample could be read")
        self.lock = threading.Lock()  # one cascade at a time, even when a page stops waiting for its run
        self.runs = 0

    def describe(self) -> str:
        """The bundle in one line per UNet: its size, what it is conditioned on, its step and how chosen."""
        lines = []
        for number, model in self.pipe.unets.items():
            h, w = self.pipe.configs[number].image_size(number)
            meta = self.pipe.meta.get(number, {})
            chosen = meta.get("selected", {})
            how = (f", the best by {chosen['metric']} ({chosen['value']:.4g})" if chosen.get("by") == "best"
                   else "")
            inputs = ", ".join(k for k in model.conditioning.keys if not k.endswith("_valid"))
            lines.append(f"- **UNet {number}**: {w}x{h} px, conditioned on {inputs}; step {meta.get('step', '?')}{how}")
        return "\n".join(lines)

    def default_steps(self) -> dict[int, int]:
        return {n: model.spec.sample_steps for n, model in self.pipe.unets.items()}

    def shown(self, conds: dict[int, dict]) -> tuple[Image.Image | None, Image.Image, Image.Image]:
        """A job's pictures at the cascade's output size as the page shows them: the person (the target,
        where there is one), the ca image with the person's pose, the garment with its pose."""
        c = conds[self.pipe.last]
        person = picture(c[PERSON][0]) if PERSON in c else None
        ca = draw_pose(picture(c[CA][0]), c[PERSON_POSE][0].numpy(), c[f"{PERSON_POSE}_valid"][0].numpy())
        garment = draw_pose(picture(c[GARMENT][0]), c[GARMENT_POSE][0].numpy(),
                            c[f"{GARMENT_POSE}_valid"][0].numpy())
        return person, ca, garment

    def from_sample(self, key: str | None) -> Job:
        if not self.samples:
            raise UserError("no held-out samples: start the page with --shards 'shards/test-*.tar'")
        if key not in self.samples:
            raise UserError(f"pick a held-out sample (got {key!r})")
        conds = self.samples[key]
        h, w = self.pipe.output_size
        return Job(conds, (0, 0, w, h), key)

    def from_upload(self, ca, garment, person_pose, garment_pose) -> Job:
        """Uploaded files (paths, None where none was given), read and prepared as tools/infer.py reads and
        prepares them."""
        missing = [what for what, f in (("a clothing-agnostic image", ca), ("a garment image", garment),
                                        ("the person's pose", person_pose)) if not f]
        if missing:
            raise UserError(f"upload {', '.join(missing)}")
        try:
            ca, garment, person_pose, garment_pose = self.pipe.read(ca, garment, person_pose, garment_pose)
        except UserError as err:  # named as the user named them, not by the server's copies
            message = str(err)
            for path in filter(None, (ca, garment, person_pose, garment_pose)):
                message = message.replace(str(path), Path(path).name)
            raise UserError(message) from None
        conds, box = self.pipe.prepare(ca, garment, person_pose, garment_pose)
        h, w = self.pipe.output_size
        notes = [f"The {what} is {image.width}x{image.height}, not the cascade's aspect ({w}x{h}): padded with "
                 f"white to it, as tools/infer.py pads{after}."
                 for what, image, after in (("clothing-agnostic image", ca, ", and the result cropped back"),
                                            ("garment image", garment, ""))
                 if image.width * h != image.height * w]
        if garment_pose is None:
            notes.append("No garment pose: sampled as a flat product image.")
        return Job(conds, box, None, notes)

    def run(self, job: Job, sampler: str, steps: tuple[int, ...], guidance: float, seed: int, events: queue.Queue):
        """Run the cascade on ``job``, putting ("step", unet, i, n), ("unet", unet, picture, seconds), then
        ("error", message) or ("done", picture) on ``events``."""
        with self.lock:
            self.runs += 1
            try:
                keys = [job.key] if job.key is not None else None
                stages = self.pipe.stages(job.conds, sampler, steps, guidance, seed, keys,
                                          on_step=lambda number, i, n: events.put(("step", number, i, n)))
                start, result = time.perf_counter(), None
                for number, out in stages:
                    result = self.pipe.crop(out[0].float().cpu(), job.box)
                    now = time.perf_counter()
                    events.put(("unet", number, result, now - start))
                    start = now
                events.put(("done", result))
            except Exception as err:  # the page says what failed; the terminal keeps the traceback
                traceback.print_exc()
                events.put(("error", f"the cascade failed: {type(err).__name__}: {err}"))


def progress_html(pipe: TryOnPipeline, state: dict[int, dict]) -> str:
    """One row per UNet: its name and size, a progress bar, its steps and seconds."""
    rows = []
    for number in pipe.unets:
        h, w = pipe.configs[number].image_size(number)
        s = state.get(number, {})
        done, total = s.get("i", 0), s.get("n", 0)
        seconds = f"{s['seconds']:.1f} s" if "seconds" in s else ("running" if done else "waiting")
        rows.append(f'<tr data-unet="{number}"><td>UNet {number} ({w}x{h})</td>'
                    f'<td><progress value="{done}" max="{max(total, 1)}"></progress></td>'
                    f'<td class="steps">{done}/{total or "-"} steps</td><td class="seconds">{seconds}</td></tr>')
    return f'<table class="unet-progress">{"".join(rows)}</table>'


def build_page(play: Playground, output_dir: Path):
    import gradio as gr

    pipe = play.pipe
    unets = list(pipe.unets)
    defaults = play.default_steps()
    config = pipe.configs[pipe.last]
    keys = list(play.samples)
    # Pictures at their own pixels, shown at one height whatever their size; no share button (it is for
    # Hugging Face Spaces).
    view = dict(interactive=False, format="png", height=288, buttons=["download", "fullscreen"],
                elem_classes=["picture"])

    with gr.Blocks(title="tryon-ds playground", analytics_enabled=False) as page:
        gr.Markdown(f"# tryon-ds: try a garment on\n{play.describe()}")
        source = gr.State("sample" if keys else "upload")
        with gr.Tabs(selected="sample" if keys else "upload"):
            with gr.Tab("Held-out sample", id="sample") as sample_tab:
                sample = gr.Dropdown(keys, value=None, label="Sample", elem_id="sample",
                                     info=f"the first {len(keys)} of the shards" if keys else
                                     "none: start the page with --shards")
            with gr.Tab("Upload", id="upload") as upload_tab:
                with gr.Row():
                    ca_file = gr.File(label="Clothing-agnostic image", file_types=["image"], elem_id="ca-file")
                    garment_file = gr.File(label="Garment image", file_types=["image"], elem_id="garment-file")
                    person_pose_file = gr.File(label="Person pose (.npy or JSON)", file_types=[".npy", ".json"],
                                               elem_id="person-pose-file")
                    garment_pose_file = gr.File(label="Garment pose (none for a flat garment)",
                                                file_types=[".npy", ".json"], elem_id="garment-pose-file")
        with gr.Row():
            person_view = gr.Image(label="Person (target)", elem_id="person-view", **view)
            ca_view = gr.Image(label="Clothing-agnostic + person pose", elem_id="ca-view", **view)
            garment_view = gr.Image(label="Garment + its pose", elem_id="garment-view", **view)
        with gr.Row():
            sampler = gr.Dropdown(list(SAMPLERS), value=config.diffusion.sampler, label="Sampler", elem_id="sampler")
            steps = [gr.Number(value=defaults[n], precision=0, minimum=1, label=f"Steps, UNet {n}",
                               elem_id=f"steps-{n}") for n in unets]
            guidance = gr.Number(value=config.diffusion.guidance, label="Guidance", minimum=0, elem_id="guidance")
            seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
        run = gr.Button("Try it on", variant="primary", elem_id="run")
        message = gr.Markdown(elem_id="message")
        progress = gr.HTML(progress_html(pipe, {}), elem_id="progress")
        with gr.Row():
            outputs = [gr.Image(label=f"UNet {n} ({w}x{h})", elem_id=f"unet-{n}", **view)
                       for n in unets for h, w in [pipe.configs[n].image_size(n)]]
        result = gr.File(label="Result (PNG)", interactive=False, elem_id="result")
        served = gr.Markdown(f"Cascades run since start: {play.runs}", elem_id="served")

        sample_tab.select(lambda: "sample", None, source)
        upload_tab.select(lambda: "upload", None, source)

        def show_sample(key):
            try:
                person, ca, garment = play.shown(play.from_sample(key).conds)
            except UserError as err:
                return None, None, None, f"**{err}**"
            return person, ca, garment, ""

        sample.change(show_sample, sample, [person_view, ca_view, garment_view, message])

        def answer(text, state=None, images=None, file=None):
            """The outputs' values; ``images`` None leaves the pictures as they are (a progress update sends
            the table alone, not every finished picture again)."""
            pictures = [gr.update()] * len(unets) if images is None else [images.get(n) for n in unets]
            return [text, progress_html(pipe, state or {}), *pictures, file,
                    f"Cascades run since start: {play.runs}"]

        def try_on(source, key, ca, garment, person_pose, garment_pose, sampler, guidance, seed, *steps):
            """A generator: the page is updated at each UNet's end and, at most four times a second, with
            its progress; the cascade itself runs in a thread of its own."""
            # Until an upload is read, the pictures shown are not its own.
            views = [gr.update()] * 3 if source == "sample" else [None] * 3
            try:
                if any(s is None or s < 1 for s in steps):
                    raise UserError("steps: a whole number of 1 or more for each UNet")
                if guidance is None or not np.isfinite(guidance) or guidance < 0:
                    raise UserError("guidance: a number of 0 or more (1: no guidance)")
                if source == "sample":  # its pictures are on the page since it was picked
                    job = play.from_sample(key)
                else:
                    job = play.from_upload(ca, garment, person_pose, garment_pose)
                    views = list(play.shown(job.conds))
            except UserError as err:
                yield *views, *answer(f"**{err}**".replace("\n", "  \n"), images={})
                return
            notes = "  \n".join(job.notes)
            events: queue.Queue = queue.Queue()
            worker = threading.Thread(target=play.run, daemon=True,
                                      args=(job, sampler, tuple(int(s) for s in steps), float(guidance),
                                            int(seed or 0), events))
            worker.start()
            state, images, last = {}, {}, 0.0
            yield *views, *answer(notes, state, images)  # the inputs shown, the last run's pictures cleared
            views = [gr.update()] * 3  # then only what changes is sent
            while True:
                event = events.get()
                kind = event[0]
                changed = None
                if kind == "step":
                    _, number, i, n = event
                    state.setdefault(number, {}).update(i=i, n=n)
                    if time.monotonic() - last < 0.25 and i < n:
                        continue
                elif kind == "unet":
                    _, number, image, seconds = event
                    state[number]["seconds"], images[number] = seconds, image
                    changed = images
                elif kind == "error":
                    yield *views, *answer(f"**{event[1]}**", state)
                    return
                else:
                    name = f"tryon_{safe_name(job.key) if job.key else 'upload'}_seed{int(seed or 0)}.png"
                    path = output_dir / name
                    atomic.save_image(event[1], path)
                    total = sum(s.get("seconds", 0.0) for s in state.values())
                    yield *views, *answer(f"{notes}  \nDone in {total:.1f} s.".strip(), state, None, str(path))
                    return
                last = time.monotonic()
                yield *views, *answer(notes, state, changed)

        run.click(try_on, [source, sample, ca_file, garment_file, person_pose_file, garment_pose_file, sampler,
                           guidance, seed, *steps],
                  [person_view, ca_view, garment_view, message, progress, *outputs, result, served],
                  trigger_mode="once", concurrency_limit=1, show_progress="hidden")
    return page


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a bundle folder from tools/consolidate_checkpoint.py")
    p.add_argument("--shards", help="held-out shards to pick samples from, e.g. 'shards/test-*.tar'")
    p.add_argument("--max-samples", type=int, default=24, metavar="N", help="the first N samples of --shards")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to serve on (default: this machine only; reach it through an SSH tunnel)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also a public gradio.live link (reaches the network)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    # Before gradio is imported: no analytics, no version check, no model hub; the page's own requests to
    # this machine never go through a proxy the cluster sets.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(
        filter(None, [os.environ.get("NO_PROXY") or os.environ.get("no_proxy"), "127.0.0.1", "localhost"]))
    try:
        importlib.import_module("gradio")
    except ImportError:
        raise UserError(f"tools/app.py needs gradio, an optional extra: {EXTRA}") from None
    pipe = TryOnPipeline.from_pretrained(args.checkpoint, args.device, ema=args.ema)
    play = Playground(pipe, args.shards, args.max_samples)
    output_dir = Path(tempfile.mkdtemp(prefix="tryon-app-"))
    page = build_page(play, output_dir)
    page.queue(default_concurrency_limit=1)
    print(f"tryon-ds playground: {args.checkpoint} ({len(pipe.unets)} UNets, {len(play.samples)} held-out samples)"
          f" on http://{args.host}:{args.port}", flush=True)
    page.launch(server_name=args.host, server_port=args.port, share=args.share, quiet=True, css=CSS,
                allowed_paths=[str(output_dir)], max_file_size="64mb", footer_links=["api", "settings"])


if __name__ == "__main__":
    main()
