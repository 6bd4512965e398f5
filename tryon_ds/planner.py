"""The memory a training run needs per GPU (or CPU rank), before the GPUs are rented: model states, EMA,
activations, the optimizer step's temporaries and DeepSpeed's buffers, whether it fits, and what to change if
not. ``tools/plan_memory.py`` is its command line.

Model states follow DeepSpeed's layout for the ZeRO stage and precision (what tools/bench/train.py measures
on real engines); activations are what autograd keeps for backward, traced on the ``meta`` device for that
preset, micro-batch and image size (the crop size, for a UNet trained on crops; no memory is used); the buffers
are read from the DeepSpeed config the run would use; the optimizer step's temporaries from its optimizer
settings; what rank 0 builds between steps: the preview model (``sample_freq: 0`` turns previews off) and, on a
CPU rank, the whole EMA it gathers to write a checkpoint (host memory). Not counted: the CUDA context and
allocator fragmentation (on a CPU rank, the libraries and the interpreter), and a preview's sampling
activations (no more pixels per forward than a training micro-batch, and no graph kept).
"""
from __future__ import annotations

import dataclasses
import json

import torch

from .cascade import CascadeUNet
from .config import Config, find_config_file, preset, with_overrides
from .model import DTYPES, parameter_count
from .model.blocks import ResBlock
from .model.parallel_unet import WarpBlock

BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}
GIB = 2 ** 30
STEP = "optimizer step (transient)"
PREVIEW = "rank 0: preview / EMA to save"


def model_states(n: int, zero: int, precision: str, gpus: int, ds: dict, ema: bool = True) -> dict[str, float]:
    """Bytes per GPU of parameters, gradients, the fp32 master copy, Adam's two moments and the EMA (which
    averages the master copy and is partitioned like it; none with ``use_ema: false``)."""
    p = BYTES[precision]
    accum = BYTES.get(ds.get("data_types", {}).get("grad_accum_dtype"), p)
    shard = gpus if zero >= 1 else 1
    out = {"parameters": p * n / (gpus if zero == 3 else 1),
           "gradients": accum * n / (gpus if zero >= 2 else 1),
           # ZeRO-1/2/3 keep an fp32 master partition even in fp32 training; ZeRO-0 needs one only in fp16/bf16.
           "fp32 master": 4 * n / shard if (zero >= 1 or precision != "fp32") else 0.0,
           "optimizer (Adam moments)": 8 * n / shard,
           "EMA (fp32, like the master)": 4 * n / shard if ema else 0.0}
    if offloaded(ds):  # the master copy and the moments live in host memory (host_states); the EMA stays on the GPU
        out["fp32 master"] = out["optimizer (Adam moments)"] = 0.0
    return out


