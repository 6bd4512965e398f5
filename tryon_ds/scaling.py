"""How long a training step takes on N nodes, before they are rented: the step's FLOPs (perf.py) at an
efficiency, and its communication (comms.py) over the links of each level, less what DeepSpeed hides behind
compute. ``tools/plan.py`` prints it as a table over node counts, with the fastest ZeRO stage and
micro-batch / accumulation that fit in memory (planner.py), and the hours to the end of the run.

The links, as NCCL uses them: inside a node every collective runs over NVLink at the GPUs' bus bandwidth;
across nodes a ring (NCCL's one algorithm for all-gather and reduce-scatter) runs one channel per NIC, so its
bus bandwidth is the node's NICs together, capped by NVLink. A collective of p ranks moving S bytes sends
(p-1)/p S per rank (all-gather, reduce-scatter, all-to-all; S the whole tensor) or 2 (p-1)/p S (all-reduce),
at that bandwidth, after a latency; an all-reduce across nodes may take NCCL's tree instead. Latencies and
the choice between algorithms and protocols (LL for small messages, Simple for large) follow NCCL's own cost
model, so thousands of small calls (ZeRO-3's per-parameter gathers) cost what NCCL says they do.

What hides behind compute (forward a third of a step's FLOPs, backward two thirds): ZeRO-3's prefetched
parameter gathers behind forward and backward, and the gradient reduction behind backward where the config
overlaps it (``overlap_comm``); the first gather and the last bucket of each micro-batch cannot hide. Not
modelled: the slowdown of kernels sharing the GPU with communication, the optimizer step's own time (a pass
over the rank's partition of the states: milliseconds), data loading, and an efficiency that changes with the
micro-batch.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from . import comms
from .config import find_config_file
from .planner import RunPlan, default_ds


# NCCL's own cost model (src/graph/tuning.cc): microseconds of latency per (algorithm, protocol), at its
# base and per ring or tree step over NVLink and over the network; LL moves a quarter of the bus bandwidth
# (a third inside a node for all-gather and reduce-scatter), its intra-node steps 1.8x slower across nodes.
NCCL_BASE = {("ring", "LL"): 3.6, ("ring", "Simple"): 8.4, ("tree", "LL"): 4.4, ("tree", "Simple"): 0.0}
NCCL_HOP = {"nvlink": {("ring", "LL"): 0.47, ("ring", "Simple"): 3.4, ("tree", "LL"): 0.52, ("tree", "Simple"): 28.0},
            "net": {("ring", "LL"): 2.7, ("ring", "Simple"): 9.6, ("tree", "LL"): 5.0, ("tree", "Simple"): 50.0}}


def volume(kind: str, size: int, p: int) -> float:
    """Bytes each rank sends in a ring collective of ``p`` ranks, logged at ``size`` (comms.py)."""
    if kind == "all_reduce":
        return 2 * (p - 1) / p * size
    return (p - 1) / p * (size * p if kind == "all_gather_into_tensor" else size)


@dataclass(frozen=True)
class Links:
    """GPU nodes and their links, costed as NCCL costs them. Bandwidths are nominal, one direction;
    ``efficiency`` is the part of them a large collective reaches (NCCL's bus bandwidth over the nominal)."""
    ranks_per_node: int = 8
    intra_gbs: float = 450.0  # GB/s per GPU: NVLink 4 (H100 SXM), 900 GB/s both ways
    nics: int = 8
    nic_gbits: float = 400.0  # Gb/s per NIC: NDR InfiniBand
    efficiency: float = 0.8

    def span(self, ranks: int, group: str) -> tuple[int, int]:
        """(ranks, nodes) a collective of ``group`` spans in a run of ``ranks``."""
        per_node = min(ranks, self.ranks_per_node)
        return (per_node, 1) if group == "node" else (ranks, math.ceil(ranks / self.ranks_per_node))

    def bus_bandwidth(self, nodes: int) -> float:
        """Bytes/s: NVLink inside a node; across nodes a ring runs a channel per NIC, so the node's NICs
        together, no more than NVLink."""
        intra = self.intra_gbs * 1e9 * self.efficiency
        return intra if nodes == 1 else min(intra, self.nics * self.nic_gbits / 8 * 1e9 * self.efficiency)

    def seconds(self, kind: str, size: int, ranks: int, group: str = "world") -> float:
        """One collective logged at ``size`` bytes (comms.py): NCCL's fastest algorithm and protocol for it."""
        p, nodes = self.span(ranks, group)
        if p == 1:
            return 0.0
        bw, best = self.bus_bandwidth(nodes), math.inf
        steps = 2 * (p - 1) if kind == "all_reduce" else p - 1
        inter_steps = (2 if kind == "all_reduce" else 1) * (nodes - 1)
        for proto in ("LL", "Simple"):
            intra = NCCL_HOP["nvlink"][("ring", proto)] * (1.8 if nodes > 1 and proto == "LL" else 1)
            latency = (NCCL_BASE[("ring", proto)] + (steps - inter_steps) * intra
                       + inter_steps * NCCL_HOP["net"][("ring", proto)])
            share = 1.0 if proto == "Simple" else (1 / 4 if nodes > 1 or kind == "all_reduce" else 1 / 3)
            best = min(best, 1e-6 * latency + volume(kind, size, p) / (bw * share))
            if kind == "all_reduce" and nodes > 1:  # the tree: chains inside nodes, a binary tree across them
                latency = NCCL_BASE[("tree", proto)] + 2 * ((p // nodes - 1) * NCCL_HOP["nvlink"][("tree", proto)]
                                                            + math.log2(nodes) * NCCL_HOP["net"][("tree", proto)])
                share = 0.9 * (1.0 if proto == "Simple" else 1 / 3.8)
                best = min(best, 1e-6 * latency + 2 * size / (bw * share))
        return best


@dataclass(frozen=True)
class MeasuredLink:
    """One machine's ranks over a measured transport (gloo over loopback: tools/bench/scaling.py measures
    its all-reduce): ``bus_bandwidth`` bytes/s and ``latency`` seconds a call, for every collective."""
    bus_bandwidth: float
    latency: float
    ranks_per_node: int = 1 << 30

    def seconds(self, kind: str, size: int, ranks: int, group: str = "world") -> float:
        return 0.0 if ranks == 1 else self.latency + volume(kind, size, ranks) / self.bus_bandwidth


@dataclass(frozen=True)
class StepTime:
    compute: float  # seconds of the step's FLOPs
    comm: float  # seconds of its collectives, one after another
    exposed: float  # of which not hidden behind compute

    @property
    def total(self) -> float:
        return self.compute + self.exposed


def step_time(calls: list[comms.Calls], links: Links | MeasuredLink, ranks: int, compute_per_micro: float,
              accumulation: int, ds: dict) -> StepTime:
    """A step of ``accumulation`` micro-batches of ``compute_per_micro`` seconds each, with ``calls``."""
    z = ds.get("zero_optimization", {})
    stage = int(z.get("stage", 0))
    overlap = {"forward": stage == 3, "backward": bool(z.get("overlap_comm", stage == 3)), "step": False}
    window = {"forward": accumulation * compute_per_micro / 3, "backward": accumulation * 2 * compute_per_micro / 3}
    phases: dict[str, list[float]] = {}
    for c in calls:
        phases.setdefault(c.phase, []).extend(links.seconds(c.kind, s, ranks, c.group) for s in c.sizes)
    exposed = 0.0
    for phase, times in phases.items():
        if not overlap[phase]:
            exposed += sum(times)
            continue
        # a micro-batch's first gather waits before forward, its last bucket after backward
        edge = (times[0] if phase == "forward" else times[-1]) * accumulation
        exposed += max(sum(times) - window[phase], min(edge, sum(times)))
    return StepTime(accumulation * compute_per_micro, sum(sum(t) for t in phases.values()), exposed)


@dataclass(frozen=True)
class Setting:
    """A run's data-parallel settings: the ZeRO stage (its DeepSpeed config), micro-batch and accumulation."""
    zero: int
    micro: int
    accumulation: int
    ds: dict = dataclasses.field(compare=False)

    def label(self) -> str:
        return f"ZeRO-{self.zero}, {self.micro} x {self.accumulation}"


def shipped_ds(zero: int, precision: str) -> dict:
    """The shipped DeepSpeed config of a ZeRO stage (ZeRO-1: the ZeRO-2 file at stage 1)."""
    ds = json.loads(find_config_file(default_ds(max(zero, 2), precision)).read_text())
    ds.setdefault("zero_optimization", {})["stage"] = zero
    return ds


@dataclass(frozen=True)
class Model:
    """What the prediction needs of the run: its memory plan (the config, UNet, precision, checkpointing),
    its layout and FLOPs per sample, and the compute rate (peak FLOP/s per GPU x the efficiency reached)."""
    run: RunPlan
    layout: comms.Layout
    flops_per_sample: float
    flops_per_s: float

    def predict(self, setting: Setting, ranks: int, links: Links | MeasuredLink) -> StepTime:
        calls = comms.per_step(self.layout, setting.ds, self.run.precision, ranks, setting.accumulation,
                               links.ranks_per_node)
        return step_time(calls, links, ranks, setting.micro * self.flops_per_sample / self.flops_per_s,
                         setting.accumulation, setting.ds)

    def fits(self, setting: Setting, ranks: int, budget: float) -> bool:
        run = self.run.changed(zero=setting.zero, micro_batch=setting.micro, gpus=ranks, ds=setting.ds)
        return run.peak() <= budget

    def fastest(self, global_batch: int, ranks: int, links: Links, budget: float, stages=(1, 2, 3),
                max_micro: int = 64) -> tuple[Setting, StepTime] | None:
        """The fastest setting of ``global_batch`` samples a step on ``ranks`` that fits in ``budget`` bytes
        per GPU, over the ZeRO stages (their shipped configs) and micro-batch x accumulation splits."""
        if global_batch % ranks:
            return None
        best = None
        per_rank = global_batch // ranks
        for zero in stages:
            ds = shipped_ds(zero, self.run.precision)
            for micro in (m for m in range(min(per_rank, max_micro), 0, -1) if per_rank % m == 0):
                setting = Setting(zero, micro, per_rank // micro, ds)
                if not self.fits(setting, ranks, budget):
                    continue
                t = self.predict(setting, ranks, links)
                if best is None or t.total < best[1].total:
                    best = (setting, t)
                break  # a smaller micro-batch of the same stage is never faster here
        return best
