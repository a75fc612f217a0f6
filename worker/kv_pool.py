"""The paged KV pool of one worker: per layer, K and V block arrays.

Shape per layer: [num_blocks, block_size, num_kv_heads, head_dim] (see
kernels/metadata.py). Block ids come from the head; every tensor-parallel rank
uses the same ids on its own slice of KV heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVPool:
    caches: list[tuple[torch.Tensor, torch.Tensor]]
    num_blocks: int
    block_size: int

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                        dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem

    @staticmethod
    def blocks_for_budget(budget_bytes: int, num_layers: int, num_kv_heads: int, head_dim: int,
                          block_size: int, dtype: torch.dtype) -> int:
        """How many blocks a memory budget holds."""
        per = KVPool.bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, dtype)
        n = budget_bytes // per
        if n < 1:
            raise ValueError(f"KV cache budget of {budget_bytes} bytes is below one block ({per} bytes)")
        return int(n)

    @staticmethod
    def allocate(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> "KVPool":
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        caches = [(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)]
        return KVPool(caches, num_blocks, block_size)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.caches)
