"""The CPU half of `folio bench kernels`: decode attention over a bf16 paged
pool in the two dtypes folio's CPU path computes it in (kernels/reference.py:
gather the sequences' blocks, then either widen K/V to fp32 for an fp32 SDPA,
or run torch's SDPA in bf16 on them as they are). cpu_paged_attention picks
bf16 where the CPU has AMX; this measures both, and says which it picked.

Shapes are the bundled SmolLM2's attention (9 query heads, 3 KV heads, head
dim 64, blocks of 16 in shuffled order), bf16 pool. Times are the best of
five loops of wall-clock time per call, one layer.

    folio bench kernels          # on a machine without a GPU
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from folio.kernels import reference
from folio.kernels.metadata import attention_metadata
from folio.kernels.quant import amx_granted

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
    q = torch.randn(batch, HQ, HEAD_DIM)  # a float32 model's queries
    scale = HEAD_DIM**-0.5

    def attend(dtype):
        return reference.paged_attention(q, k_cache, v_cache, meta, scale, compute_dtype=dtype)

    fp32_us, bf16_us = _time_us(lambda: attend(torch.float32)), _time_us(lambda: attend(torch.bfloat16))
    err = (attend(torch.float32) - attend(torch.bfloat16)).abs().max()
    return dict(batch=batch, context=context, fp32_us=fp32_us, bf16_us=bf16_us, max_abs_diff=float(err))


def run_cpu_attention_bench() -> list[dict]:
    picked = str(reference.cpu_attention_dtype(DTYPE)).removeprefix("torch.")
    print(
        f"CPU decode attention, {HQ}q/{HKV}kv heads x {HEAD_DIM}, {DTYPE} pool, blocks of {BLOCK}, one layer "
        f"(folio's CPU kernels compute it in {picked} here: AMX {'granted' if amx_granted() else 'absent'})"
    )
    print(f"{'batch':>5} {'context':>7} {'fp32 SDPA':>10} {'bf16 SDPA':>10} {'bf16/fp32':>9} {'max |diff|':>10}")
    rows = []
    with torch.inference_mode():
        for batch, context in CASES:
            r = _case(batch, context)
            rows.append(r)
            print(
                f"{batch:>5} {context:>7} {r['fp32_us']:>7.0f} us {r['bf16_us']:>7.0f} us "
                f"{r['bf16_us'] / r['fp32_us']:>8.2f}x {r['max_abs_diff']:>10.1e}",
                flush=True,
            )
    return rows
