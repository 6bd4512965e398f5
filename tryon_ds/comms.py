"""The bytes a data-parallel DeepSpeed run moves per optimizer step and rank, collective by collective, from
the model's own parameters and the DeepSpeed config: what decides how a run scales across GPUs and nodes.

Each collective is counted as DeepSpeed's comms logger (``"comms_logger": {"enabled": true}``) records it,
so the two can be held side by side (tests/test_comms.py does, on real 2- and 4-rank engines): an
all-reduce by the tensor reduced, a reduce-scatter by its whole input, an all-gather by the piece each rank
contributes. What DeepSpeed 0.19 does per step, read from its source:

- ZeRO-0 and ZeRO-1: the gradients all-reduced once per step, at the accumulation boundary, in buckets (5e8
  elements, ZeRO-0; ``reduce_bucket_size``, ZeRO-1, filled parameter by parameter); ZeRO-1 then all-gathers
  the updated parameters, each rank its partition of the flat buffer (padded to ``2 x ranks`` elements).
- ZeRO-2: the same, except that the gradients are reduced after *every* micro-batch's backward (each rank
  keeps only its partition of them), in buckets filled in the order autograd finishes the gradients.
- ZeRO-3: every micro-batch all-gathers the parameters for forward (each rank's piece of each parameter,
  padded to the ranks) and reduce-scatters the gradients in buckets; a parameter released between two uses
  is gathered again, as DeepSpeed's parameter coordinator decides over the module trace
  (``zero3_gathers``); parameters of at most ``stage3_param_persistence_threshold`` elements stay whole on
  every rank and are all-gathered once, after the optimizer step, one call each. With hpZ
  (``zero_hpz_partition_size``) a parameter gathered once in a step is gathered again from its secondary
  partition, inside the node.
- A scalar or two: the gradient norm (4 bytes; 8 under ZeRO-3) and, for ZeRO-1/2 in bf16 (and fp16), a
  1-byte overflow flag.

Checked to the byte and the call on real engines for ZeRO-0, 1, 2 and 3 (fp32, and the shipped bf16
configs), except ZeRO-3's second gathers where the trace is long against the prefetch and reuse windows: there
the planner's backward module order (from autograd's hooks on the meta device) can differ from the one
DeepSpeed records by a parameter (0.9% of the gathered bytes in the tests' settings). ZeRO++'s quantized
weights (qwZ, int8) and gradients (qgZ, int4 in two all-to-all hops) need DeepSpeed's CUDA kernels and are
counted from their formats only, scales left out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UserError
from .model import DTYPES

BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}
NAMES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16",
         "bfloat16": "bf16"}
# DeepSpeed's defaults (deepspeed/runtime/zero/config.py, 0.19)
REDUCE_BUCKET = 5e8
PREFETCH_BUCKET = 5e7
PERSISTENCE = 1e5
REUSE = 1e9


@dataclass(frozen=True)
class Layout:
    """What the communication depends on in the model: each parameter's elements in registration order (the
    flat buffers' order); the modules forward calls, in order, each as its own parameters (by index; none for
    a module without); and the order in which backward finishes the gradients (the order reduction buckets
    fill)."""
    numels: tuple[int, ...]
    forward: tuple[tuple[int, ...], ...]
    ready: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.numels)


def layout(config, unet_number: int) -> Layout:
    """UNet ``unet_number``'s Layout, from one forward and backward of its training loss on the meta device."""
    from .cascade import CascadeUNet, random_batch

    with torch.device("meta"):
        model = CascadeUNet(config, unet_number)
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    forward, ready = [], []

    def used(module, args):  # a module without parameters still takes a step of DeepSpeed's trace
        forward.append(tuple(index[id(p)] for p in module.parameters(recurse=False)))

    hooks = [m.register_forward_pre_hook(used) for m in model.modules()]
    hooks += [p.register_post_accumulate_grad_hook(lambda p: ready.append(index[id(p)])) for p in params]
    batch = {k: v.to("meta") for k, v in random_batch(config, unet_number, 1).items()}
    model(batch).backward()
    for h in hooks:
        h.remove()
    return Layout(tuple(p.numel() for p in params), tuple(forward), tuple(ready))


@dataclass(frozen=True)
class Calls:
    """Calls of one collective in a step: ``kind`` as DeepSpeed's comms logger names it, ``what`` it moves,
    each call's logged bytes, ``phase``: when it runs ("forward", "backward": while those compute, if the
    config overlaps it; "step": after backward, exposed), ``group``: "world", or "node" (only the ranks of
    one node: hpZ's secondary partition, qgZ's first hop)."""
    kind: str
    what: str
    sizes: tuple[int, ...]
    phase: str
    group: str = "world"

    @property
    def bytes(self) -> int:
        return sum(self.sizes)


