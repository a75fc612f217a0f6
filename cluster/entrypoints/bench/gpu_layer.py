"""What the GPU sections of `folio bench kernels` share: the layer they measure
(a Llama-3-8B attention layer and MLP projections, bf16), inputs built on the
device, and the timer.
"""

from __future__ import annotations

from typing import Callable

import torch

from folio.kernels.metadata import AttentionMetadata
from folio.kernels.quant import QuantizedTensor, QuantizedWeight

HQ, HKV, HEAD_DIM, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16
QUANT_SHAPES = ((28672, 4096), (4096, 14336))  # (N, K): gate_up (wide), down (long K, few N tiles)
QUANT_GROUP = 128


def time_ms(fn: Callable[[], object]) -> float:
    """Median device time of one call, replayed from a CUDA graph."""
    import triton.testing

    fn()  # compile and cache outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def paged_pool(batch: int, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pool holding batch sequences of seq_len tokens in shuffled blocks;
    returns (k_cache, v_cache, block_tables [batch, blocks per seq] int32)."""
    per_seq = -(-seq_len // BLOCK)
    num_blocks = batch * per_seq + 1
    k_cache = torch.randn(num_blocks, BLOCK, HKV, HEAD_DIM, device=device, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    tables = (torch.randperm(num_blocks - 1, device=device) + 1).view(batch, per_seq).int()
    return k_cache, v_cache, tables


def step_metadata(query_lens: list[int], context_lens: list[int], tables: torch.Tensor) -> AttentionMetadata:
    dev = tables.device
    q = torch.tensor(query_lens, dtype=torch.int32, device=dev)
    ctx = torch.tensor(context_lens, dtype=torch.int32, device=dev)
    seq_lens = q + ctx
    starts = torch.zeros(len(query_lens) + 1, dtype=torch.int32, device=dev)
    starts[1:] = torch.cumsum(q, 0)
    slots = torch.cat(
        [
            tables[i].long().repeat_interleave(BLOCK)[c : c + n] * BLOCK + torch.arange(c, c + n, device=dev) % BLOCK
            for i, (n, c) in enumerate(zip(query_lens, context_lens))
        ]
    )
    return AttentionMetadata(
        query_start_loc=starts,
        seq_lens=seq_lens,
        context_lens=ctx,
        block_tables=tables,
        slot_mapping=slots,
        max_query_len=max(query_lens),
        max_seq_len=int(seq_lens.max()),
        query_lens_list=tuple(query_lens),
        seq_lens_list=tuple(int(a + b) for a, b in zip(query_lens, context_lens)),
    )


def random_quantized_weight(n: int, k: int, bits: int, device) -> QuantizedWeight:
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=device)
    unit = 1.0 / ((1 << (bits - 1)) * k**0.5)  # outputs of order 1, as in a model
    scale = (torch.rand(n, k // QUANT_GROUP, device=device) + 0.5) * unit
    zero = torch.randn(n, k // QUANT_GROUP, device=device) * unit
    return QuantizedWeight(QuantizedTensor(codes, scale, zero, bits, QUANT_GROUP), DTYPE, device)


def stored_bytes(w: QuantizedWeight) -> int:
    """Bytes a matmul reads of a kept-quantized weight: codes, scales and zeros."""
    return sum(b.numel() * b.element_size() for b in (w.codes, w.scale, w.zero))
