"""The CPU half of `folio bench kernels`: decode attention over the paged pool
as the CPU path computes it (kernels/reference.py: gather the sequences'
blocks, widen 16-bit K/V to fp32, one fp32 SDPA per decode group) against
torch's SDPA run directly in the pool's bfloat16 on the same gathered K/V,
which is what folio did before and what transformers does in bf16.

Shapes are the bundled SmolLM2's attention (9 query heads, 3 KV heads, head
dim 64, blocks of 16 in shuffled order), bf16 pool. Times are the best of
five loops of wall-clock time per call, one layer.

    folio bench kernels          # on a machine without a GPU
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

from folio.kernels import reference
from folio.kernels.metadata import attention_metadata

HQ, HKV, HEAD_DIM, BLOCK = 9, 3, 64, 16
DTYPE = torch.bfloat16
CASES = ((1, 256), (1, 1024), (16, 256), (16, 1024), (64, 256))  # (batch, context)


def _time_us(fn: Callable[[], object], calls: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def _case(batch: int, context: int) -> dict:
    per_seq = -(-context // BLOCK)
    num_blocks = batch * per_seq + 1
    k_cache = torch.randn(num_blocks, BLOCK, HKV, HEAD_DIM, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    tables = (torch.randperm(num_blocks - 1) + 1).view(batch, per_seq).int()
    positions = torch.full((batch,), context - 1, dtype=torch.long)
    meta = attention_metadata(positions, [1] * batch, [context - 1] * batch, tables, BLOCK, "cpu")
    q = torch.randn(batch, HQ, HEAD_DIM, dtype=DTYPE)
    scale = HEAD_DIM**-0.5
    blocks = tables.view(-1).long()

    def bf16_sdpa():
        k = k_cache.index_select(0, blocks).view(batch, -1, HKV, HEAD_DIM)[:, :context].transpose(1, 2)
        v = v_cache.index_select(0, blocks).view(batch, -1, HKV, HEAD_DIM)[:, :context].transpose(1, 2)
        o = F.scaled_dot_product_attention(q.view(batch, HQ, 1, HEAD_DIM), k, v, scale=scale, enable_gqa=True)
        return o.view(batch, HQ, HEAD_DIM)

    folio_us = _time_us(lambda: reference.paged_attention(q, k_cache, v_cache, meta, scale))
    base_us = _time_us(bf16_sdpa)
    err = (reference.paged_attention(q, k_cache, v_cache, meta, scale).float() - bf16_sdpa().float()).abs().max()
    return dict(batch=batch, context=context, folio_us=folio_us, bf16_sdpa_us=base_us, max_abs_diff=float(err))


def run_cpu_attention_bench() -> list[dict]:
    print(f"CPU decode attention, {HQ}q/{HKV}kv heads x {HEAD_DIM}, {DTYPE} pool, blocks of {BLOCK}, one layer")
    print(f"{'batch':>5} {'context':>7} {'folio (fp32 SDPA)':>18} {'bf16 SDPA':>10} {'speedup':>8} {'max |diff|':>10}")
    rows = []
    with torch.inference_mode():
        for batch, context in CASES:
            r = _case(batch, context)
            rows.append(r)
            print(
                f"{batch:>5} {context:>7} {r['folio_us']:>15.0f} us {r['bf16_sdpa_us']:>7.0f} us "
                f"{r['bf16_sdpa_us'] / r['folio_us']:>7.2f}x {r['max_abs_diff']:>10.1e}",
                flush=True,
            )
    return rows
