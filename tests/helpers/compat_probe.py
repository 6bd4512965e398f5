"""Run under the deepspeed launcher on 2 CPU ranks: every function of tryon_ds/compat.py (the package's
only reach into DeepSpeed's and torch's internals) on real engines of each ZeRO stage and optimizer wrapper
the CPU runs, each checked against what it must mean. Rank 0 writes {touchpoint: "ok" or what went wrong}."""
import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tryon_ds.cascade import CascadeUNet, random_batch  # noqa: E402
from tryon_ds.config import build_config, deep_merge, read_config_file  # noqa: E402
from tryon_ds import compat  # noqa: E402
from tryon_ds.training import distributed, engine as ds_engine  # noqa: E402
from tryon_ds.training.ds_config import build_ds_config  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--local_rank", type=int)
args = p.parse_args()
world = distributed.setup()
report: dict[str, str] = {}


def check(name: str, fn) -> None:
    """Run one touchpoint's check on every rank; the first failure on any rank is what the report says."""
    try:
        fn()
        mine = "ok"
    except Exception as err:  # noqa: BLE001 (the report names the touchpoint and how it failed)
        mine = f"{type(err).__name__}: {err}"[:300] + " | " + traceback.format_exc().splitlines()[-3].strip()
    every = [None] * world.size
    dist.all_gather_object(every, mine)
    report[name] = next((r for r in every if r != "ok"), "ok")


