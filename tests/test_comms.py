"""What a run moves and how long its steps take, before the GPUs are rented: tryon_ds/comms.py against
DeepSpeed's own comms logger on real engines of the tiny UNet (tests/helpers/comms_probe.py, 2 and 4 CPU
ranks, every rank's record), tryon_ds/scaling.py's cost model, and tools/plan.py's node table and plot."""
import json
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from conftest import ROOT, free_port, run_tool
from tryon_ds import comms
from tryon_ds.scaling import Links, MeasuredLink, step_time, volume

# [DeepSpeed config, mixed_precision, accumulation, zero_optimization overrides, tolerance of the gathers]
# Small buckets and windows (against the tiny UNet's 1.9M parameters) make the many-call paths run: several
# reduction buckets, ZeRO-3 releasing and gathering parameters again, persistent ones, hpZ's node gathers.
CASES = {
    2: [["cpu_zero0", "no", 2, {}, 0],
        ["cpu_zero2", "no", 2, {"stage": 1, "reduce_bucket_size": 100000}, 0],
        ["cpu_zero2", "no", 2, {"reduce_bucket_size": 100000}, 0],
        ["cpu_zero3", "no", 2, {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 50000,
                                "stage3_param_persistence_threshold": 1000}, 0],
        ["cpu_zero3", "no", 1, {"stage3_max_reuse_distance": 1000000, "stage3_prefetch_bucket_size": 50000,
                                "reduce_bucket_size": 200000}, 0]],
    # every rank's view of 4: ZeRO-1, the shipped GPU configs as they are (bf16, their thresholds), hpZ
    4: [["cpu_zero2", "no", 1, {"stage": 1, "reduce_bucket_size": 300000}, 0],
        ["zero2_bf16", "bf16", 1, {}, 0],
        ["zero3_bf16", "bf16", 1, {}, 0],
        ["cpu_zero3", "no", 1, {"zero_hpz_partition_size": 2, "stage3_max_reuse_distance": 0,
                                "stage3_prefetch_bucket_size": 50000}, 0.01]],
}


@pytest.fixture(scope="module")
def layout():
    from tryon_ds.config import build_config, read_config_file
    return comms.layout(build_config(read_config_file(ROOT / "configs" / "tiny.yaml")), 1)


def logged(ranks: int, out) -> list[list[dict]]:
    cases = [c[:4] for c in CASES[ranks]]
    r = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
                        str(free_port()), "tests/helpers/comms_probe.py", "--out", str(out), "--cases",
                        json.dumps(cases)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(ranks)]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_the_bytes_and_calls_of_every_collective_are_deepspeeds(ranks, layout, tmp_path):
    """Every collective kind's bytes and calls over one steady step, on every rank, equal the planner's: to
    the byte and the call, except ZeRO-3's second gathers where the trace is long against its windows
    (comms.py says why), there within the case's tolerance of the gathered bytes and one call."""
    from tryon_ds.training.ds_config import precision

    for rank, report in enumerate(logged(ranks, tmp_path)):
        for (name, _, accumulation, zero, tolerance), case in zip(CASES[ranks], report):
            ds = case["ds"]
            got = {op: (sum(int(size) * n for size, n in sizes.items()), sum(sizes.values()))
                   for op, sizes in case["record"].items()}
            want = comms.totals(comms.per_step(layout, ds, precision(ds), ranks, accumulation))
            where = f"rank {rank} of {ranks}, {name} {zero}"
            assert got.keys() == want.keys(), where
            for op in got:
                if tolerance and op == "all_gather_into_tensor":
                    assert abs(want[op][0] / got[op][0] - 1) <= tolerance, (where, got, want)
                    assert abs(want[op][1] - got[op][1]) <= 1, (where, got, want)
                else:
                    assert got[op] == want[op], (where, op, got, want)


def test_a_step_of_the_shipped_configs_moves_what_zero_promises(layout):
    """ZeRO-2 (bf16 parameters, fp32 reduction): 4 bytes a parameter reduced per micro-batch, 2 a parameter
    gathered once; ZeRO-3 gathers the parameters for forward every micro-batch; one rank moves nothing."""
    from tryon_ds.scaling import shipped_ds

    n, ranks = layout.total, 8
    two = comms.totals(comms.per_step(layout, shipped_ds(2, "bf16"), "bf16", ranks, accumulation=3))
    assert two["all_reduce"][0] == 3 * 4 * n + 4 + 1  # the gradients thrice, the norm, the overflow flag
    assert two["all_gather_into_tensor"] == ((n + (-n) % (2 * ranks)) // ranks * 2, 1)
    one = comms.totals(comms.per_step(layout, shipped_ds(1, "bf16"), "bf16", ranks, accumulation=3))
    assert one["all_reduce"][0] == 4 * n + 4 + 1  # ZeRO-1 reduces at the boundary only
    pieces = sum(math.ceil(numel / ranks) for numel in layout.numels) * 2
    # no parameter of the tiny UNet passes zero3_bf16.json's persistence threshold (1e5): all gathered after
    # the step, none in forward
    three = comms.per_step(layout, shipped_ds(3, "bf16"), "bf16", ranks, accumulation=2)
    assert not any(c.phase == "forward" for c in three)
    assert sum(c.bytes for c in three if c.what == "persistent parameters") == pieces
    ds = shipped_ds(3, "bf16")
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    three = comms.per_step(layout, ds, "bf16", ranks, accumulation=2)
    assert sum(c.bytes for c in three if c.phase == "forward") == 2 * pieces  # every piece, each micro-batch
    assert comms.per_step(layout, ds, "bf16", 1) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=40), st.integers(1, 6000), st.booleans())