def comm_bytes(ds: dict, precision: str) -> int:
    """Bytes per gradient element reduced: ``communication_data_type``, else the training precision's."""
    name = ds.get("communication_data_type")
    if name is None:
        return BYTES[precision]
    if str(name).lower() not in NAMES:
        raise UserError(f"the DeepSpeed config's communication_data_type {name!r}: expected fp32, fp16 or bf16")
    return BYTES[NAMES[str(name).lower()]]


def buckets(numels, limit: float, flush_after: bool = False) -> list[int]:
    """Elements per bucket as DeepSpeed fills them: a bucket is sent before a tensor that would take it past
    ``limit`` (ZeRO's reduction), or once it has passed ``limit`` (``flush_after``: ZeRO-0's all-reduce)."""
    out, current = [], 0
    for n in numels:
        if not flush_after and current and current + n > limit:
            out.append(current)
            current = 0
        current += n
        if flush_after and current > limit:
            out.append(current)
            current = 0
    return out + ([current] if current else [])


def piece(numel: int, ranks: int) -> int:
    return math.ceil(numel / ranks)


def zero3_gathers(lay: Layout, persistent: set[int], reuse: float, prefetch: float, live: float
                  ) -> list[tuple[str, list[int], bool]]:
    """The parameters ZeRO-3 all-gathers in one forward and backward, call by call: (the phase it runs in,
    the parameters, whether its first parameter was gathered before: hpZ gathers that one inside the node).
    DeepSpeed's parameter coordinator (deepspeed/runtime/zero/partitioned_param_coordinator.py, 0.19) run
    over the module trace: each module fetches its own parameters that are not whole, then prefetches those
    of the next modules in the trace up to ``prefetch`` elements; after it runs it releases them, except
    those the prefetcher has already passed a later use of, and those used again within ``reuse`` elements
    of the modules to come. The trace is every module forward calls, each a step (one without parameters too:
    DeepSpeed counts its steps so), then the same in reverse for backward. DeepSpeed records its own on the
    first step; autograd's order can differ where branches meet (backward hooks on the meta device gave the
    same figures as the reverse, at twice the cost).
    """
    from bisect import bisect_left, bisect_right
    from collections import defaultdict, deque
    from itertools import accumulate

    trace = list(lay.forward) + list(reversed(lay.forward))
    queue = deque((p, step) for step, own in enumerate(trace) for p in sorted(set(own)))
    uses = defaultdict(list)  # each parameter's steps, ascending
    for step, own in enumerate(trace):
        for p in set(own):
            uses[p].append(step)
    before = [0, *accumulate(sum(lay.numels[p] for p in own) for own in trace)]  # elements of trace[:i]
    whole, fetched_for, live_now = set(persistent), defaultdict(lambda: -10**10), 0
    calls, gathered_once = [], set()
    for step, own in enumerate(trace):
        phase = "forward" if step < len(lay.forward) else "backward"
        need = sorted(p for p in set(own) if p not in whole)
        if need:
            calls.append((phase, need, need[0] in gathered_once))
            whole.update(need)
            live_now += sum(lay.numels[p] for p in need)
        pending = {p for p in own if fetched_for[p] < step}
        seen = set()
        while queue and len(seen) < len(pending):
            p, used_at = queue.popleft()
            fetched_for[p] = used_at
            seen.add(p)
        ahead, numel = [], 0
        while queue and numel < min(live - live_now, prefetch):
            p, used_at = queue.popleft()
            fetched_for[p] = max(fetched_for[p], used_at)
            if p not in whole and p not in ahead:
                ahead.append(p)
                numel += lay.numels[p]
        if ahead:
            calls.append((phase, ahead, ahead[0] in gathered_once))
            whole.update(ahead)
            live_now += numel
        gathered_once.update(need, ahead)
        # the modules DeepSpeed looks at: from the next one on, while fewer than `reuse` elements are passed
        last = bisect_left(before, before[step + 1] + reuse, lo=step + 1) - 1
        release = set()
        for p in set(own):
            later = uses[p][bisect_right(uses[p], step):][:1]
            if p not in persistent and fetched_for[p] <= step + 1 and not (later and later[0] <= last):
                release.add(p)
        whole.difference_update(release)
        live_now -= sum(lay.numels[p] for p in release)
    return calls