def tiny(mixed="no"):
    return build_config(deep_merge(read_config_file(ROOT / "configs" / "tiny.yaml"),
                                   {"batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0, "mixed_precision": mixed}))


def engine_for(ds_name, mixed="no"):
    config = tiny(mixed)
    _, engine, _, ema = ds_engine.build(config, build_ds_config(ROOT / "ds_configs" / f"{ds_name}.json", config,
                                                                world.size))
    batch = {k: v.to(world.device) for k, v in random_batch(config, 1, 2, torch.Generator().manual_seed(0)).items()}
    ds_engine.train_step(engine, ema, [batch], 0, seed_of=lambda micro: 0)
    return config, engine


plain = CascadeUNet(tiny(), 1)
shapes = {name: p.shape for name, p in plain.named_parameters()}
total = sum(p.numel() for p in plain.parameters())

for ds_name, mixed in (("cpu_zero0", "no"), ("cpu_zero0", "bf16"), ("cpu_zero2", "no"), ("cpu_zero3", "no")):
    case = f"{ds_name}/{mixed}"
    config, engine = engine_for(ds_name, mixed)
    params = dict(engine.module.named_parameters())
    zero = engine.zero_optimization_stage()

    def loss_scale():
        scale = compat.loss_scale(engine)
        wrapped = type(engine.optimizer).__name__ != "AdamW"
        assert (scale == 1.0) if wrapped else scale is None, (type(engine.optimizer).__name__, scale)

    def partitions():
        assert all(compat.is_partitioned(p) == (zero == 3) for p in params.values())
        assert sum(compat.full_numel(p) for p in params.values()) == total
        assert {n: compat.full_shape(p) for n, p in params.items()} == shapes
        if zero == 3:
            for p in params.values():
                local, fp32 = compat.local_partition(p), compat.local_fp32_partition(p)
                assert fp32.dtype == torch.float32 and fp32.numel() == local.numel()
                assert local.numel() * world.size >= p.ds_numel > local.numel() * (world.size - 1) - world.size

    def fragments():
        held = {n: compat.fragment(p) for n, p in params.items()}
        if zero != 2:
            assert all(h is None for h in held.values()), "a fragment outside ZeRO-1/2"
            return
        lengths = torch.tensor([0 if h[0] is None else h[0].numel() for h in held.values()], dtype=torch.float64)
        dist.all_reduce(lengths)
        assert lengths.tolist() == [float(p.numel()) for p in params.values()], "fragments do not tile the parameters"

    def masters():
        found = compat.zero0_masters(engine.optimizer)
        if zero == 0 and mixed != "no":
            assert set(found) == {id(p) for p in params.values()}
            assert all(m.dtype == torch.float32 and m.shape == p.shape for p in params.values() for m in [found[id(p)]])
        else:
            assert found == {}
        held = compat.optimizer_tensors(engine)
        assert held["moments"], "no Adam moments found"
        assert bool(held["master"]) == (zero > 0 or mixed != "no"), [t.shape for t in held["master"]]

    def checkpoint_files():
        folder = Path(args.out).parent / f"checkpoint_{ds_name}_{mixed}"  # the test's own folder, removed after it
        with compat.files_written(engine) as written:
            engine.save_checkpoint(str(folder), tag="t")
        # under ZeRO-0 only rank 0 writes (the module and the whole optimizer): the others write nothing
        assert (written or (zero == 0 and not world.is_main)) and all(f.is_file() for f in written), written
        assert "save" not in vars(engine.checkpoint_engine), "the checkpoint engine's own save was not restored"
        allowed = {f"{c.__module__}.{c.__qualname__}" for c in compat.checkpoint_classes()}
        for f in written:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
            assert unsafe <= allowed, (f.name, sorted(unsafe - allowed))
        with compat.mapped_tensor_loads(engine):
            loaded, _ = engine.load_checkpoint(str(folder), tag="t")
        assert loaded is not None and "load" not in vars(engine.checkpoint_engine)
        if zero in (2, 3):
            dist.barrier()
            raw = ds_engine.raw_state_dict(engine, world.is_main)
            if world.is_main:
                merged = compat.zero_checkpoint_weights(folder / "t")
                assert merged.keys() == raw.keys() and all(torch.equal(merged[k], raw[k]) for k in raw)

    for name, fn in (("loss_scale", loss_scale), ("partition attributes", partitions), ("fragment", fragments),
                     ("zero0_masters and optimizer_tensors", masters),
                     ("files_written, checkpoint_classes, mapped_tensor_loads, zero_checkpoint_weights",
                      checkpoint_files)):
        check(f"{case}: {name}", fn)


def exhausted():
    """DeepSpeed's fp16 dynamic loss scaler in a real ZeRO-2 engine, run down to its minimum."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    config, engine = engine_for("cpu_zero2")
    engine.optimizer.loss_scaler = DynamicLossScaler(init_scale=2, scale_window=1000, min_scale=1, delayed_shift=1,
                                                     consecutive_hysteresis=False, raise_error_at_min_scale=True,
                                                     dtype=torch.float32)
    batch = {k: v.to(world.device) for k, v in random_batch(config, 1, 2).items()}
    for _ in range(4):
        engine.backward(engine(batch) * float("nan"))
        try:
            engine.step()
        except Exception as err:  # noqa: BLE001
            assert compat.is_loss_scale_exhausted(err), f"not recognised: {err}"
            return
    raise AssertionError("the loss scale never ran out")


def leaf():
    from deepspeed.utils import z3_leaf_module

    module = CascadeUNet(tiny(), 1).unet
    compat.make_zero3_leaf(module)
    assert z3_leaf_module(module)


def no_shared_memory_allreduce():
    """DeepSpeed's process group (started by distributed.setup) neither built nor mapped its shm all-reduce."""
    from deepspeed.comm import comm

    assert comm.cdb.shm_comm_op is None, "the op was built"
    assert "deepspeed_allreduce_buffer" not in Path("/proc/self/maps").read_text(), "its buffer is mapped"


def store():
    s = compat.default_store()
    s.set(f"compat_probe_{world.rank}", "x")
    assert s.get(f"compat_probe_{1 - world.rank}") == b"x"


for name, fn in (("is_loss_scale_exhausted", exhausted), ("make_zero3_leaf", leaf),
                 ("skip_shared_memory_allreduce", no_shared_memory_allreduce), ("default_store", store)):
    check(name, fn)
report["versions"] = {"deepspeed": __import__("deepspeed").__version__, "torch": torch.__version__.split("+")[0]}
if world.is_main:
    Path(args.out).write_text(json.dumps(report, indent=1))
distributed.teardown()