def offloaded(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"


def unfused_torch_adamw(ds: dict) -> bool:
    """Whether the step runs torch's single-tensor AdamW (``torch_adam`` without ``fused``: the CPU configs)."""
    adam = ds.get("optimizer", {}).get("params", {})
    return bool(adam.get("torch_adam")) and not adam.get("fused")


def host_states(n: int, zero: int, gpus: int, ds: dict) -> dict[str, float]:
    """Bytes per rank in host memory with the optimizer offloaded to the CPU (none without): the fp32 master
    partition, Adam's moments, the fp32 gradient partition the host's optimizer reads (stage 3 keeps one per
    sub-group beside the GPU's gradient buffer; stage 1/2 copy each reduced bucket into theirs), and the step's
    temporaries where torch's single-tensor AdamW runs there (``torch_adam`` without ``fused``; DeepSpeed's
    CPU Adam updates in place)."""
    if not offloaded(ds):
        return {}
    shard = gpus if zero >= 1 else 1
    return {"fp32 master (host)": 4 * n / shard, "optimizer (Adam moments, host)": 8 * n / shard,
            "fp32 gradients (host)": 4 * n / shard, STEP + " (host)": 8 * n / shard if unfused_torch_adamw(ds) else 0.0}


def step_transient(n: int, zero: int, gpus: int, ds: dict) -> float:
    """Bytes the optimizer step allocates while it runs, over the model states: ZeRO's fp32 copy of this
    rank's gradient partition (stage 3's ``_prepare_fp32_grad_for_sub_group``, stage 1/2's flattened
    partition) and the Adam update's temporaries: none in a fused kernel (``fused: true`` in the shipped GPU
    configs; DeepSpeed's own FusedAdam and CPU Adam), two in torch's single-tensor AdamW (``torch_adam``
    without ``fused``, as the CPU configs run it: ``exp_avg_sq.sqrt() / bias_correction``), as real ZeRO-2 and
    ZeRO-3 engines hold them (BENCHMARKS.md). Stage 3 steps its partition one sub-group (``sub_group_size``
    elements, 1e9 by default) at a time and frees each one's copies before the next. None on the GPU with the
    optimizer offloaded to the CPU."""
    if offloaded(ds):
        return 0.0
    copies = (1 if zero >= 1 else 0) + (2 if unfused_torch_adamw(ds) else 0)
    elements = n / (gpus if zero >= 1 else 1)
    if zero == 3:
        elements = min(elements, float(ds.get("zero_optimization", {}).get("sub_group_size", 1e9)))
    return 4.0 * elements * copies


def peak(rows: dict[str, float], cpu: bool = False) -> float:
    """The most a rank holds at once. The activations (forward and backward), the optimizer step's
    temporaries and what rank 0 builds between steps (``PREVIEW``) are never held together: on a GPU the
    largest of the three counts (PyTorch's allocator hands its cached blocks back to CUDA when a large tensor
    does not fit). On a CPU rank the activations count with either of the others: the C heap keeps their small
    blocks after backward (glibc returns only the top of a heap to the system), and what comes later lands
    beside them (measured at real size, BENCHMARKS.md)."""
    apart = {"activations", STEP, PREVIEW}
    held = sum(v for k, v in rows.items() if k not in apart)
    activations, later = rows.get("activations", 0.0), max(rows.get(STEP, 0.0), rows.get(PREVIEW, 0.0))
    return held + (activations + later if cpu else max(activations, later))


def buffers(ds: dict, precision: str) -> float:
    """DeepSpeed's gradient-reduction and parameter-gathering buckets, from the DeepSpeed config."""
    z = ds.get("zero_optimization", {})
    zero = z.get("stage", 0)
    if zero == 0:
        return 0.0
    comm = BYTES.get(ds.get("communication_data_type"), BYTES[precision])
    reduce = z.get("reduce_bucket_size", 5e8) * comm * (2 if z.get("overlap_comm", zero == 3) else 1)
    if zero == 3:
        return reduce + z.get("stage3_prefetch_bucket_size", 5e7) * BYTES[precision]
    return reduce + z.get("allgather_bucket_size", 5e8) * BYTES[precision]


def activations(config: Config, unet_number: int, micro_batch: int, precision: str, checkpointing: bool) -> float:
    """Bytes autograd keeps for backward in one micro-batch's forward, traced on the meta device. With
    activation checkpointing a block keeps only its input, and one block's activations exist again at a time
    while it is recomputed."""
    from .cascade import random_batch

    cfg = dataclasses.replace(config, unets=tuple(dataclasses.replace(u, checkpointing=False) for u in config.unets))
    with torch.device("meta"):
        model = CascadeUNet(cfg, unet_number).to(DTYPES[precision])
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    batch = {k: v.to("meta") for k, v in random_batch(cfg, unet_number, micro_batch).items()}
    outside, inside, inputs, current = {}, {}, {}, [None]

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            (inside.setdefault(current[0], {}) if current[0] is not None else outside)[storage._cdata] = storage.nbytes()
        return t

    def enter(module, args):
        if current[0] is None:  # checkpointing wraps the outermost block only
            current[0] = id(module)
            inputs[id(module)] = sum(a.untyped_storage().nbytes() for a in args if torch.is_tensor(a))

    def leave(module, args, out):
        if current[0] == id(module):
            current[0] = None

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules() if isinstance(m, (ResBlock, WarpBlock))]
    hooks += [m.register_forward_hook(leave) for m in model.modules() if isinstance(m, (ResBlock, WarpBlock))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch)
    for h in hooks:
        h.remove()
    blocks = [sum(saved.values()) for saved in inside.values()]
    if checkpointing:
        return sum(outside.values()) + sum(inputs.values()) + max(blocks, default=0)
    return sum(outside.values()) + sum(blocks)


