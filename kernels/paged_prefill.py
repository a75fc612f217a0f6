"""Ragged causal attention over the paged pool: prefill, chunked prefill,
prefix-cache hits, and mixed steps.

Reference: kernels/reference.py::paged_attention.

Every new token of sequence i sits at position context_lens[i] + its index
in the sequence's query rows and sees keys 0 ... its own position (within the
sliding window). All keys, the cached prefix and the step's own tokens alike,
are read through the block table, since write_kv has already stored the new
ones; so one kernel serves a fresh prompt (context 0), the next chunk of a
chunked prefill, a prompt whose prefix hit the cache, and a decode row.

GQA packing: a program takes BLOCK_M rows, each one (token, query head) pair
of the same KV head, group heads per token: rows = BLOCK_M // group tokens
times group heads. K/V tiles are thus read once per KV head, and a decode
row (one token) still fills `group` rows of the tile rather than one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from folio.kernels.metadata import AttentionMetadata
from folio.kernels.paged_decode import LOG2E, NO_WINDOW, dot_precision
from folio.kernels.paged_tile import online_softmax_step, paged_kv_tile, softcap_scores


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int  # (token, head) rows per program
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int


def prefill_config(head_dim: int, dtype: torch.dtype) -> PrefillConfig:
    """The launch configuration for a head dim and dtype (also what aot.py compiles)."""
    if dtype == torch.float32:
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    if head_dim <= 128:
        # 64 rows of 4 warps, 32 keys a step: 263 TFLOP/s on an H200 against 218 for
        # 128 rows of 8 warps (folio bench kernels --sections sweep, bf16, one 8k
        # prompt). 64 keys a step ran as fast on sm_90 but spills on sm_80 (aot.py checks).
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    # d256 (Gemma): the same tile needs 8 warps to hold its accumulator without spilling.
    return PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    query_start_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    qk_scale,
    sliding_window,
    softcap,
    group,
    tokens_per_tile,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (num_seqs, cdiv(max_query_len, tokens_per_tile), num_kv_heads).

    Program (s, b, kvh) takes query tokens b*tokens_per_tile ... of sequence s
    (tokens_per_tile = BLOCK_M // group), rows r -> token r // group, head
    kvh*group + r % group. Rows past the sequence's tokens or past
    tokens_per_tile*group are computed on zeros and never stored.
    qk_scale is the softmax scale times log2(e); with SOFTCAP the scaled scores
    are capped at softcap (the model's cap times log2(e)) before masking.
    """
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    first = tile * tokens_per_tile  # first query token of this program
    if first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    r = tl.arange(0, BLOCK_M)
    tok = first + r // group
    row_ok = (tok < q_len) & (r < tokens_per_tile * group)
    heads = kvh * group + r % group
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    io_mask = row_ok[:, None] & d_ok[None, :]
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=io_mask, other=0.0)
    q_pos = context + tok  # [BLOCK_M] absolute positions

    # Keys that any row of the tile can see: causal end at the tile's last
    # token, window start at its first.
    hi = tl.minimum(context + first + tokens_per_tile, seq_len)
    lo = tl.maximum(context + first - sliding_window + 1, 0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_off = kvh * stride_ch
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < hi
        kv_off, kv_mask = paged_kv_tile(table, pos, ok, d, d_ok, head_off, stride_cb, stride_cs, BLOCK_SIZE)
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if SOFTCAP:
            s = softcap_scores(s, softcap)
        dist = q_pos[:, None] - pos[None, :]
        visible = ok[None, :] & (dist >= 0) & (dist < sliding_window)
        s = tl.where(visible, s, float("-inf"))
        # Under a sliding window a later row may see nothing in an early tile;
        # the step's -inf guard covers it.
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        m, l, acc = online_softmax_step(m, l, acc, s, v, DOT_PRECISION)

    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]  # l is 0 only on rows never stored
    tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :], out, mask=io_mask)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    *,
    config: Optional[PrefillConfig] = None,
) -> torch.Tensor:
    """Causal attention of every new token over its sequence's paged context.

    q: [T, Hq, D] (unit feature stride); k_cache, v_cache: [num_blocks,
    block_size, Hkv, D], same strides, unit feature stride, block_size a power
    of two; all new tokens' K/V already written. Any mix of query lengths,
    zero included. softcap: scores become softcap * tanh(scores / softcap)
    before the causal and window masks (Gemma 2); None: uncapped. Returns
    [T, Hq, D] in q's dtype. config overrides the heuristic (tests use small
    tiles to cross tile edges on small shapes).
    """
    T, hq, d = q.shape
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q)
    if T == 0:
        return out
    cfg = config or prefill_config(d, k_cache.dtype)
    group = hq // hkv
    if group > cfg.block_m:
        raise ValueError(f"GQA group of {group} heads exceeds the {cfg.block_m}-row tile")
    tokens_per_tile = cfg.block_m // group
    grid = (meta.num_seqs, triton.cdiv(meta.max_query_len, tokens_per_tile), hkv)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables,
        scale * LOG2E,
        sliding_window or NO_WINDOW,
        (softcap or 0.0) * LOG2E,
        group,
        tokens_per_tile,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        meta.block_tables.stride(0),
        BLOCK_SIZE=bs,
        HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(d),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        SOFTCAP=softcap is not None,
        DOT_PRECISION=dot_precision(k_cache.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
