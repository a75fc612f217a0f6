"""TRITON_OPS: the KernelOps that folio.kernels.ops.select_ops hands out on CUDA.

Each entry has the signature of its reference in kernels/reference.py. The
kernel modules' wrappers check their own tensors; paged_attention checks the
metadata too and picks the kernel:

- every sequence brings at most one new token (meta.is_pure_decode, or a
  step of only decodes and idle sequences): paged_decode, split-K over the
  context so that a few long sequences still fill the GPU;
- otherwise: paged_prefill for the whole step, decode rows included. Its
  tiles pack a KV head's whole query group, so a decode row still reads K/V
  once per KV head; it only lacks split-K, which matters for a long decode
  row in a step whose prefill rows are too few to fill the GPU. One launch
  keeps the step free of host-side row sorting and of a second output pass.

quantized_linear is kernels/quant_matmul.py: the quantized weight is
dequantized tile by tile inside the matmul, never materialised. fused_moe is
kernels/fused_moe.py: the routed rows sorted by expert, then two grouped GEMMs
(gate/up with SiLU fused, down with the router weight) over every expert at once.
"""

from __future__ import annotations

from typing import Optional

import torch

from folio.kernels import reference
from folio.kernels.fused_moe import fused_moe
from folio.kernels.interface import KernelOps
from folio.kernels.kv_write import write_kv
from folio.kernels.metadata import AttentionMetadata
from folio.kernels.norm_rope_act import rms_norm, rotary_embedding, silu_and_mul
from folio.kernels.paged_decode import paged_decode_attention
from folio.kernels.paged_prefill import paged_prefill_attention
from folio.kernels.quant_matmul import quantized_linear


def _check_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(
            f"q must be [T, Hq, D] and the pool [blocks, block_size, Hkv, D], "
            f"got {tuple(q.shape)} and {tuple(k_cache.shape)}"
        )
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have equal shapes and strides")
    T, hq, d = q.shape
    _, bs, hkv, dc = k_cache.shape
    if dc != d or hq % hkv:
        raise ValueError(f"{hq} query heads of {d} do not fit {hkv} KV heads of {dc}")
    if bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two, got {bs}")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"q and the pool must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("the feature dimension must be contiguous")
    if T != meta.num_tokens or len(meta.query_lens_list) != meta.num_seqs:
        raise ValueError(
            f"q has {T} rows, metadata describes {meta.num_tokens} tokens "
            f"of {meta.num_seqs} sequences with host lists "
            f"{len(meta.query_lens_list)} / {meta.num_seqs}"
        )
    for name in ("query_start_loc", "seq_lens", "block_tables"):
        t = getattr(meta, name)
        if t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(f"meta.{name} must be int32 on {q.device}, got {t.dtype} on {t.device}")
    if meta.block_tables.stride(1) != 1:
        raise ValueError("meta.block_tables rows must be contiguous")


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Same contract as reference.paged_attention; see the module docstring for the split."""
    _check_attention(q, k_cache, v_cache, meta)
    reference.check_softcap(softcap)
    if meta.max_query_len <= 1:
        return paged_decode_attention(q, k_cache, v_cache, meta, scale, sliding_window, softcap)
    return paged_prefill_attention(q, k_cache, v_cache, meta, scale, sliding_window, softcap)


TRITON_OPS = KernelOps(
    name="triton",
    write_kv=write_kv,
    paged_attention=paged_attention,
    rms_norm=rms_norm,
    rotary_embedding=rotary_embedding,
    silu_and_mul=silu_and_mul,
    quantized_linear=quantized_linear,
    fused_moe=fused_moe,
    # No Triton kernels for these: torch's native ones serve (see kernels/reference.py).
    gelu_tanh_and_mul=reference.gelu_tanh_and_mul,
    gelu=reference.gelu,
    layer_norm=reference.layer_norm,
)
