"""Dequantize-and-multiply: y = x @ dequant(w)^T (+ bias) for group-quantized weights.

Reference: kernels/quant.py::dequantized_linear (what reference.quantized_linear
runs wherever torch's CPU int4 kernel does not take the weight).

Weight layout (kernels/quant.py, QuantizedWeight):
    w[n, k] = (q[n, k] - 2**(bits - 1)) * scale[n, k // group] + zero[n, k // group]
- 4 bits: codes uint8 [N, K/2], two per byte, low nibble = even column 2i,
  high nibble = odd column 2i + 1 (W4A16);
- any other width (2, 3, 5, 6, 7, 8 bits): codes uint8 [N, K], one per byte
  (W8A16 and the rest: only the centring 2**(bits - 1) differs);
- scale, zero: [N, K/group] in the compute dtype; perm (act-order) is applied
  to x by the wrapper (x[:, perm]) before the launch, so the kernel always
  walks K in stored column order.

Tiling: a program computes a BLOCK_M x BLOCK_N tile of y, walking K in
BLOCK_K steps. Each step loads a [BLOCK_N, BLOCK_K] weight tile as bytes,
expands 4-bit bytes into their two codes with tl.interleave (one load per
byte, so the loads stay contiguous and vectorise), dequantizes in fp32 (as the
reference does, so each weight rounds to the compute dtype exactly as
w.dequantize() rounds it), and feeds tl.dot with an fp32 accumulator. The
weight is never written back out dequantized: that is the point, since a
4-bit weight is a quarter of the bytes a decode step would read otherwise.

Groups (groups_per_step picks one of three paths at compile time):
- group a multiple of BLOCK_K (128, ..., K): a K step lies in one group, and
  scale and zero are one [BLOCK_N] load per step;
- BLOCK_K a multiple of group (16, 32, 64): the step holds whole groups; one
  [BLOCK_N, groups] load, broadcast over each group's columns by a reshape;
- anything else (48, 80, ...): each element looks up its own group k // group,
  a [BLOCK_N, BLOCK_K] gather from the small scale/zero arrays (in cache).
  It costs registers, so its step is at most 64 wide; a group with a
  power-of-two divisor of 32 or more (96, 160) instead narrows the step to
  that divisor and takes the first path.

Configs: decode-sized T (<= 16) is bound by reading the weight; one 16-row
tile (tl.dot's minimum) covers all tokens and narrow N tiles give more
programs to stream the weight. Prefill-sized T is bound by the dot, so larger
M and N tiles reuse each dequantized weight tile over more rows. The grid runs
M tiles fastest, so the programs that share a weight tile run together and
read it from HBM about once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from folio.kernels.paged_decode import dot_precision
from folio.kernels.quant import QuantizedWeight

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class QuantMatmulConfig:
    block_m: int  # token rows per program
    block_n: int  # output features per program
    block_k: int  # input features per step (the wrapper may shrink it to fit the group)
    num_warps: int
    num_stages: int


def quant_matmul_config(tokens: int, dtype: torch.dtype, bits: int = 4) -> QuantMatmulConfig:
    """The launch configuration for T tokens in a compute dtype (also what aot.py compiles)."""
    if dtype == torch.float32:
        # ieee fp32 dots take twice the registers of fp16 ones per element.
        return QuantMatmulConfig(16 if tokens <= 16 else 32, 32, 32, num_warps=4, num_stages=2)
    if tokens <= 16:
        # 4-bit: 256 columns a step (two groups of 128) read a long-K weight 1.17x
        # faster than 128 on an H200 (4096x14336, 43.0 -> 36.7 us) and a wide one
        # as fast (folio bench kernels --sections sweep). 8-bit was not swept.
        return QuantMatmulConfig(16, 32, 256 if bits == 4 else 128, num_warps=4, num_stages=4)
    if tokens <= 64:
        return QuantMatmulConfig(64, 64, 64, num_warps=4, num_stages=3)
    return QuantMatmulConfig(128, 128, 64, num_warps=8, num_stages=3)


def block_k_for(block_k: int, in_features: int, group: int) -> int:
    """BLOCK_K for a weight: no wider than K needs; narrowed to a group whose
    largest power-of-two divisor is 32 or more but which no wider step divides
    (96, 160, ...), since per-step scales beat per-element group lookups; at
    most 64 where groups start mid-step (48, 80, ...)."""
    bk = min(block_k, max(16, triton.next_power_of_2(in_features)))
    if group % bk and bk % group:
        pow2 = group & -group
        # A per-element lookup over a 128-wide 4-bit step spills on sm_80 (aot.py checks).
        bk = pow2 if pow2 >= 32 else min(bk, 64)
    return bk


def groups_per_step(group: int, block_k: int) -> int:
    """GROUPS_PER_STEP: 1 when a K step lies in one group, block_k // group when
    it holds whole groups, 0 when groups start mid-step (per-element lookup)."""
    if group % block_k == 0:
        return 1
    return block_k // group if block_k % group == 0 else 0


def kernel_constexprs(
    bits: int, group: int, in_features: int, dtype: torch.dtype, cfg: QuantMatmulConfig, has_bias: bool
) -> dict:
    """The kernel's constexprs for a weight and config (the wrapper's launch and aot.py's compiles)."""
    bk = block_k_for(cfg.block_k, in_features, group)
    return dict(
        BITS=bits,
        HAS_BIAS=has_bias,
        GROUPS_PER_STEP=groups_per_step(group, bk),
        EVEN_K=in_features % bk == 0,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=bk,
        DOT_PRECISION=dot_precision(dtype),
    )


