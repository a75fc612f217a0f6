"""Paged decode attention: one new token per sequence, split-K over the context.

Reference: kernels/reference.py::paged_attention (its _decode_batch path).

Decode is bound by reading K/V. Two choices follow from that:
- GQA: one program serves all query heads of one KV head (padded to a tile
  of at least 16 rows for tl.dot), so each K/V byte is read once per step, not
  once per query head.
- Split-K (flash-decoding): with few sequences there are too few
  (sequence, kv head) programs to fill the GPU, so the context is also cut
  into splits. Each split writes an unnormalized partial (acc, running max m,
  running sum l) and _reduce_kernel merges them. With one split the main
  kernel writes the output directly and no reduce runs.

All softmax math is fp32 in the exp2 domain (scores pre-multiplied by
scale * log2(e)); probabilities are rounded to the KV dtype for the P @ V dot,
as in every flash-attention kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from folio.kernels.metadata import AttentionMetadata
from folio.kernels.paged_tile import online_softmax_step, paged_kv_tile, softcap_scores

LOG2E = 1.4426950408889634
NO_WINDOW = 1 << 30  # sliding window used when there is none: larger than any context
MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost outweighs its share of the reads
SPLIT_CHUNK = 16  # partials merged per step of the reduce kernel


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # context tokens per inner step
    num_warps: int
    num_stages: int


def decode_config(head_dim: int, dtype: torch.dtype) -> DecodeConfig:
    """The launch configuration for a head dim and KV dtype (also what aot.py compiles)."""
    if dtype == torch.float32:
        return DecodeConfig(block_n=32, num_warps=4, num_stages=2)
    return DecodeConfig(block_n=64, num_warps=4, num_stages=3 if head_dim <= 128 else 2)


def group_tile(group: int) -> int:
    """Rows of the query tile: the GQA group, padded to tl.dot's minimum of 16."""
    return max(16, triton.next_power_of_2(group))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 KV must not silently drop to tf32; fp16/bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    query_start_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    qk_scale,
    sliding_window,
    softcap,
    split_tokens,
    group,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    stride_ps,
    stride_ph,
    stride_pk,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PARTIALS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (num_seqs, num_kv_heads, num_splits).

    Program (s, kvh, j) attends query heads kvh*group ... kvh*group+group-1
    of sequence s's one new token over the j-th split_tokens-long piece of
    the visible span [max(seq_len - sliding_window, 0), seq_len).
    qk_scale is the softmax scale times log2(e); with SOFTCAP the scaled scores
    are capped at softcap (the model's cap times log2(e)) before masking.
    Partials m, l are indexed [s, q head, j] (stride_ps, stride_ph, stride_pk)
    and contiguous, so the partial acc row of the same index starts at that
    index times HEAD_DIM.
    """
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_row
    if q_len == 0:  # a sequence that contributes no token this step
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    # Splits tile the visible span only, so a sliding window leaves no split idle.
    span_start = tl.maximum(seq_len - sliding_window, 0)
    lo = span_start + split * split_tokens
    hi = tl.minimum(lo + split_tokens, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * group + g
    g_ok = g < group
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + q_row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_off = kvh * stride_ch
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < hi
        kv_off, kv_mask = paged_kv_tile(table, pos, ok, d, d_ok, head_off, stride_cb, stride_cs, BLOCK_SIZE)
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        if SOFTCAP:
            s = softcap_scores(s, softcap)
        s = tl.where(ok[None, :], s, float("-inf"))
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        m, l, acc = online_softmax_step(m, l, acc, s, v, DOT_PRECISION)

    out_mask = g_ok[:, None] & d_ok[None, :]
    if USE_PARTIALS:
        # A split past a shorter sequence's end is empty and stores m=-inf, l=0:
        # the reduce gives it zero weight.
        part = seq.to(tl.int64) * stride_ps + heads * stride_ph + split * stride_pk
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=out_mask)
        tl.store(part_m_ptr + part, m, mask=g_ok)
        tl.store(part_l_ptr + part, l, mask=g_ok)
    else:
        out = acc / l[:, None]
        tl.store(out_ptr + q_row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :], out, mask=out_mask)


@triton.jit
def _reduce_kernel(
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    query_start_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    stride_ps,
    stride_ph,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):
    """Grid (num_seqs, num_q_heads): merge one head's partials over splits.

    out = sum_j 2^(m_j - M) acc_j / sum_j 2^(m_j - M) l_j, M = max_j m_j,
    computed online over chunks of SPLIT_CHUNK splits so that any split count
    works with one compiled variant, and a chunk's loads are all in flight at once.
    """
    seq = tl.program_id(0)
    h = tl.program_id(1)
    q_row = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_row
    if q_len == 0:
        return
    base = seq.to(tl.int64) * stride_ps + h * stride_ph  # partial [seq, h, split 0]
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c in range(0, num_splits, SPLIT_CHUNK):
        j = c + tl.arange(0, SPLIT_CHUNK)
        ok = j < num_splits
        m_j = tl.load(part_m_ptr + base + j, mask=ok, other=float("-inf"))
        l_j = tl.load(part_l_ptr + base + j, mask=ok, other=0.0)
        a_j = tl.load(
            part_acc_ptr + (base + j)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0
        )
        m_new = tl.maximum(m_run, tl.max(m_j, axis=0))
        # A chunk of only empty splits leaves m_new at -inf; pin the exponent
        # base to 0 so that -inf - -inf never happens (all weights are then 0).
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_base)
        w = tl.exp2(m_j - m_base)
        l_run = l_run * alpha + tl.sum(w * l_j, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * a_j, axis=0)
        m_run = m_new
    out = acc / l_run
    tl.store(out_ptr + q_row.to(tl.int64) * stride_ot + h * stride_oh + d, out, mask=d_ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits_for(num_seqs: int, num_kv_heads: int, span: int, block_n: int, num_sms: int) -> int:
    """Splits per sequence for a visible span of `span` tokens: enough
    (seq, kv head, split) programs for about four per SM, but no split
    shorter than MIN_SPLIT_TOKENS."""
    programs = max(1, num_seqs * num_kv_heads)
    want = triton.cdiv(4 * num_sms, programs)
    most = max(1, span // max(MIN_SPLIT_TOKENS, block_n))
    return max(1, min(want, most))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    *,
    num_splits: Optional[int] = None,
    config: Optional[DecodeConfig] = None,
) -> torch.Tensor:
    """Attention for a step whose sequences each bring at most one new token.

    q: [T, Hq, D] (unit feature stride), T = number of sequences with one token;
    k_cache, v_cache: [num_blocks, block_size, Hkv, D], same strides, unit
    feature stride, block_size a power of two; the new tokens' K/V already
    written. softcap: scores become softcap * tanh(scores / softcap) before the
    causal and window masks (Gemma 2); None: uncapped. Returns [T, Hq, D] in
    q's dtype. num_splits and config override the heuristics (tests use them
    to force split-K on small shapes).
    meta.max_seq_len only needs to bound every sequence's length (the grid
    depends on it, so a CUDA-graph runner may pass its bucket's bound).
    """
    T, hq, d = q.shape
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    if meta.max_query_len > 1:
        raise ValueError("paged_decode_attention takes only sequences with at most one new token")
    out = torch.empty_like(q)
    if T == 0:
        return out
    cfg = config or decode_config(d, k_cache.dtype)
    span = max(1, min(meta.max_seq_len, sliding_window or NO_WINDOW))  # longest visible span
    if num_splits is None:
        sms = _sm_count(q.device.index or 0) if q.is_cuda else 1
        num_splits = num_splits_for(meta.num_seqs, hkv, span, cfg.block_n, sms)
    split_tokens = triton.cdiv(triton.cdiv(span, num_splits), cfg.block_n) * cfg.block_n
    num_splits = triton.cdiv(span, split_tokens)
    group = hq // hkv
    use_partials = num_splits > 1
    if use_partials:
        part_m = torch.empty((meta.num_seqs, hq, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((meta.num_seqs, hq, num_splits, d), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # never touched: USE_PARTIALS is off
    _decode_kernel[(meta.num_seqs, hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        part_acc,
        part_m,
        part_l,
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables,
        scale * LOG2E,
        sliding_window or NO_WINDOW,
        (softcap or 0.0) * LOG2E,
        split_tokens,
        group,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        meta.block_tables.stride(0),
        part_m.stride(0),
        part_m.stride(1),
        part_m.stride(2),
        BLOCK_SIZE=bs,
        HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(d),
        BLOCK_G=group_tile(group),
        BLOCK_N=cfg.block_n,
        USE_PARTIALS=use_partials,
        SOFTCAP=softcap is not None,
        DOT_PRECISION=dot_precision(k_cache.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if use_partials:
        _reduce_kernel[(meta.num_seqs, hq)](
            out,
            part_acc,
            part_m,
            part_l,
            meta.query_start_loc,
            num_splits,
            out.stride(0),
            out.stride(1),
            part_m.stride(0),
            part_m.stride(1),
            HEAD_DIM=d,
            BLOCK_D=triton.next_power_of_2(d),
            SPLIT_CHUNK=SPLIT_CHUNK,
            num_warps=4,
        )
    return out