def test_buckets_keep_every_element_and_their_limit(numels, limit, flush_after):
    out = comms.buckets(numels, limit, flush_after)
    assert sum(out) == sum(numels) and all(b > 0 for b in out)
    if not flush_after:  # a bucket passes the limit only when one tensor alone does
        assert all(b <= max(limit, max(numels)) for b in out)
    else:  # every bucket but the last passed it
        assert all(b > limit for b in out[:-1])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor"]),
       st.integers(1, 1 << 32), st.sampled_from([2, 4, 8, 16, 64, 256]))
def test_a_collective_costs_at_least_its_bytes_at_the_bus_bandwidth_and_more_across_nodes(kind, size, ranks):
    links = Links()
    nodes = math.ceil(ranks / links.ranks_per_node)
    assert links.seconds(kind, size, ranks) >= volume(kind, size, ranks) / links.bus_bandwidth(nodes)
    assert links.seconds(kind, size, ranks) <= Links(nic_gbits=100.0).seconds(kind, size, ranks)
    assert Links().seconds(kind, size, 1) == 0.0


def test_overlap_hides_reduction_behind_backward_but_never_the_last_bucket():
    calls = [comms.Calls("all_reduce", "gradients", (10**9, 10**9), "backward"),
             comms.Calls("all_gather_into_tensor", "parameters", (10**8,), "step")]
    link = MeasuredLink(bus_bandwidth=1e10, latency=0.0)
    each, gather = link.seconds("all_reduce", 10**9, 2), link.seconds("all_gather_into_tensor", 10**8, 2)
    zero2 = {"zero_optimization": {"stage": 2, "overlap_comm": True}}
    hidden = step_time(calls, link, 2, compute_per_micro=3.0, accumulation=1, ds=zero2)
    assert hidden.comm == pytest.approx(2 * each + gather)
    assert hidden.exposed == pytest.approx(each + gather)  # the first bucket hides behind 2 s of backward
    short = step_time(calls, link, 2, compute_per_micro=0.06, accumulation=1, ds=zero2)
    assert short.exposed == pytest.approx(2 * each - 0.04 + gather)  # 0.04 s of backward hides less than a bucket
    plain = step_time(calls, link, 2, compute_per_micro=3.0, accumulation=1,
                      ds={"zero_optimization": {"stage": 2, "overlap_comm": False}})
    assert plain.exposed == pytest.approx(plain.comm) and plain.total == pytest.approx(3.0 + plain.comm)


def plan(argv, capsys) -> tuple[int, str, str]:
    """tools/plan.py in this process (its imports and the meta device's warm-up paid once): exit code, out, err."""
    from tryon_ds.tools.plan import main

    try:
        main(argv)
        code = 0
    except SystemExit as done:
        code = done.code
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_prints_the_collectives_the_node_table_and_a_plot(tmp_path, capsys):
    """The paper's UNet 1 schedule on 8xH100 nodes: a line per node count, the hours to max_steps, the fastest
    setting that fits; the plot is a PNG; the old name runs the same tool."""
    png = tmp_path / "plan.png"
    code, out, err = plan(["--preset", "base", "--micro-batch", "32", "--global-batch", "256", "--max_steps",
                           "500000", "--nodes", "1", "2", "4", "3", "--zero", "3", "--plot", str(png)], capsys)
    assert code == 0, err
    assert "persistent parameters" in out and "reduce_scatter_tensor" in out
    rows = {int(line.split()[0]): line for line in out.splitlines() if line[:7].strip().isdigit()}
    assert sorted(rows) == [1, 2, 3, 4]
    assert "256 samples do not split over 24 GPUs" in rows[3]
    first = rows[1].split()
    assert first[1] == "8" and first[2:5] == ["32", "x", "1"] and first[7] == "100%"
    hours, gpu_hours = float(first[9]), float(first[10])
    assert hours == pytest.approx(500000 * float(first[5]) / 3600, rel=0.01)
    assert gpu_hours == pytest.approx(8 * hours, rel=0.01)
    assert rows[4].split()[2:5] == ["8", "x", "1"] and "ZeRO-" in rows[4]
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (900, 560)
    old = run_tool(["tools/plan_memory.py", "--preset", "tiny", "--micro-batch", "4"])  # its name before: memory
    assert old.returncode == 0 and "total (peak)" in old.stdout and "time per step" not in old.stdout, old.stderr


def test_plan_reads_the_mfu_a_run_logged_and_says_what_is_wrong_with_a_file(tmp_path, capsys):
    metrics = tmp_path / "metrics_unet1.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "perf/mfu": m}) for s, m in [(10, 0.2), (20, 0.5), (30, 0.3)]))
    base = ["--preset", "tiny", "--micro-batch", "4", "--gpus", "2", "--nodes", "1"]
    code, out, err = plan(base + ["--mfu-from", str(metrics)], capsys)
    assert code == 0, err
    assert f"30% MFU (the median of {metrics})" in out
    metrics.write_text('{"step": 10}\nnot json\n')
    code, out, err = plan(base + ["--mfu-from", str(metrics)], capsys)
    assert code == 2 and f"--mfu-from {metrics}, line 2: not JSON" in err
    code, out, err = plan(base + ["--gpu", "TPU v5", "--precision", "bf16"], capsys)
    assert code == 2 and "--gpu 'TPU v5' at bf16 is not in tryon_ds/perf.py's table" in err
    code, out, err = plan(base + ["--mfu", "35"], capsys)
    assert code == 2 and "--mfu 35.0: expected a fraction in (0, 1]" in err
