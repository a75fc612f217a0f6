"""The paged KV pool of one worker: per layer, K and V block arrays.

Shape per layer: [num_blocks, block_size, num_kv_heads, head_dim] (see
kernels/metadata.py). Block ids come from the head; every tensor-parallel rank
uses the same ids on its own slice of KV heads.

Its size: a block count, a byte budget, or on a GPU what a fraction of the
device's memory leaves after the weights and a worst-case step
(gpu_memory_budget, from a MemoryProfile the worker measures).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GiB = 1 << 30


@dataclass(frozen=True)
class MemoryProfile:
    """A GPU's memory as a worker measured it, weights loaded, before its KV pool exists."""

    total: int  # the device's memory
    in_use: int  # in use on the device (weights, CUDA context, other processes)
    step_peak: int  # what a worst-case step allocates on top, at its peak


def gpu_memory_budget(profile: MemoryProfile, utilization: float, bytes_per_block: int) -> int:
    """Bytes for the KV pool: utilization of the device's memory, less what is in use and
    what a step needs at its peak, in whole blocks. ValueError (saying what took the
    memory) when that is below one block."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    allowed = int(profile.total * utilization)
    budget = allowed - profile.in_use - profile.step_peak
    if budget < bytes_per_block:
        raise ValueError(
            f"no GPU memory left for the KV cache: gpu_memory_utilization {utilization:g} of "
            f"{profile.total / GiB:.2f} GiB allows {allowed / GiB:.2f} GiB, but "
            f"{profile.in_use / GiB:.2f} GiB is in use (weights, CUDA context, other processes) "
            f"and a step of max_num_batched_tokens needs {profile.step_peak / GiB:.2f} GiB more; "
            f"one KV block takes {bytes_per_block / 2**20:.2f} MiB. Raise "
            f"--gpu-memory-utilization, lower --max-num-batched-tokens, or free the GPU"
        )
    return budget // bytes_per_block * bytes_per_block


@dataclass
class KVPool:
    caches: list[tuple[torch.Tensor, torch.Tensor]]
    num_blocks: int
    block_size: int

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem

    @staticmethod
    def allocate(
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> "KVPool":
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        return KVPool(caches, num_blocks, block_size)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.caches)
