"""A training run planned before the GPUs are rented: its memory per GPU (tryon_ds/planner.py says what it
counts: model states, EMA, activations, the optimizer step's temporaries, DeepSpeed's buffers), whether it
fits and what to change if not; the bytes each collective moves per step and rank (tryon_ds/comms.py); and
its step time, throughput and hours to the end on 1, 2, 4, ... nodes, with the fastest ZeRO stage and
micro-batch x accumulation that fit (tryon_ds/scaling.py). ``tools/plan_memory.py``, its name before, prints
the memory plan alone (``--memory-only``).

    python tools/plan.py --preset base --micro-batch 16 --zero 2 --precision bf16 --gpus 16
    python tools/plan.py --preset sr --micro-batch 8 --zero 3 --precision bf16 --gpus 8 --checkpointing
    python tools/plan.py --preset sr1024 --micro-batch 16 --zero 2 --gpus 8       # UNet 3 on 256 px crops
    python tools/plan.py --preset base --micro-batch 32 --global-batch 256 --max_steps 500000 --nodes 1 2 4 8 \
        --plot plan.png                                                              # the paper's schedule

The buffers and the collectives follow the DeepSpeed config the run would use
(``ds_configs/zero{2,3}_{precision}.json``, or ``--deepspeed_config``). The node table's defaults describe
8xH100 SXM nodes with 8x400 Gb/s InfiniBand; compute runs at ``--mfu`` of the GPU's datasheet peak
(assumed, unless read from a run's metrics with ``--mfu-from``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

from ..cli import exit_on_user_error
from ..config import add_config_args, config_from_args, find_config_file
from ..errors import UserError
from ..model.presets import POSITION
from .. import comms
from ..perf import datasheet_peak, step_flops
from ..planner import BYTES, GIB, RunPlan, default_ds, preset_config, table
from ..scaling import Links, Model, Setting
from ..training.schedule import total_steps


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="a model preset (tiny, base, sr, ...); default: the config's UNet")
    p.add_argument("--unet", type=int, help="the UNet's place in the cascade (default: the preset's own, else the "
                                            "config's train_unet_number)")
    p.add_argument("--image-size", type=int, nargs="+", metavar="N",
                   help="H [W] of that UNet's images (default: 128 for UNet 1, 256 for UNet 2, 1024 for UNet 3 with a "
                        "preset, else the config's)")
    p.add_argument("--crop-size", type=int, nargs="+", metavar="N",
                   help="H [W] of the crops a UNet trained on crops sees (default: its config's, 256 for sr1024)")
    p.add_argument("--micro-batch", type=int, default=16, help="per GPU")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=2)
    p.add_argument("--precision", choices=sorted(BYTES), default="bf16")
    p.add_argument("--gpus", type=int, default=8, help="data-parallel ranks")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU (default 80)")
    p.add_argument("--cpu", action="store_true",
                   help="the ranks are CPU processes (a CPU smoke test): host and device memory are one, so an "
                        "offload moves nothing off the rank; --gpu-memory is then the memory each rank may use")
    p.add_argument("--deepspeed_config", help="read buffer sizes and collectives from this DeepSpeed config")
    p.add_argument("--memory-only", action="store_true",
                   help="the memory plan only (what tools/plan_memory.py, this tool's name before, prints)")
    t = p.add_argument_group("time per step on 1, 2, 4, ... nodes")
    t.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16], metavar="N")
    t.add_argument("--global-batch", type=int, help="samples per optimizer step, held over the node counts "
                                                    "(default: micro-batch x accumulation x --gpus)")
    t.add_argument("--gpus-per-node", type=int, help="default: --gpus, at most 8")
    t.add_argument("--gpu", default="H100 SXM", help="its datasheet peak (tryon_ds/perf.py); default H100 SXM")
    t.add_argument("--peak-tflops", type=float, help="the GPU's dense peak at the run's precision, if not --gpu's")
    t.add_argument("--mfu", type=float, default=0.35,
                   help="model FLOPs utilisation the compute reaches (default 0.35, an assumption: measure it)")
    t.add_argument("--mfu-from", metavar="METRICS_JSONL",
                   help="the median perf/mfu of a run's metrics_unetN.jsonl (a one-GPU run: its MFU is compute)")
    t.add_argument("--nvlink-gbs", type=float, default=Links.intra_gbs,
                   help=f"GB/s per GPU, one way, inside a node (default {Links.intra_gbs:g}: NVLink 4)")
    t.add_argument("--nics", type=int, default=Links.nics, help=f"NICs per node (default {Links.nics})")
    t.add_argument("--nic-gbits", type=float, default=Links.nic_gbits,
                   help=f"Gb/s per NIC (default {Links.nic_gbits:g}: NDR InfiniBand; 200 for HDR, 100 for EDR)")
    t.add_argument("--link-efficiency", type=float, default=Links.efficiency,
                   help=f"part of the nominal bandwidths a large collective reaches (default {Links.efficiency})")
    t.add_argument("--plot", metavar="PNG", help="write throughput against nodes to this PNG")
    add_config_args(p)
    args = p.parse_args(argv)
    for flag in ("micro_batch", "gpus", "global_batch", "gpus_per_node", "nics"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a positive integer")
    if min(args.nodes) < 1 or min(args.nvlink_gbs, args.nic_gbits) <= 0 or not 0 < args.link_efficiency <= 1:
        raise UserError("--nodes, --nvlink-gbs and --nic-gbits take positive numbers, --link-efficiency a fraction "
                        "in (0, 1]")
    rate = compute_rate(args, args.precision)
    # a preset's overrides (--set unets.0.attn_patch=2) go over the preset, after it is placed
    config = config_from_args(argparse.Namespace(**{**vars(args), "set": []}) if args.preset else args)
    number = args.unet or (POSITION.get(args.preset) if args.preset else config.train_unet_number)
    if args.preset:
        config, number = preset_config(config, args.preset, number, args.image_size, args.set)
    elif args.image_size:
        config = config.with_unet(number, config.unet(number), (args.image_size[0], args.image_size[-1]))
    if args.crop_size:
        if "crop_size" not in {f.name for f in dataclasses.fields(config.unet(number))}:
            raise UserError(f"--crop-size: unet{number} ({config.unet(number).preset}) does not train on crops")
        config = config.with_unet(number, dataclasses.replace(config.unet(number), crop_size=(args.crop_size[0],
                                                                                               args.crop_size[-1])))
    ds = json.loads(find_config_file(args.deepspeed_config or default_ds(args.zero, args.precision),
                                     "DeepSpeed config").read_text())
    ds.setdefault("zero_optimization", {})["stage"] = args.zero
    budget = args.gpu_memory * 1e9
    run = RunPlan(config, number, args.micro_batch, args.zero, args.precision, args.gpus, args.checkpointing, ds,
                  args.cpu)
    unit = "per rank" if args.cpu else "per GPU"
    rows, total = run.rows(), run.peak()
    size = "x".join(map(str, config.image_size(number)))
    crop = config.crop_size(number)
    size += f" on {'x'.join(map(str, crop))} crops" if crop else ""
    print(f"unet{number} ({config.unet(number).preset}), {size}, micro-batch {args.micro_batch} {unit}, "
          f"ZeRO-{args.zero}, {args.precision}, {args.gpus} {'CPU rank' if args.cpu else 'GPU'}(s), checkpointing "
          f"{'on' if args.checkpointing else 'off'}")
    print(table(rows, args.cpu))
    if host_rows := run.host_rows():
        print("host memory per rank (the offloaded optimizer):")
        print("\n".join(f"  {k:<34}{v / GIB:9.2f} GiB" for k, v in host_rows.items()))
    verdict = "fits" if total <= budget else "does NOT fit"
    print(f"{verdict} in {args.gpu_memory:g} GB {unit} ({100 * total / budget:.0f}% of it; "
          + ("the libraries and the interpreter" if args.cpu else "the CUDA context and fragmentation")
          + " are not counted)")
    if total > budget:
        print("what would fit instead:")
        for what, option in run.alternatives(budget):
            t = option.peak()
            print(f"  {what}: {t / GIB:.1f} GiB ({'fits' if t <= budget else 'still too large'})")
    if not args.memory_only:
        plan_time(args, run, budget, rate)


def memory_main() -> None:
    """``tryon-plan-memory`` / tools/plan_memory.py: the memory plan, as before the tool planned time too."""
    main(["--memory-only", *sys.argv[1:]])


def compute_rate(args, precision: str) -> tuple[float, str]:
    """FLOP/s one GPU reaches on the step's compute, and where the figures come from."""
    if args.peak_tflops is not None:
        peak, source = args.peak_tflops * 1e12, f"{args.peak_tflops:g} TFLOP/s given"
    else:
        peak = datasheet_peak(args.gpu, "tf32" if precision == "fp32" else precision)
        if peak is None:
            raise UserError(f"--gpu {args.gpu!r} at {precision} is not in tryon_ds/perf.py's table: give --peak-tflops")
        source = f"{args.gpu} {precision} {peak / 1e12:g} TFLOP/s datasheet"
    mfu, how = args.mfu, "assumed: --mfu, or --mfu-from a one-GPU run's metrics"
    if args.mfu_from:
        mfu, how = logged_mfu(Path(args.mfu_from)), f"the median of {args.mfu_from}"
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu}: expected a fraction in (0, 1]")
    return peak * mfu, f"{100 * mfu:.0f}% MFU ({how}) of {source}"


