"""tools/app.py, the page to try a trained cascade: what it runs (each UNet's output as the cascade makes it,
its progress), what it says about bad input, and the page itself in a real browser (Debian's Chromium under
Playwright) on the demo's bundle, with nothing reaching beyond this machine."""
import importlib.util
import json
import os
import queue

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, run_tool

from tools.bench.browser import BrowserUnavailable, chromium, page_server, pick_sample, wait_for_message
from tools.bench.record_proxy import RecordingProxy
from tryon_ds.errors import UserError

PREVIOUS = ROOT / "tests" / "data" / "previous_release" / "bundle"


@pytest.fixture(scope="module")
def play():
    from tryon_ds.inference import TryOnPipeline
    from tryon_ds.tools.app import Playground

    return Playground(TryOnPipeline.from_pretrained(PREVIOUS, ema=False))


def pose(width, height, k=18):
    """A plausible standing pose (x, y, confidence) in an image's pixels."""
    rng = np.random.default_rng(k)
    return np.stack([rng.uniform(0.2, 0.8, k) * width, rng.uniform(0.1, 0.9, k) * height, np.ones(k)], 1)


@pytest.fixture
def upload(tmp_path):
    """A pair as a user uploads it: PNG pictures (the ca image square, the cascade is 128x128 here but the
    garment 3:4) and the poses as .npy and OpenPose JSON."""
    rng = np.random.default_rng(0)
    files = {"ca": tmp_path / "ca.png", "garment": tmp_path / "garment.png",
             "person_pose": tmp_path / "person.npy", "garment_pose": tmp_path / "garment_keypoints.json"}
    Image.fromarray(rng.integers(0, 255, (100, 100, 3), np.uint8)).save(files["ca"])
    Image.fromarray(rng.integers(0, 255, (96, 72, 3), np.uint8)).save(files["garment"])
    np.save(files["person_pose"], pose(100, 100))
    files["garment_pose"].write_text(json.dumps({"people": [{"pose_keypoints_2d": pose(72, 96).ravel().tolist()}]}))
    return files


def test_stages_give_each_unets_output_as_generate_does_with_its_progress(play, upload):
    pipe = play.pipe
    job = play.from_upload(*(str(upload[k]) for k in ("ca", "garment", "person_pose", "garment_pose")))
    ticks = []
    staged = list(pipe.stages(job.conds, "ddim", (3, 2, 4), 1.0, 5,
                              on_step=lambda n, i, total: ticks.append((n, i, total))))
    assert [n for n, _ in staged] == [1, 2, 3]
    whole = pipe.generate(job.conds, "ddim", (3, 2, 4), 1.0, 5)
    for number, out in staged:
        torch.testing.assert_close(out, whole[number], rtol=0, atol=0)
    assert ticks == [(1, i, 3) for i in (1, 2, 3)] + [(2, i, 2) for i in (1, 2)] + [(3, i, 4) for i in (1, 2, 3, 4)]


def test_a_run_reports_each_unet_then_the_result(play, upload):
    job = play.from_upload(*(str(upload[k]) for k in ("ca", "garment", "person_pose", "garment_pose")))
    events = queue.Queue()
    runs = play.runs
    play.run(job, "ddim", (2, 2, 2), 1.0, 0, events)
    got = [events.get_nowait() for _ in range(events.qsize())]
    assert [e[:2] for e in got if e[0] == "unet"] == [("unet", 1), ("unet", 2), ("unet", 3)]
    assert [e[1:] for e in got if e[0] == "step"] == [(n, i, 2) for n in (1, 2, 3) for i in (1, 2)]
    assert got[-1][0] == "done" and play.runs == runs + 1
    # cropped to the ca image's aspect: square, at each UNet's size
    sizes = [e[2].size for e in got if e[0] == "unet"]
    assert sizes == [(32, 32), (64, 64), (128, 128)] and got[-1][1].size == (128, 128)
    assert all(e[3] > 0 for e in got if e[0] == "unet")


