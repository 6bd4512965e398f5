"""Scaled dot-product attention behind one function, with three interchangeable backends.

``sdpa``     PyTorch's fused ``scaled_dot_product_attention`` (the default; flash/mem-efficient kernels on GPU).
``xformers`` ``xformers.ops.memory_efficient_attention``; it has no CPU kernel and wants (B, M, H, K) tensors.
``math``     the textbook softmax(QK^T / sqrt(d)) V, the reference the other two are tested against.

A backend that cannot run here (xformers not installed, or tensors not on CUDA) falls back to ``sdpa``
with a single warning, so a run never silently computes something else than it was asked to.

On the ``meta`` device (tools/plan_memory.py traces activations there) ``sdpa`` calls the memory-efficient
kernel directly: the dispatcher would pick the math path on meta, which keeps the whole N x M attention
matrix for backward where the GPU kernels keep only their inputs, output and log-sum-exp.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "xformers", "math")
_warned: set[str] = set()

try:
    import xformers.ops as xops
except ImportError:  # optional extra
    xops = None


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {BACKENDS}")
    if backend == "xformers":
        if xops is None:
            _warn_once("attention backend 'xformers' requested but xformers is not installed; using 'sdpa'")
            return "sdpa"
        if device.type != "cuda":
            _warn_once(f"attention backend 'xformers' has no kernel on {device.type}; using 'sdpa'")
            return "sdpa"
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """q: (B, H, N, D), k/v: (B, H, M, D) -> (B, H, N, D)."""
    backend = resolve_backend(backend, q.device)
    if backend == "sdpa" and q.device.type == "meta":
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[0]
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "xformers":
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(dim=-1), v)