def logged_mfu(path: Path) -> float:
    """The median perf/mfu of a run's metrics jsonl."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise UserError(f"--mfu-from {path}: {err.strerror}") from None
    values = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"--mfu-from {path}, line {number}: not JSON (expected a metrics_unetN.jsonl)") from None
        if isinstance(record, dict) and isinstance(record.get("perf/mfu"), (int, float)):
            values.append(float(record["perf/mfu"]))
    if not values:
        raise UserError(f"--mfu-from {path}: no perf/mfu in it (a run on a GPU of tryon_ds/perf.py's table, or "
                        "with --peak-tflops, logs one)")
    return statistics.median(values)


def plan_time(args, run: RunPlan, budget: float, rate: tuple[float, str]) -> None:
    """The collectives of the planned run, then its step time over the node counts at ``rate`` (FLOP/s a
    GPU reaches on the step's compute, and where that figure comes from)."""
    config, number, precision = run.config, run.number, run.precision
    per_node = args.gpus_per_node or min(args.gpus, 8)
    links = Links(per_node, args.nvlink_gbs, args.nics, args.nic_gbits, args.link_efficiency)
    accumulation = config.gradient_accumulation_steps
    layout = comms.layout(config, number)
    calls = comms.per_step(layout, run.ds, precision, args.gpus, accumulation, per_node)
    print(f"\ncommunication per optimizer step and rank ({args.gpus} ranks, accumulation {accumulation}; sizes as "
          "DeepSpeed's comms logger counts them: an all-gather by each rank's piece):")
    when = {"forward": "during forward", "backward": "during backward", "step": "after backward"}
    for c in calls:
        where = ", inside the node" if c.group == "node" else ""
        print(f"  {c.what:<22}{c.kind:<24}{len(c.sizes):6d} call(s) {c.bytes / 1e9:10.3f} GB  {when[c.phase]}{where}")
    if not calls:
        print("  none (one rank)")

    if run.cpu:
        print("\n(no node table for CPU ranks: tools/bench/scaling.py measures their links and predicts their steps)")
        return
    model = Model(run, layout, step_flops(config, number), rate[0])
    global_batch = args.global_batch or run.micro_batch * accumulation * args.gpus
    try:
        steps = total_steps(config, global_batch)
    except UserError:
        steps = None
    given = Setting(run.zero, run.micro_batch, 0, run.ds)
    print(f"\ntime per step, {global_batch} samples a step, {per_node} GPUs a node ({args.nvlink_gbs:g} GB/s each "
          f"inside it; {args.nics} x {args.nic_gbits:g} Gb/s between nodes; {100 * args.link_efficiency:.0f}% of "
          f"nominal reached); compute at {rate[1]}; {model.flops_per_sample / 1e12:.2f} TFLOP a sample:")
    head = (f"  {'nodes':>5} {'GPUs':>5}  {'micro x acc':>11} {'s/step':>8} {'samples/s':>10} {'scaling':>8} "
            f"{'comm hidden':>11}")
    head += f" {'hours':>8} {'GPU-hours':>10}" if steps else ""
    print(head + "   fastest that fits (shipped ZeRO configs, micro x acc: s/step)")
    rows, first = [], None
    for nodes in args.nodes:
        ranks = nodes * per_node
        if global_batch % ranks:
            print(f"  {nodes:5d} {ranks:5d}  {global_batch} samples do not split over {ranks} GPUs")
            continue
        per_rank = global_batch // ranks
        micro = max(m for m in range(1, min(per_rank, run.micro_batch) + 1) if per_rank % m == 0)
        setting = dataclasses.replace(given, micro=micro, accumulation=per_rank // micro)
        t = model.predict(setting, ranks, links)
        rate_now = global_batch / t.total
        first = first or (ranks, rate_now)
        scaling = rate_now / ranks / (first[1] / first[0])
        hidden = 1 - t.exposed / t.comm if t.comm else 1.0
        fits = "" if model.fits(setting, ranks, budget) else " (does not fit)"
        best = model.fastest(global_batch, ranks, links, budget)
        line = (f"  {nodes:5d} {ranks:5d}  {micro:>4} x {per_rank // micro:<4} {t.total:8.3f} {rate_now:10.1f} "
                f"{100 * scaling:7.0f}% {100 * hidden:10.0f}%")
        if steps:
            line += f" {steps * t.total / 3600:8.1f} {steps * t.total / 3600 * ranks:10.0f}"
        line += f"   {best[0].label()}: {best[1].total:.3f}" if best else "   none fits"
        print(line + fits)
        rows.append((nodes, rate_now, global_batch / best[1].total if best else None))
    if steps:
        print(f"  hours to {steps} steps (max_steps, or num_epochs of the manifest in data_dir)")
    else:
        print("  (give --max_steps, or a data_dir with a manifest and num_epochs, for the hours to the end)")
    if args.plot and rows:
        plot(rows, Path(args.plot), f"unet{number} ({config.unet(number).preset}), ZeRO-{run.zero}, "
                                    f"{global_batch} samples a step, {per_node} GPUs a node")
        print(f"wrote {args.plot}")


def plot(rows: list[tuple[int, float, float | None]], path: Path, title: str) -> None:
    """Samples/s against nodes (log-log): the planned setting, the fastest that fits, and linear scaling
    from the first row. Drawn with Pillow, a dependency already: one chart does not earn matplotlib."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 900, 560, 90, 30, 50, 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    nodes = [r[0] for r in rows]
    ideal = [rows[0][1] * n / nodes[0] for n in nodes]
    values = [r[1] for r in rows] + [r[2] for r in rows if r[2]] + ideal
    lo, hi = math.log10(min(values)) - 0.05, math.log10(max(values)) + 0.05
    x_lo, x_hi = math.log2(nodes[0]), max(math.log2(nodes[-1]), math.log2(nodes[0]) + 1)

    def at(n, v):
        x = left + (math.log2(n) - x_lo) / (x_hi - x_lo) * (width - left - right)
        return x, top + (hi - math.log10(v)) / (hi - lo) * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for n in nodes:
        x, _ = at(n, 10 ** lo)
        draw.line([x, height - bottom, x, height - bottom + 5], fill="black")
        draw.text((x, height - bottom + 8), str(n), fill="black", font=font, anchor="mt")
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1, 2, 5):
            v = m * 10.0 ** e
            if lo <= math.log10(v) <= hi:
                _, y = at(nodes[0], v)
                draw.line([left - 5, y, width - right, y], fill=(225, 225, 225) if m != 1 else (190, 190, 190))
                draw.text((left - 8, y), f"{v:g}", fill="black", font=font, anchor="rm")
    draw.text((width / 2, height - 25), "nodes", fill="black", font=font, anchor="mm")
    draw.text((width / 2, 20), title, fill="black", font=font, anchor="mm")
    # the planned line drawn over the fastest, which it may equal
    series = [("linear scaling", ideal, (150, 150, 150), 3),
              ("fastest that fits", [r[2] for r in rows], (214, 39, 40), 5),
              ("planned", [r[1] for r in rows], (31, 119, 180), 2)]
    for i, (name, ys, colour, size) in enumerate(series):
        points = [at(n, v) for n, v in zip(nodes, ys) if v]
        if len(points) > 1:
            draw.line(points, fill=colour, width=size)
        for x, y in points:
            draw.ellipse([x - size - 1, y - size - 1, x + size + 1, y + size + 1], fill=colour)
        draw.line([left + 15, top + 15 + 20 * i, left + 45, top + 15 + 20 * i], fill=colour, width=size)
        draw.text((left + 52, top + 15 + 20 * i), name, fill="black", font=font, anchor="lm")
    draw.text((left, top - 8), "samples/s", fill="black", font=font, anchor="ld")
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)


if __name__ == "__main__":
    main()
