"""Numerical faults: a non-finite loss or gradient never reaches the weights or the EMA; a run of them stops the
run with a message and a checkpoint of the last good state. (fp16 loss scaling is DeepSpeed's and needs a GPU.)"""
import pytest
import torch
from safetensors.torch import load_file

from conftest import Run, command, completed

# Real multi-rank or multi-process runs: the full suite, not the fast tier (-m "not slow").
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_non_finite_steps_never_reach_weights_or_ema_and_stop_the_run(shards, tmp_path, precision):
    """An absurd learning rate without clipping makes the loss overflow; those steps are discarded, and after
    max_bad_steps in a row the run saves the last good state and stops with a message saying so. fp32 and
    bf16 (DeepSpeed's bf16 path: bf16 weights, fp32 master copy), as on CPU."""
    r = Run(command(tmp_path, shards, ranks=1, steps=60, extra=[
        "--set", "learning_rate=1e30", "--set", "max_grad_norm=0", "--set", "warmup_steps=0", "--set", "max_bad_steps=3",
        "--set", f"mixed_precision={precision}", "--set", "data.num_workers=2"]))
    assert r.end(bound=300) == 2, r.out[-2000:] + r.err[-2000:]  # and no process (loader workers) left
    assert r.err.count("3 steps in a row had a non-finite loss or gradients") == 1 and "Traceback" not in r.err
    assert "weights and EMA unchanged" in r.out
    saved = completed(tmp_path)
    assert saved
    ckpt = tmp_path / "ckpt" / "unet1" / saved[-1]
    ema = load_file(str(ckpt / "ema.safetensors"))
    assert all(torch.isfinite(v).all() for v in ema.values())
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    assert all(torch.isfinite(v).all() for v in weights.values())