def test_a_run_that_fails_is_a_message(play, upload):
    job = play.from_upload(*(str(upload[k]) for k in ("ca", "garment", "person_pose", "garment_pose")))
    events = queue.Queue()
    play.run(job, "no-such-sampler", (2, 2, 2), 1.0, 0, events)
    assert events.get_nowait() == ("error", "the cascade failed: ValueError: sampler 'no-such-sampler': expected one "
                                            "of ddpm, ddim, dpmpp")


def test_uploads_of_another_aspect_are_padded_and_said(play, upload):
    job = play.from_upload(str(upload["ca"]), str(upload["garment"]), str(upload["person_pose"]), None)
    assert job.box == (0, 0, 128, 128) and job.key is None
    assert job.notes == ["The garment image is 72x96, not the cascade's aspect (128x128): padded with white to it, "
                         "as tools/infer.py pads.", "No garment pose: sampled as a flat product image."]
    person, ca, garment = play.shown(job.conds)
    assert person is None and ca.size == garment.size == (128, 128)
    # padded with white on both sides of the garment, and the pose drawn over the ca image
    assert np.asarray(garment)[64, :4].min() == 255 and np.asarray(garment)[64, -4:].min() == 255
    from tryon_ds.data.preprocess import picture
    assert not np.array_equal(np.asarray(ca), np.asarray(picture(job.conds[3]["ca"][0])))


@pytest.mark.parametrize("bad, expected", [
    ("nan_pose", "person.npy: pose has NaN or infinite values"),
    ("pose_shape", "person.npy: pose of shape (17, 3), expected (18, 2), (18, 3) or (25, 3)"),
    ("unreadable", "ca.png: unreadable or truncated image"),
    ("missing", "upload the person's pose"),
])
def test_bad_uploads_are_one_message_naming_the_file(play, upload, bad, expected):
    files = {k: str(v) for k, v in upload.items()}
    if bad == "nan_pose":
        p = pose(100, 100)
        p[3, 0] = np.nan
        np.save(upload["person_pose"], p)
    elif bad == "pose_shape":
        np.save(upload["person_pose"], pose(100, 100, k=17))
    elif bad == "unreadable":
        upload["ca"].write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    else:
        files["person_pose"] = None
    with pytest.raises(UserError) as err:
        play.from_upload(files["ca"], files["garment"], files["person_pose"], files["garment_pose"])
    assert expected in str(err.value)


def test_held_out_samples_need_shards(play):
    with pytest.raises(UserError, match="start the page with --shards"):
        play.from_sample("synth_0000000")


def test_without_gradio_or_a_bundle_the_tool_says_what_to_do(tmp_path):
    start = ("import sys; sys.path.insert(0, 'tools'); sys.modules['gradio'] = None; "
             "sys.argv = ['tools/app.py', '--checkpoint', 'bundle']; import runpy; "
             "runpy.run_path('tools/app.py', run_name='__main__')")
    r = run_tool(["-c", start])
    assert r.returncode == 2 and r.stderr == 'error: tools/app.py needs gradio, an optional extra: pip install -e ".[app]"\n'
    needs_gradio()
    r = run_tool(["tools/app.py", "--checkpoint", str(tmp_path)])
    assert r.returncode == 2 and r.stderr.startswith(f"error: {tmp_path} has no unet1/") and r.stderr.count("\n") == 1


# --- the page in a real browser -------------------------------------------------------------------------------

