"""KernelOps: the functions a model calls through, one table per implementation.

REFERENCE_OPS holds the PyTorch references (kernels/reference.py); TRITON_OPS
(kernels/triton_ops.py) the Triton kernels with the same signatures.
kernels/ops.py picks one for a device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from folio.kernels import reference


@dataclass(frozen=True)
class KernelOps:
    name: str
    write_kv: Callable  # (k, v, k_cache, v_cache, slot_mapping) -> None
    paged_attention: Callable  # (q, k_cache, v_cache, meta, scale, sliding_window=None, softcap=None) -> out
    rms_norm: Callable  # (x, weight, eps, residual=None, weight_offset=0.0) -> (out, residual)
    rotary_embedding: Callable  # (positions, q, k, cos_sin_cache) -> (q, k)
    silu_and_mul: Callable  # (x) -> out
    quantized_linear: Callable  # (x, w: QuantizedWeight, bias=None) -> y
    fused_moe: Callable  # (x, w13, w2, topk_weights, topk_ids) -> out
    # torch's own functions on every device (kernels/reference.py says why)
    gelu_tanh_and_mul: Callable  # (x) -> out
    gelu: Callable  # (x, approximate="none") -> out
    layer_norm: Callable  # (x, weight, bias, eps) -> out


REFERENCE_OPS = KernelOps(
    name="reference",
    write_kv=reference.write_kv,
    paged_attention=reference.paged_attention,
    rms_norm=reference.rms_norm,
    rotary_embedding=reference.rotary_embedding,
    silu_and_mul=reference.silu_and_mul,
    quantized_linear=reference.quantized_linear,
    fused_moe=reference.fused_moe,
    gelu_tanh_and_mul=reference.gelu_tanh_and_mul,
    gelu=reference.gelu,
    layer_norm=reference.layer_norm,
)
