"""The one place that picks kernels for a device.

Models receive a KernelOps and call through it; nothing reads a global. On a
CUDA device the Triton kernels serve; everywhere else the PyTorch references.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels import reference


@dataclass(frozen=True)
class KernelOps:
    name: str
    write_kv: Callable            # (k, v, k_cache, v_cache, slot_mapping) -> None
    paged_attention: Callable     # (q, k_cache, v_cache, meta, scale, sliding_window) -> out
    rms_norm: Callable            # (x, weight, eps, residual=None, weight_offset=0.0) -> (out, residual)
    rotary_embedding: Callable    # (positions, q, k, cos_sin_cache) -> (q, k)
    silu_and_mul: Callable        # (x) -> out


REFERENCE_OPS = KernelOps(
    name="reference",
    write_kv=reference.write_kv,
    paged_attention=reference.paged_attention,
    rms_norm=reference.rms_norm,
    rotary_embedding=reference.rotary_embedding,
    silu_and_mul=reference.silu_and_mul,
)


def select_ops(device: torch.device | str) -> KernelOps:
    """Triton kernels on CUDA, PyTorch references elsewhere."""
    if torch.device(device).type == "cuda":
        from kernels.triton_ops import TRITON_OPS  # imported lazily: needs a GPU build of triton
        return TRITON_OPS
    return REFERENCE_OPS