def needs_gradio():
    """gradio found, not imported here: the page runs in its own process."""
    if importlib.util.find_spec("gradio") is None:
        pytest.skip("gradio is not installed: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def browser():
    try:
        with chromium() as b:
            yield b
    except BrowserUnavailable as err:
        pytest.skip(f"no browser on this machine: {err}")


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.network  # installs Debian's chromium when missing
def test_the_page_in_a_real_browser(demo_quick, browser, tmp_path):
    out, _ = demo_quick
    bundle, shards = out / "bundle", str(out / "shards" / "val-*.tar")
    needs_gradio()
    with RecordingProxy() as proxy:
        with page_server(bundle, shards, {**os.environ, **proxy.environment()}, "--max-samples", "4") as (url, proc):
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            requested = []
            page.on("request", lambda r: requested.append(r.url))
            page.goto(url)
            page.wait_for_selector("#run")
            drive(page, tmp_path)
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            proc.terminate()
            log = proc.communicate(timeout=30)[0]
        assert proxy.requests == [], proxy.requests  # the server reached for nothing beyond this machine
    assert "Traceback" not in log, log
    assert requested and all(u.startswith(url) or u.startswith(("data:", "blob:")) for u in requested), \
        sorted({u for u in requested if not u.startswith(url)})


def uploaded(page, *fields):
    """Wait until each file field holds its upload (its Clear button shows once the server has the file)."""
    for f in fields:
        page.wait_for_selector(f"{f} button[aria-label=Clear]")


def drive(page, tmp_path):
    """What a user does on the page, checked as they would see it."""
    # A held-out sample: the person, the garment and both poses appear.
    pick_sample(page, 0)
    # A double click runs one cascade; each UNet's row fills, each UNet's picture comes at its own size.
    page.fill("#seed input", "3")
    page.dblclick("#run")
    wait_for_message(page, "Done in")
    for n, size in ((1, 32), (2, 64), (3, 128)):
        row = page.locator(f'#progress tr[data-unet="{n}"]')
        steps = row.locator(".steps").inner_text()
        done, total = steps.split()[0].split("/")
        assert done == total and int(total) > 0, steps
        assert row.locator(".seconds").inner_text().endswith(" s")
        assert row.locator("progress").get_attribute("value") == total
        width = page.eval_on_selector(f"#unet-{n} img", "img => img.naturalWidth")
        assert width == size
    assert page.inner_text("#served") == "Cascades run since start: 1"
    # The result downloads as the PNG of the cascade's output.
    with page.expect_download() as download:
        page.locator("#result a").first.click()
    path = tmp_path / "result.png"
    download.value.save_as(path)
    with Image.open(path) as result:
        assert result.format == "PNG" and result.size == (128, 128)

    # An upload whose pose holds NaN: a message naming the file, and nothing run.
    page.get_by_role("tab", name="Upload").click()
    shards_pose = pose(100, 120)
    shards_pose[5, 1] = np.nan
    files = {"ca": tmp_path / "ca.png", "garment": tmp_path / "garment.png", "pose": tmp_path / "person_pose.npy"}
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (120, 100, 3), np.uint8)).save(files["ca"])
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), np.uint8)).save(files["garment"])
    np.save(files["pose"], shards_pose)
    page.set_input_files("#ca-file input[type=file]", str(files["ca"]))
    page.set_input_files("#garment-file input[type=file]", str(files["garment"]))
    page.set_input_files("#person-pose-file input[type=file]", str(files["pose"]))
    uploaded(page, "#ca-file", "#garment-file", "#person-pose-file")
    page.click("#run")
    assert "person_pose.npy: pose has NaN or infinite values" in wait_for_message(page, "NaN")
    assert page.inner_text("#served") == "Cascades run since start: 1"
    # A good pose: it runs, and the page says the ca image of another aspect was padded.
    np.save(files["pose"], pose(100, 120))
    page.click("#person-pose-file button[aria-label=Clear]")
    page.set_input_files("#person-pose-file input[type=file]", str(files["pose"]))
    uploaded(page, "#ca-file", "#garment-file", "#person-pose-file")
    page.click("#run")
    message = wait_for_message(page, "Done in")
    assert "The clothing-agnostic image is 100x120, not the cascade's aspect (128x128): padded" in message, message
    assert "No garment pose: sampled as a flat product image." in message
    assert page.inner_text("#served") == "Cascades run since start: 2"
    assert page.eval_on_selector("#ca-view img", "img => img.naturalWidth") == 128
