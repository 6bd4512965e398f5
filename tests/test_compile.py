"""unetN.compile in real DeepSpeed engines on 2 CPU ranks: compiled and eager runs train alike under ZeRO-2
and ZeRO-3, resume from each other's checkpoints, write the same state-dict keys, and a compiled run builds
no graph in steady state.

What these check is dynamo's side of compilation (the graphs captured, their guards and recompiles, the
wrapper's state-dict keys, ZeRO-3's hooks around the graph), which the aot_eager backend captures as
inductor does; aot_eager then runs the graph with eager kernels instead of generating code. On 2 cores a
cold inductor compile of even this small UNet 1 took 110-127 s of this module's time, and its C++ kernels are
not what a GPU run compiles (Triton's): inductor itself is measured where compilation is turned on,
by tools/gpu_check.sh on a GPU (compiled against eager, every UNet, ZeRO-2 and ZeRO-3) and
tools/bench/compile.py. The module shares one small UNet 1 (two levels) among its runs."""
import json
import os

import pytest

from conftest import ROOT, command, losses, run, run_tool

# Real multi-rank or multi-process runs: the full suite, not the fast tier (-m "not slow").
pytestmark = pytest.mark.slow

SMALL = ["--set", "unet1.dim_mults=[1,2]", "--set", "unet1.num_res_blocks=[1,1]",
         "--set", "unet1.attn_levels=[false,true]"]
# A validation pass and a preview between training steps, checkpoints at 3 and 5.
SCHEDULE = ["--set", "validation_freq=2", "--set", "sample_freq=2", "--set", "checkpoint_freq=3",
            "--set", "logging.sample_count=2"]
COMPILED = ["--set", "unet1.compile=true", "--set", "unet1.compile_backend=aot_eager"]
# Five optimizer steps of fp32 AdamW from the same weights and batches: the captured graph's decomposed ops
# may sum in another order than the eager modules, which a few steps carry to the 4th-5th significant digit.
REL = 2e-4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path_factory.mktemp("inductor"))}


def _train(run_dir, shards, env, extra=()):
    return run(command(run_dir, shards, steps=5, extra=[*SMALL, *SCHEDULE, *extra], launcher="torchrun"), timeout=600,
               env=env)


@pytest.fixture(scope="module")
def runs(shards, env, tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    _train(root / "eager", shards, env)
    _train(root / "compiled", shards, env, COMPILED)
    return root


def test_zero3_compiled_run_with_activation_checkpointing_trains_as_the_eager_one(runs, shards, env, tmp_path):
    """Against the eager ZeRO-2 run (each step's randomness is seeded by its number, so the previews and
    checkpoints left out here change nothing): ZeRO-3 changes where the weights live, not the arithmetic of
    a step (fp32 here), and activation checkpointing recomputes the same values."""
    compiled = tmp_path / "zero3_compiled"
    run(command(compiled, shards, ds="cpu_zero3", steps=5,
                extra=[*SMALL, *SCHEDULE, *COMPILED, "--set", "unet1.checkpointing=true", "--set", "sample_freq=100", "--set", "checkpoint_freq=100"],
                launcher="torchrun"), timeout=600, env=env)
    eager, mine = losses(runs / "eager"), losses(compiled)
    assert sorted(mine) == [1, 2, 3, 4, 5]
    assert [mine[s] for s in sorted(mine)] == pytest.approx([eager[s] for s in sorted(eager)], rel=REL)
    graphs = _graphs(compiled)  # one graph for the training step and one for validation, not one per module
    assert graphs[1] == 1 and graphs[3] == graphs[4] == graphs[5] == 2


def _graphs(run_dir):
    out = {}
    for line in (run_dir / "out" / "metrics_unet1.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "compile/graphs" in entry:
            out[entry["step"]] = entry["compile/graphs"]
    return out


def test_compiled_run_trains_as_eager_and_builds_no_graph_in_steady_state(runs):
    eager, compiled = losses(runs / "eager"), losses(runs / "compiled")
    assert sorted(compiled) == [1, 2, 3, 4, 5]
    assert [compiled[s] for s in sorted(compiled)] == pytest.approx([eager[s] for s in sorted(eager)], rel=REL)
    graphs = _graphs(runs / "compiled")
    assert not _graphs(runs / "eager")
    # Step 1: the training graph. Step 3: plus step 2's validation graph (no grad; one, its short last batch
    # filled up to the micro-batch); the preview after it runs eager. Step 5, after another validation and
    # preview: nothing more.
    assert graphs[1] == 1 and graphs[3] == graphs[4] == graphs[5] == 2


def test_compiled_and_eager_runs_resume_from_each_others_checkpoints(runs, shards, env, tmp_path):
    for source, extra, name in ((runs / "eager", COMPILED, "compiled_from_eager"),
                                (runs / "compiled", [], "eager_from_compiled")):
        resumed = tmp_path / name
        _train(resumed, shards, env, [*extra, "--resume", str(source / "ckpt" / "unet1" / "step00000003"),
                                      "--set", "validation_freq=100", "--set", "sample_freq=100"])
        mine, theirs = losses(resumed), losses(source)
        assert sorted(mine) == [4, 5], name
        assert [mine[4], mine[5]] == pytest.approx([theirs[4], theirs[5]], rel=REL), name


def test_a_compiled_runs_bundle_has_the_eager_models_keys(runs, tmp_path):
    from safetensors.torch import load_file
    from tryon_ds.cascade import CascadeUNet
    from tryon_ds.config import build_config, deep_merge, read_config_file
    r = run_tool(["tools/consolidate_checkpoint.py", str(runs / "compiled" / "ckpt" / "unet1" / "step00000005"),
                  "--out", str(tmp_path / "bundle")])
    assert r.returncode == 0, r.stderr
    config = build_config(deep_merge(read_config_file(ROOT / "configs" / "tiny.yaml"), {
        "unet1": {"dim_mults": [1, 2], "num_res_blocks": [1, 1], "attn_levels": [False, True], "compile": True}}))
    eager = set(CascadeUNet(config, 1).unet.state_dict())
    for weights in ("ema.safetensors", "weights.safetensors"):
        assert set(load_file(tmp_path / "bundle" / "unet1" / weights)) == eager