def per_step(lay: Layout, ds: dict, precision: str, ranks: int, accumulation: int = 1,
             ranks_per_node: int | None = None) -> list[Calls]:
    """The collectives one optimizer step runs on each rank of a data-parallel run of ``ranks``
    (``accumulation`` micro-batches a step, ``precision`` the training's: fp32, bf16 or fp16)."""
    z = ds.get("zero_optimization", {})
    stage = int(z.get("stage", 0))
    grad, param = comm_bytes(ds, precision), BYTES[precision]
    if ranks == 1:
        return []
    scalar = [Calls("all_reduce", "gradient norm", (8 if stage == 3 else 4,), "step")]
    if stage in (1, 2) and precision != "fp32":
        scalar.append(Calls("all_reduce", "overflow flag", (1,), "step"))
    if stage in (0, 1, 2):
        if stage == 0:  # the engine's own all-reduce, over the parameters in order, 5e8 elements a bucket
            reduced = buckets(lay.numels, REDUCE_BUCKET, flush_after=True)
        else:  # ZeRO-1 reduces at the boundary, parameter by parameter; ZeRO-2 as backward finishes each
            order = lay.ready if stage == 2 else range(len(lay.numels))
            reduced = buckets([lay.numels[i] for i in order], float(z.get("reduce_bucket_size", REDUCE_BUCKET)))
        # ZeRO-2 reduces inside backward's hooks; ZeRO-0 and ZeRO-1 once backward is done
        times = accumulation if stage == 2 else 1
        calls = [Calls("all_reduce", "gradients", tuple(n * grad for n in reduced) * times,
                       "backward" if stage == 2 else "step")]
        if stage >= 1:
            flat = lay.total + (-lay.total) % (2 * ranks)
            calls.append(Calls("all_gather_into_tensor", "parameters", (flat // ranks * param,), "step"))
        return calls + scalar

    threshold = float(z.get("stage3_param_persistence_threshold", PERSISTENCE))
    budget, persistent, kept = float(z.get("stage3_model_persistence_threshold", 2**63 - 1)) // ranks, set(), 0
    for i, n in enumerate(lay.numels):  # in registration order, as zero.Init marks them
        if n <= threshold and kept + n <= budget:
            persistent.add(i)
            kept += n
    # qwZ gathers int8 weights (their scales, one fp32 per 8000 elements or fewer, are left out)
    width = 1 if z.get("zero_quantized_weights") else param
    hpz = int(z.get("zero_hpz_partition_size", 1))

    def gathered(indices, node: bool) -> int:
        if node:  # hpZ: a piece of the secondary partition, the parameter padded to the ranks split in hpz
            return sum(piece(lay.numels[i], ranks) * ranks // hpz for i in indices) * width
        return sum(piece(lay.numels[i], ranks) for i in indices) * width

    gathers = zero3_gathers(lay, persistent, float(z.get("stage3_max_reuse_distance", REUSE)),
                            float(z.get("stage3_prefetch_bucket_size", PREFETCH_BUCKET)),
                            float(z.get("stage3_max_live_parameters", 1e9)))
    calls = []
    for micro in range(accumulation):
        # hpZ: a parameter released once has its secondary partition until the optimizer step
        for phase, params, again in gathers:
            node = hpz > 1 and (again or micro > 0)
            what = "parameters again" if again else "parameters"
            calls.append(Calls("all_gather_into_tensor", what, (gathered(params, node),), phase,
                               "node" if node else "world"))
    padded = [piece(lay.numels[i], ranks) * ranks for i in lay.ready]
    reduced = buckets(padded, float(z.get("reduce_bucket_size", REDUCE_BUCKET)))
    if z.get("zero_quantized_gradients"):
        # qgZ: int4 gradients (scales left out), an all-to-all inside the node, then one across nodes
        hop = sum(n // 2 for n in reduced)
        calls += [Calls("all_to_all_single", "gradients (int4)", (hop,) * accumulation, "backward", "node"),
                  Calls("all_to_all_single", "gradients (int4)", (hop // (ranks_per_node or ranks),) * accumulation,
                        "backward")]
    else:
        calls.append(Calls("reduce_scatter_tensor", "gradients", tuple(n * grad for n in reduced) * accumulation,
                           "backward"))
    if persistent:
        # one call per parameter (the whole-parameter path of partition_parameters.py's all_gather)
        calls.append(Calls("all_gather_into_tensor", "persistent parameters",
                           tuple(gathered([i], False) for i in sorted(persistent)), "step"))
    return merged(calls + scalar)


def merged(calls: list[Calls]) -> list[Calls]:
    """Calls of the same collective, purpose, phase and group as one entry, in order of first appearance."""
    out: dict[tuple, list[int]] = {}
    for c in calls:
        out.setdefault((c.kind, c.what, c.phase, c.group), []).extend(c.sizes)
    return [Calls(kind, what, tuple(sizes), phase, group) for (kind, what, phase, group), sizes in out.items()]


def totals(calls: list[Calls]) -> dict[str, tuple[int, int]]:
    """{collective kind: (logged bytes, calls)} over a step, as the comms logger sums them."""
    out: dict[str, tuple[int, int]] = {}
    for c in calls:
        b, n = out.get(c.kind, (0, 0))
        out[c.kind] = (b + c.bytes, n + len(c.sizes))
    return out
