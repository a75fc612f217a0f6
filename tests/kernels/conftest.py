"""Kernel tests: without a GPU, Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, i.e.
before folio.kernels.* is imported, so it is set here at collection time. On a
GPU machine it stays unset and test_gpu.py runs the compiled kernels.

The `paged_case` fixture builds one attention step over a paged pool, shared
by the interpreter and the GPU tests.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from folio.kernels import reference  # noqa: E402  (after TRITON_INTERPRET on purpose)
from tests.paged import metadata_for  # noqa: E402


def build_paged_case(
    query_lens, context_lens, *, block_size, num_q_heads, num_kv_heads, head_dim, dtype, device="cpu", seed=0
) -> SimpleNamespace:
    """One step: q for the new tokens, a pool holding every sequence's context
    and (written by reference.write_kv) its new tokens, in shuffled blocks.

    Two copies of the pool: `ref_*_cache` has zeros in every slot no sequence
    holds (what the reference reads safely), `*_cache` has NaN there, so a
    kernel that reads a slot it should mask out returns NaN. Block 0 is never
    handed out: block-table padding points at it.
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    counts = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(counts) + 2
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables, i = [], 0
    for n in counts:
        tables.append(ids[i : i + n])
        i += n
    meta = metadata_for(query_lens, context_lens, tables, block_size, device)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    held = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for blocks, s in zip(tables, seq_lens):
        pos = torch.arange(s)
        held[torch.tensor(blocks, dtype=torch.long)[pos // block_size] * block_size + pos % block_size] = True
    held = held.view(num_blocks, block_size, 1, 1)
    T = sum(query_lens)
    case = SimpleNamespace(
        meta=meta,
        scale=head_dim**-0.5,
        q=randn(T, num_q_heads, head_dim).to(device),
        k_new=randn(T, num_kv_heads, head_dim).to(device),
        v_new=randn(T, num_kv_heads, head_dim).to(device),
    )
    ref_k = torch.where(held, randn(*shape), 0).to(dtype).to(device)
    ref_v = torch.where(held, randn(*shape), 0).to(dtype).to(device)
    reference.write_kv(case.k_new, case.v_new, ref_k, ref_v, meta.slot_mapping)
    held = held.to(device)
    case.ref_k_cache, case.ref_v_cache = ref_k, ref_v
    case.k_cache = torch.where(held, ref_k, float("nan")).to(dtype)
    case.v_cache = torch.where(held, ref_v, float("nan")).to(dtype)
    return case


@pytest.fixture
def paged_case():
    return build_paged_case
