"""KernelOps: the functions a model calls through, one table per implementation.

REFERENCE_OPS holds the PyTorch references (kernels/reference.py); CPU_OPS the
same functions, but with kept-quantized weights multiplied by torch's CPU int4
kernel in float32 compute too; TRITON_OPS (kernels/triton_ops.py) the Triton
kernels with the same signatures. kernels/ops.py picks one for a device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from folio.kernels import graph_ops, reference


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
    # Compute dtypes in which a kept-quantized weight on CPU is packed for torch's int4
    # kernel (kernels/quant.py QuantizedWeight); in any other it is dequantized as it runs.
    int4pack_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)


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

# folio's CPU kernels: the references, except that in float32 too a kept-quantized
# weight goes through torch's int4 kernel, its inputs rounded to bfloat16 there (the
# kernel takes nothing wider) and everything between the matmuls kept in float32.
# Not exact against the dense model, as REFERENCE_OPS are; on the bundled SmolLM2
# GGUF 2.2x faster at one stream than its dense float32 weights, and closer to them
# than computing in bfloat16 throughout (README, "Quantized weights").
# A bf16 KV pool is attended to in bf16 where the CPU has AMX (reference.cpu_paged_attention);
# inside a torch.compile graph of a decode step, through one opaque op (kernels/graph_ops.py).
CPU_OPS = replace(
    REFERENCE_OPS,
    name="cpu",
    paged_attention=graph_ops.cpu_paged_attention,
    int4pack_dtypes=(torch.bfloat16, torch.float32),
)
