"""The one place that picks kernels for a device.

Models receive a KernelOps and call through it; nothing reads a global. On a
CUDA device the Triton kernels serve; everywhere else the PyTorch references
(CPU_OPS: with torch's int4 kernel for kept-quantized weights in float32 too;
`kernels="reference"`: exactly the references, a float32 model bit for bit the
dense one).
`kernels="triton"` forces the Triton kernels on CPU too, where they run in
Triton's interpreter (TRITON_INTERPRET=1): slow, but it lets the whole model
run through the GPU path on a machine without one, which the tests do.
KernelOps (the table of functions) lives in kernels/interface.py, so the
Triton table can be built without importing this module.
"""

from __future__ import annotations

import os

import torch

from folio.kernels.interface import CPU_OPS, REFERENCE_OPS, KernelOps
from folio.protos.config import KERNELS


def select_ops(device: torch.device | str, kernels: str = "auto") -> KernelOps:
    """ "auto": Triton kernels on CUDA, CPU_OPS elsewhere."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    on_cuda = torch.device(device).type == "cuda"
    if kernels == "reference":
        return REFERENCE_OPS
    if kernels == "auto" and not on_cuda:
        return CPU_OPS
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "Triton kernels off CUDA run only in Triton's interpreter: set TRITON_INTERPRET=1 before folio is imported"
        )
    from folio.kernels.triton_ops import TRITON_OPS  # imported lazily: needs a GPU build of triton

    return TRITON_OPS