@triton.jit
def _quant_matmul_kernel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    zero_ptr,
    bias_ptr,
    out_ptr,
    T,
    N,
    K,
    group,
    stride_xt,
    stride_cn,
    stride_sn,
    stride_ot,
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUPS_PER_STEP: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_M), cdiv(N, BLOCK_N)): out[m tile, n tile].

    x [T, K] and out [T, N] have unit column stride; codes [N, K / PACK],
    scale and zero [N, K / group] have unit column stride. GROUPS_PER_STEP
    (groups_per_step) 1 promises group % BLOCK_K == 0 (hence EVEN_K), more
    than 1 that BLOCK_K == GROUPS_PER_STEP * group. Masked loads give scale
    and zero 0 past K and N, which keeps padded weights finite (x is 0 there).
    """
    PACK: tl.constexpr = 2 if BITS == 4 else 1
    MID: tl.constexpr = 1 << (BITS - 1)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rb = tl.arange(0, BLOCK_K // PACK)  # code bytes of one K step
    m_ok = rm < T
    n_ok = rn < N
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xt + rk[None, :]
    c_ptrs = codes_ptr + rn.to(tl.int64)[:, None] * stride_cn + rb[None, :]
    s_row = rn.to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            c = tl.load(c_ptrs, mask=n_ok[:, None], other=0)
        else:
            x = tl.load(x_ptrs, mask=m_ok[:, None] & (k0 + rk < K)[None, :], other=0.0)
            c = tl.load(c_ptrs, mask=n_ok[:, None] & (k0 // PACK + rb < K // PACK)[None, :], other=0)
        if PACK == 2:
            # byte i holds columns 2i (low nibble) and 2i + 1 (high): interleaving
            # the two halves puts every code back at its column.
            c = tl.interleave(c & 15, c >> 4)
        q = c.to(tl.float32) - MID
        if GROUPS_PER_STEP == 1:
            g = k0 // group
            s = tl.load(scale_ptr + s_row + g, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + s_row + g, mask=n_ok, other=0.0).to(tl.float32)
            w = q * s[:, None] + z[:, None]
        elif GROUPS_PER_STEP > 1:
            # Whole groups: one scale per (row, group), broadcast over the group's
            # columns, rather than a lookup per element (which spills registers).
            GROUP: tl.constexpr = BLOCK_K // GROUPS_PER_STEP
            g = k0 // GROUP + tl.arange(0, GROUPS_PER_STEP)
            s_off = s_row[:, None] + g[None, :]
            s_mask = n_ok[:, None]
            if not EVEN_K:  # the last step's groups past K do not exist
                s_mask = s_mask & (g < K // GROUP)[None, :]
            s = tl.load(scale_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32)
            q = tl.reshape(q, (BLOCK_N, GROUPS_PER_STEP, GROUP))
            w = tl.reshape(q * s[:, :, None] + z[:, :, None], (BLOCK_N, BLOCK_K))
        else:
            g = (k0 + rk) // group
            s_mask = n_ok[:, None] & (k0 + rk < K)[None, :]
            s = tl.load(scale_ptr + s_row[:, None] + g[None, :], mask=s_mask, other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + s_row[:, None] + g[None, :], mask=s_mask, other=0.0).to(tl.float32)
            w = q * s + z
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        c_ptrs += BLOCK_K // PACK
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_ot + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _check(x: torch.Tensor, w: QuantizedWeight, bias: Optional[torch.Tensor]) -> None:
    if not isinstance(w, QuantizedWeight):
        raise ValueError(f"w must be a QuantizedWeight, got {type(w).__name__}")
    n, k = w.out_features, w.in_features
    if w.codes is None:
        raise ValueError("w holds only torch's CPU int4 form (int4pack); the Triton kernel reads codes")
    if w.dtype not in DTYPES:
        raise ValueError(f"the weight's compute dtype must be one of {DTYPES}, got {w.dtype}")
    packed = (n, k // 2) if w.bits == 4 else (n, k)
    if w.codes.dtype != torch.uint8 or tuple(w.codes.shape) != packed or (w.bits == 4 and k % 2):
        raise ValueError(
            f"{w.bits}-bit codes of a {n}x{k} weight must be uint8 {list(packed)}, "
            f"got {w.codes.dtype} {list(w.codes.shape)}"
        )
    groups = (n, k // w.group)
    for name in ("scale", "zero"):
        t = getattr(w, name)
        if k % w.group or tuple(t.shape) != groups or t.dtype != w.dtype:
            raise ValueError(f"w.{name} must be {w.dtype} {list(groups)}, got {t.dtype} {list(t.shape)}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must be [..., {k}] for a {n}x{k} weight, got {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != w.dtype):
        raise ValueError(f"bias must be {w.dtype} [{n}], got {bias.dtype} {list(bias.shape)}")
    tensors = {"x": x, "w.codes": w.codes, "w.scale": w.scale, "w.zero": w.zero, "w.perm": w.perm, "bias": bias}
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"x, w and bias must be on one device, got {devices}")
    if any(t.stride(-1) != 1 for t in (w.codes, w.scale, w.zero)):
        raise ValueError("w.codes, w.scale and w.zero must have contiguous rows")
    if w.perm is not None and (w.perm.dtype != torch.int64 or tuple(w.perm.shape) != (k,)):
        raise ValueError(f"w.perm must be int64 [{k}], got {w.perm.dtype} {list(w.perm.shape)}")


def quantized_linear(
    x: torch.Tensor,
    w: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,
    *,
    config: Optional[QuantMatmulConfig] = None,
) -> torch.Tensor:
    """x [..., K] -> [..., N] in w.dtype; same contract as reference.quantized_linear.

    x is cast to the weight's compute dtype. config overrides the heuristic
    (tests use it to force small tiles).
    """
    _check(x, w, bias)
    n, k = w.out_features, w.in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if w.perm is not None:
        x2 = x2.index_select(-1, w.perm)
    x2 = x2.to(w.dtype)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    t = x2.shape[0]
    out = torch.empty((t, n), dtype=w.dtype, device=x.device)
    if t == 0:
        return out.view(*lead, n)
    cfg = config or quant_matmul_config(t, w.dtype, w.bits)
    _quant_matmul_kernel[(triton.cdiv(t, cfg.block_m), triton.cdiv(n, cfg.block_n))](
        x2,
        w.codes,
        w.scale,
        w.zero,
        bias.contiguous() if bias is not None else out,  # out is never read: HAS_BIAS is off
        out,
        t,
        n,
        k,
        w.group,
        x2.stride(0),
        w.codes.stride(0),
        w.scale.stride(0),
        out.stride(0),
        **kernel_constexprs(w.bits, w.group, k, w.dtype, cfg, bias is not None),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out.view(*lead, n)
