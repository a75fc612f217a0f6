"""The one place that picks kernels for a device.

Models receive a KernelOps and call through it; nothing reads a global. On a
CUDA device the Triton kernels serve; everywhere else the PyTorch references.
`kernels="triton"` forces the Triton kernels on CPU too, where they run in
Triton's interpreter (TRITON_INTERPRET=1): slow, but it lets the whole model
run through the GPU path on a machine without one, which the tests do.
"""
from __future__ import annotations

import os
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
    # torch's own functions on every device (kernels/reference.py says why)
    gelu_tanh_and_mul: Callable   # (x) -> out
    gelu: Callable                # (x, approximate="none") -> out
    layer_norm: Callable          # (x, weight, bias, eps) -> out


REFERENCE_OPS = KernelOps(
    name="reference",
    write_kv=reference.write_kv,
    paged_attention=reference.paged_attention,
    rms_norm=reference.rms_norm,
    rotary_embedding=reference.rotary_embedding,
    silu_and_mul=reference.silu_and_mul,
    gelu_tanh_and_mul=reference.gelu_tanh_and_mul,
    gelu=reference.gelu,
    layer_norm=reference.layer_norm,
)


KERNEL_CHOICES = ("auto", "triton", "reference")


def select_ops(device: torch.device | str, kernels: str = "auto") -> KernelOps:
    """"auto": Triton kernels on CUDA, PyTorch references elsewhere."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    on_cuda = torch.device(device).type == "cuda"
    if kernels == "reference" or (kernels == "auto" and not on_cuda):
        return REFERENCE_OPS
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("Triton kernels off CUDA run only in Triton's interpreter: set "
                         "TRITON_INTERPRET=1 before folio is imported")
    from kernels.triton_ops import TRITON_OPS  # imported lazily: needs a GPU build of triton
    return TRITON_OPS
