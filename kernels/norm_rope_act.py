"""The small elementwise kernels around attention and the MLP.

- rms_norm: fused residual add + RMSNorm (reference.rms_norm)
- rotary_embedding: rotate-half rotary embedding (reference.rotary_embedding)
- silu_and_mul: silu(gate) * up (reference.silu_and_mul)

All three are memory-bound: each reads its input once and writes once. The
rounding steps of the references (where they cast back to the input dtype
between operations) are reproduced, so fp16/bf16 results match to the last
bit up to the order of a sum.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    weight_offset,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program normalizes one row held whole in registers (BLOCK_N >= n_cols)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # fp32 add then one rounding equals torch's add in x's dtype (24 >= 2*11+2 bits).
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if weight_offset != 0.0:
        y = h * (w + weight_offset)  # Gemma: (1 + w), all in fp32
    else:
        y = h.to(x.dtype).to(tl.float32) * w  # Llama: round h first, then scale
    tl.store(out_ptr + row * stride_o + cols, y, mask=mask)


def rms_norm_warps(n_cols: int) -> int:
    """Warps for a row of n_cols: about 8 elements per thread per pass."""
    return max(1, min(16, triton.next_power_of_2(n_cols) // 256))


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor] = None,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., N]; weight: [N]; residual: like x or None.

    Returns (normed, new_residual) exactly as reference.rms_norm: new_residual
    is x + residual in x's dtype (x itself when residual is None); normed has
    the dtype of weight * x (weight's dtype promoted with x's).
    """
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight must be [{n}], got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("residual must match x in shape and dtype")
    if x.stride(-1) != 1 or weight.stride(0) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("the normalized dimension must be contiguous")
    x2 = x.reshape(-1, n)
    r2 = residual.reshape(-1, n) if residual is not None else x2
    out_dtype = x.dtype if weight_offset else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    res_out = torch.empty_like(x2) if residual is not None else x2
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            r2,
            weight,
            out,
            res_out,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            res_out.stride(0),
            n,
            eps,
            float(weight_offset),
            HAS_RESIDUAL=residual is not None,
            BLOCK_N=triton.next_power_of_2(n),
            num_warps=rms_norm_warps(n),
        )
    new_residual = res_out.view(x.shape) if residual is not None else x
    return out.view(x.shape), new_residual


# ---------------------------------------------------------------- rotary


@triton.jit
def _rotate_row(src, dst, cos_sin_row, half, rot_dim, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate one head row: feature i < half pairs with i + half (sign -),
    feature half <= i < rot_dim with i - half (sign +); the rest pass through."""
    d = tl.arange(0, BLOCK_D)
    in_head = d < HEAD_DIM
    rotated = d < rot_dim
    first = d < half
    partner = tl.where(first, d + half, d - half)
    freq = tl.where(first, d, d - half)
    x = tl.load(src + d, mask=in_head, other=0.0)
    xp = tl.load(src + partner, mask=rotated, other=0.0).to(tl.float32)
    cos = tl.load(cos_sin_row + freq, mask=rotated, other=1.0).to(tl.float32)
    sin = tl.load(cos_sin_row + half + freq, mask=rotated, other=0.0).to(tl.float32)
    y = x.to(tl.float32) * cos + tl.where(first, -xp, xp) * sin
    tl.store(dst + d, tl.where(rotated, y.to(x.dtype), x), mask=in_head)


@triton.jit
def _rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cs_ptr,
    q_out_ptr,
    k_out_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cs,
    num_q_heads,
    half,
    rot_dim,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (T, Hq + Hkv): one program per head row; programs past Hq rotate K.

    One row per program keeps the kernel independent of the head counts (one
    compiled variant per head dim); the cos/sin row is re-read from L1/L2.
    """
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cs_row = cs_ptr + pos * stride_cs
    if h < num_q_heads:
        _rotate_row(
            q_ptr + t * stride_qt + h * stride_qh,
            q_out_ptr + t * stride_qot + h * stride_qoh,
            cs_row,
            half,
            rot_dim,
            HEAD_DIM,
            BLOCK_D,
        )
    else:
        hk = h - num_q_heads
        _rotate_row(
            k_ptr + t * stride_kt + hk * stride_kh,
            k_out_ptr + t * stride_kot + hk * stride_koh,
            cs_row,
            half,
            rot_dim,
            HEAD_DIM,
            BLOCK_D,
        )


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] int; q: [T, Hq, D]; k: [T, Hkv, D] (any token/head
    strides, unit feature stride); cos_sin_cache: [max_positions, rot_dim],
    rot_dim even and <= D. Returns new contiguous (q, k); inputs untouched."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q, k must be [T, H, D] with equal T and D, got {tuple(q.shape)}, {tuple(k.shape)}")
    T, hq, d = q.shape
    rot_dim = cos_sin_cache.shape[-1]
    if cos_sin_cache.dim() != 2 or rot_dim % 2 or rot_dim > d or cos_sin_cache.stride(1) != 1:
        raise ValueError(f"cos_sin_cache must be a contiguous [P, rot_dim <= {d}] table with even rot_dim")
    if positions.shape != (T,):
        raise ValueError(f"positions must be [{T}], got {tuple(positions.shape)}")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("the feature dimension must be contiguous")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T:
        _rotary_kernel[(T, hq + k.shape[1])](
            positions,
            q,
            k,
            cos_sin_cache,
            q_out,
            k_out,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            k_out.stride(0),
            k_out.stride(1),
            cos_sin_cache.stride(0),
            hq,
            rot_dim // 2,
            rot_dim,
            HEAD_DIM=d,
            BLOCK_D=triton.next_power_of_2(d),
            num_warps=1,
        )
    return q_out, k_out


# ---------------------------------------------------------------- SiLU-and-mul

SILU_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    """Grid (rows, cdiv(I, BLOCK)); gate is x[:, :I], up is x[:, I:]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # F.silu rounds to the input dtype
    tl.store(out_ptr + row * stride_o + cols, act.to(tl.float32) * up.to(tl.float32), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2I] with unit last stride -> [..., I] contiguous."""
    if x.shape[-1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [..., 2I] with a contiguous last dimension, got {tuple(x.shape)}")
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    if x2.shape[0] and inter:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, SILU_BLOCK))](
            x2, out, x2.stride(0), out.stride(0), inter, BLOCK=SILU_BLOCK, num_warps=4
        )
    return out.view(*x.shape[:-1], inter)