def plan(config: Config, unet_number: int, micro_batch: int, zero: int, precision: str, gpus: int,
         checkpointing: bool, ds: dict, activation_bytes: float | None = None, cpu: bool = False) -> dict[str, float]:
    """Bytes per GPU by what holds them; ``activation_bytes`` when already traced. ``cpu``: the ranks are CPU
    processes, whose device is the host: what an offload moves to the host stays in their rows."""
    with torch.device("meta"):
        n = parameter_count(CascadeUNet(config, unet_number))
    rows = model_states(n, zero, precision, gpus, ds, config.use_ema)
    rows["activations"] = (activations(config, unet_number, micro_batch, precision, checkpointing)
                           if activation_bytes is None else activation_bytes)
    rows[STEP] = step_transient(n, zero, gpus, ds)
    # Between steps rank 0 builds a whole copy of the UNet in the run's precision for each preview (every rank
    # for a quality pass), and gathers the whole EMA (fp32, in host memory: a GPU's own only on a CPU rank) to
    # write a checkpoint; one at a time.
    rows[PREVIEW] = max(BYTES[precision] * n if config.sample_freq or config.quality_freq else 0.0,
                        4.0 * n if cpu and config.use_ema else 0.0)
    rows["DeepSpeed buffers"] = buffers(ds, precision)
    if cpu:
        host = host_states(n, zero, gpus, ds)
        rows[STEP] += host.pop(STEP + " (host)", 0.0)
        rows.update(host)
    return rows


def plan_host(config: Config, unet_number: int, zero: int, gpus: int, ds: dict) -> dict[str, float]:
    """Bytes per rank in host memory (``host_states``) for UNet ``unet_number``."""
    with torch.device("meta"):
        return host_states(parameter_count(CascadeUNet(config, unet_number)), zero, gpus, ds)


def preset_config(config: Config, name: str, number: int, image_size: list[int] | None = None,
                  overrides: list[str] = ()) -> tuple[Config, int]:
    """``config`` with preset ``name`` as UNet ``number``, at ``image_size`` (H [W]) or the size the preset is
    for at that place (128 px for UNet 1, 256 for UNet 2, 1024 for UNet 3), then ``overrides`` (``--set``
    texts: ``unets.0.attn_patch=2`` changes the preset's UNet 1)."""
    size = image_size or [{1: 128, 2: 256}.get(number, 1024)]
    config = config.with_unet(number, preset(name), (size[0], size[-1]))
    return (with_overrides(config, overrides) if overrides else config), number


def default_ds(zero: int, precision: str) -> str:
    if zero in (2, 3) and precision != "fp32":
        return f"ds_configs/zero{zero}_{precision}.json"
    return f"ds_configs/cpu_zero{zero}.json"


