"""Fused mixture-of-experts: sort the routed rows by expert, then two grouped GEMMs.

Reference: kernels/reference.py::fused_moe (one F.linear pair per expert that
has tokens, what the CPU runs). Same contract:

    x [T, H], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I],
    topk_weights [T, k], topk_ids [T, k]  ->  out [T, H]
    out[t] = sum_s topk_weights[t, s] * w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t])),  e = topk_ids[t, s]

I is whatever the weights hold: under tensor parallelism each rank's slice of
every expert's intermediate dimension, and out is that rank's partial sum.

Rows: the T * k (token, slot) pairs are numbered flat = t * k + s.
moe_align_block_size lists them grouped by expert, each expert's group padded
to a multiple of BLOCK_M with the sentinel T * k, so that every BLOCK_M tile
of the list belongs to one expert. It runs in torch ops on the device, O(T*k)
plus a stable sort of T*k small integer keys (a radix sort on a GPU), with no
Python loop and no host synchronisation: the list has a fixed capacity (the
most padding T*k rows can need) and the kernels return at once for tiles past
its end, read from a device scalar.

Kernels (one @triton.jit, two forms by constexpr), grid (tiles of the list,
N tiles), M tiles fastest so the tiles of one expert, which read the same
weight tile, run together:
1. GATED: inter[flat] = silu(x[flat // k] @ w13[e, :I]^T) * (x[flat // k] @ w13[e, I:]^T);
   gate and up are two fp32 accumulators over the same x tile, rounded to the
   model dtype before silu as F.linear and F.silu round them in the reference.
2. MUL_WEIGHT: y[flat] = topk_weights[flat] * (inter[flat] @ w2[e]^T), the
   router weight applied to the fp32 accumulator.
Rows are gathered and scattered by flat id, so the sorted order never leaves
the kernels and padding rows (the sentinel) are masked out of every load and
store. The k slots of a token are then summed by torch (y.view(T, k, H).sum(1)):
a fixed order, where atomic adds into out would make results vary run to run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from folio.kernels.paged_decode import dot_precision

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class FusedMoEConfig:
    block_m: int  # routed rows per program (also the per-expert padding)
    block_n: int  # output features per program
    block_k: int  # input features per step
    num_warps: int
    num_stages: int


def fused_moe_config(rows: int, num_experts: int, dtype: torch.dtype) -> FusedMoEConfig:
    """The launch configuration for T * k routed rows over E experts (also what aot.py compiles).

    What matters is the rows one expert gets: a few (decode) leaves the kernel
    bound by reading weights, so one 16-row tile (tl.dot's minimum) and narrow N
    tiles give more programs to stream them; many (prefill) make it bound by the
    dots, and larger tiles reuse each weight tile over more rows.
    """
    per_expert = rows / max(num_experts, 1)
    if dtype == torch.float32:
        # ieee fp32 dots take twice the registers of fp16 ones, and GATED holds two accumulators.
        return FusedMoEConfig(16 if per_expert <= 16 else 32, 32, 32, num_warps=4, num_stages=2)
    if per_expert <= 16:
        return FusedMoEConfig(16, 64, 128, num_warps=4, num_stages=3)
    if per_expert <= 64:
        return FusedMoEConfig(64, 64, 64, num_warps=4, num_stages=3)
    return FusedMoEConfig(64, 128, 64, num_warps=8, num_stages=3)


def kernel_constexprs(cfg: FusedMoEConfig, in_features: int, gated: bool, dtype: torch.dtype) -> dict:
    """The kernel's constexprs for one of the two GEMMs (the wrapper's launches and aot.py's compiles).
    BLOCK_K is no wider than K needs, so small test models do not multiply zeros."""
    bk = min(cfg.block_k, max(16, triton.next_power_of_2(in_features)))
    return dict(
        GATED=gated,
        MUL_WEIGHT=not gated,
        EVEN_K=in_features % bk == 0,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=bk,
        DOT_PRECISION=dot_precision(dtype),
    )


def padded_capacity(rows: int, num_experts: int, block_m: int) -> int:
    """Length of the sorted list: every row plus at most block_m - 1 padding
    rows for each expert that can have any (no more than rows of them)."""
    return triton.cdiv(rows + min(num_experts, rows) * (block_m - 1), block_m) * block_m


def moe_align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_ids [P] int32, expert_ids [P / block_m] int32, num_padded [1] int32).

    sorted_ids lists the flat ids t * k + s expert by expert (ascending), in
    token order within an expert, each expert's run padded with T * k to a
    multiple of block_m; experts without rows take no tiles. expert_ids[i] is
    the expert of tile i; num_padded the length of the used prefix (tiles past
    it hold only padding, and an in-range expert id so a stray read stays
    in bounds). P = padded_capacity(T * k, E, block_m).
    """
    flat = topk_ids.reshape(-1).long()  # [n]
    n, dev = flat.numel(), flat.device
    # scatter_add_, not bincount: bincount reads the maximum back to the host.
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    ends = padded.cumsum(0)  # [E] end of each expert's run in the list
    order = torch.sort(flat, stable=True).indices  # [n] flat ids grouped by expert, token order kept
    expert_of = flat[order]  # [n]
    rank = torch.arange(n, device=dev) - (counts.cumsum(0) - counts)[expert_of]  # [n] place within its expert
    cap = padded_capacity(n, num_experts, block_m)
    sorted_ids = torch.full((cap,), n, dtype=torch.int32, device=dev)  # [P]
    sorted_ids[(ends - padded)[expert_of] + rank] = order.to(torch.int32)
    tile_starts = torch.arange(0, cap, block_m, device=dev)  # [P / block_m]
    expert_ids = torch.searchsorted(ends, tile_starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


@triton.jit
def _fused_moe_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    topk_weights_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    N,
    K,
    num_rows,
    top_k,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    GATED: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (P / BLOCK_M, cdiv(N, BLOCK_N)): out[rows of list tile, n tile].

    GATED: a is x [T, K], a row is flat // top_k, w is w13 [E, 2N, K] and
    out [T * k, N] gets silu(gate) * up. Otherwise a is [T * k, K] indexed by
    flat id, w is [E, N, K], and MUL_WEIGHT scales each row by
    topk_weights[flat] ([T * k], contiguous). Unit column strides everywhere.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the used prefix of the list: padding tiles only
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M] flat ids
    row_ok = rows < num_rows  # the sentinel num_rows marks padding
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    a_rows = rows // top_k if GATED else rows
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + expert * stride_we + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a_mask = row_ok[:, None]
        w_mask = n_ok[:, None]
        if not EVEN_K:
            a_mask = a_mask & (k0 + rk < K)[None, :]
            w_mask = w_mask & (k0 + rk < K)[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if GATED:  # the up rows sit N rows below the gate rows
            u = tl.load(w_ptrs + N * stride_wn, mask=w_mask, other=0.0)
            acc_up = tl.dot(a, tl.trans(u), acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dtype = out_ptr.dtype.element_ty
    if GATED:
        # Round as the reference does: F.linear's outputs, then F.silu's, to the model dtype.
        g = acc.to(dtype).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        acc = act * acc_up.to(dtype).to(tl.float32)
    if MUL_WEIGHT:
        acc = acc * tl.load(topk_weights_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(dtype), mask=row_ok[:, None] & n_ok[None, :])


def _check(x, w13, w2, topk_weights, topk_ids) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"x must be [T, H], w13 [E, 2I, H], w2 [E, H, I]; got {list(x.shape)}, {list(w13.shape)}, {list(w2.shape)}"
        )
    t, h = x.shape
    e, two_i, _ = w13.shape
    if two_i % 2 or tuple(w13.shape) != (e, two_i, h) or tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(f"w13 {list(w13.shape)} and w2 {list(w2.shape)} do not fit x {list(x.shape)}")
    if x.dtype not in DTYPES or w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"x, w13 and w2 must share one of {DTYPES}, got {x.dtype}, {w13.dtype}, {w2.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_ids and topk_weights must both be [{t}, k], got {list(topk_ids.shape)}, {list(topk_weights.shape)}"
        )
    if topk_ids.is_floating_point() or topk_ids.is_complex() or not topk_weights.is_floating_point():
        raise ValueError(f"topk_ids must be integers, topk_weights floats; got {topk_ids.dtype}, {topk_weights.dtype}")
    devices = {t.device for t in (x, w13, w2, topk_weights, topk_ids)}
    if len(devices) > 1:
        raise ValueError(f"x, w13, w2, topk_weights and topk_ids must be on one device, got {devices}")
    if any(t.stride(-1) != 1 for t in (x, w13, w2)):
        raise ValueError("x, w13 and w2 must have contiguous rows")


def moe_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    topk_weights: torch.Tensor,
    aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    top_k: int,
    gated: bool,
    cfg: FusedMoEConfig,
) -> None:
    """One of the two grouped GEMMs, into out (rows written: the flat ids in aligned[0], no others).

    gated: a = x [T, K], w = w13 [E, 2N, K], out [>= T*k, N] gets silu(gate) * up.
    Otherwise a [T*k, K], w = w2 [E, N, K], out [>= T*k, N] gets topk_weights[flat] * (a @ w[e]^T).
    topk_weights: [T*k] contiguous. aligned: moe_align_block_size(topk_ids, E, cfg.block_m).
    """
    sorted_ids, expert_ids, num_padded = aligned
    n, k_in = out.shape[1], a.shape[1]
    num_rows = topk_weights.numel()
    _fused_moe_kernel[(sorted_ids.numel() // cfg.block_m, triton.cdiv(n, cfg.block_n))](
        a,
        w,
        out,
        topk_weights,
        sorted_ids,
        expert_ids,
        num_padded,
        n,
        k_in,
        num_rows,
        top_k,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        **kernel_constexprs(cfg, k_in, gated, a.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    config: Optional[FusedMoEConfig] = None,
) -> torch.Tensor:
    """Same contract as reference.fused_moe (module docstring). config overrides
    the heuristic (tests use it to force small tiles)."""
    _check(x, w13, w2, topk_weights, topk_ids)
    t, h = x.shape
    e, inter = w13.shape[0], w13.shape[1] // 2
    k = topk_ids.shape[1]
    out = torch.empty((t * k, h), dtype=x.dtype, device=x.device)  # [T * k, H] one row per (token, slot)
    if t == 0 or k == 0 or inter == 0:
        return out.zero_().view(t, k, h).sum(1)
    cfg = config or fused_moe_config(t * k, e, x.dtype)
    aligned = moe_align_block_size(topk_ids, e, cfg.block_m)
    # [T * k] fp32, read by flat id: Qwen's routers give weights in the model dtype, Mixtral's in
    # fp32; widening is exact, and it keeps one compiled kernel for both.
    weights = topk_weights.reshape(-1).float().contiguous()
    cache = torch.empty((t * k, inter), dtype=x.dtype, device=x.device)  # [T * k, I] silu(gate) * up
    moe_gemm(x, w13, cache, weights, aligned, k, True, cfg)
    moe_gemm(cache, w2, out, weights, aligned, k, False, cfg)
    return out.view(t, k, h).sum(1)  # [T, H]: the k slots of each token
