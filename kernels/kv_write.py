"""Store the step's new K/V rows in the paged pool.

Reference: kernels/reference.py::write_kv. Layout: kernels/metadata.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    block_size,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program copies one (token, kv head) row of HEAD_DIM features.

    Grid (T, num_kv_heads). A row is only a few hundred bytes, but the pool
    slots of consecutive tokens are scattered, so there is nothing to gain
    from wider programs; many small ones keep every SM busy.
    """
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)  # int64: pools exceed 2**31 elements
    dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs + h * stride_ch
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + h * stride_kh + d, mask=dmask)
    v = tl.load(v_ptr + t64 * stride_vt + h * stride_vh + d, mask=dmask)
    # The store casts to the pool's element type, as reference's .to(k_cache.dtype).
    tl.store(k_cache_ptr + dst + d, k, mask=dmask)
    tl.store(v_cache_ptr + dst + d, v, mask=dmask)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v: [T, Hkv, D] (any token/head strides, unit feature stride);
    k_cache, v_cache: [num_blocks, block_size, Hkv, D], same shape and strides,
    unit feature stride; slot_mapping: [T] int, every slot inside the pool.
    Writes in place."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [T, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must be [num_blocks, block_size, Hkv, D] with equal strides")
    T, hkv, d = k.shape
    if k_cache.shape[2:] != (hkv, d):
        raise ValueError(f"new K/V have {hkv} heads of {d}, pool has {tuple(k_cache.shape[2:])}")
    if slot_mapping.shape != (T,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping must be [{T}] int32/int64, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("the feature dimension must be contiguous")
    if T == 0:
        return
    _write_kv_kernel[(T, hkv)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        k_cache.shape[1],
        HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(d),
        num_warps=1,
    )