def table(rows: dict[str, float], cpu: bool) -> str:
    lines = [f"  {name:<34}{value / GIB:9.2f} GiB" for name, value in rows.items()]
    why = ("on a CPU rank the activations' heap stays through the step or the preview" if cpu else
           "the largest of activations, the step's temporaries and the preview: never held at once")
    return "\n".join(lines + [f"  {'total (peak)':<34}{peak(rows, cpu) / GIB:9.2f} GiB   ({why})"])


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """One run's settings, planned: ``rows()`` per GPU (or CPU rank), ``alternatives()`` if it does not fit."""
    config: Config
    number: int
    micro_batch: int
    zero: int
    precision: str
    gpus: int
    checkpointing: bool
    ds: dict
    cpu: bool = False
    # activations per sample by checkpointing choice: they grow with the micro-batch in proportion, so each
    # choice is traced once, whatever the alternatives change
    traced: dict = dataclasses.field(default_factory=dict, compare=False)

    def changed(self, **change) -> "RunPlan":
        return dataclasses.replace(self, **change, traced=self.traced)

    def rows(self) -> dict[str, float]:
        if self.checkpointing not in self.traced:
            self.traced[self.checkpointing] = activations(self.config, self.number, self.micro_batch, self.precision,
                                                          self.checkpointing) / self.micro_batch
        return plan(self.config, self.number, self.micro_batch, self.zero, self.precision, self.gpus,
                    self.checkpointing, self.ds, self.traced[self.checkpointing] * self.micro_batch, cpu=self.cpu)

    def peak(self) -> float:
        return peak(self.rows(), self.cpu)

    def host_rows(self) -> dict[str, float]:
        """Host memory per rank of an offloaded optimizer (none on CPU ranks, whose host memory is theirs)."""
        return {} if self.cpu else plan_host(self.config, self.number, self.zero, self.gpus, self.ds)

    def alternatives(self, budget: float) -> list[tuple[str, "RunPlan"]]:
        """What a run that does not fit in ``budget`` bytes could change, each as the run so changed."""
        rows, ds, total = self.rows(), self.ds, self.peak()
        options = []
        if not self.checkpointing:
            options.append(("activation checkpointing (the UNet's checkpointing: true)", self.changed(checkpointing=True)))
        if self.zero < 3:
            zero3 = json.loads(find_config_file(default_ds(3, self.precision)).read_text())["zero_optimization"]
            options.append(("ZeRO-3 (ds_configs/zero3_*.json)",
                            self.changed(zero=3, ds={**ds, "zero_optimization": {**zero3}})))
        adam = ds.get("optimizer", {}).get("params", {})
        if unfused_torch_adamw(ds):
            fused = {**ds, "optimizer": {**ds["optimizer"], "params": {**adam, "fused": True}}}
            options.append(("torch's fused AdamW (\"fused\": true in the optimizer's params)", self.changed(ds=fused)))
        if self.zero == 3 and rows[STEP] > step_transient(1e8, 3, 1, ds):
            smaller = {**ds, "zero_optimization": {**ds["zero_optimization"], "sub_group_size": int(1e8)}}
            options.append(("ZeRO-3 steps in smaller sub-groups (\"sub_group_size\": 1e8)", self.changed(ds=smaller)))
        if rows[PREVIEW] and peak({**rows, PREVIEW: 0.0}, self.cpu) < total:
            options.append(("no previews or quality passes (sample_freq: 0, quality_freq: 0; no second model)",
                            self.changed(config=dataclasses.replace(self.config, sample_freq=0, quality_freq=0))))
        # DeepSpeed's CPU Adam (not torch's AdamW) runs an offloaded step, in place
        offload = self.changed(ds={**ds, "zero_optimization": {**ds["zero_optimization"],
                                                               "offload_optimizer": {"device": "cpu"}},
                                   "optimizer": {**ds.get("optimizer", {}),
                                                 "params": {k: v for k, v in adam.items() if k != "torch_adam"}}})
        where = "" if self.cpu else f", + {sum(offload.host_rows().values()) / GIB:.1f} GiB of host memory per rank"
        options.append((f"optimizer offload to CPU (ds_configs/zero3_bf16_offload.json{where})", offload))
        for mb in range(self.micro_batch - 1, 0, -1):
            if self.changed(micro_batch=mb).peak() <= budget:
                options.append((f"micro-batch {mb} (more gradient_accumulation_steps keep the global batch)",
                                self.changed(micro_batch=mb)))
                break
        return options
