"""One worker: a model shard, its paged KV pool, its sampler, and the step loop body.

The head decides everything; a worker applies a StepRequest and returns a
StepResult. The same class runs in-process (offline generation, tests) and
behind the gRPC server (worker/server.py).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from kernels.ops import select_ops
from protos.messages import StepRequest, StepResult
from worker.kv_pool import KVPool
from worker.loader import default_model_path, load_model
from worker.model_runner import ModelRunner
from worker.parallel import TPGroup
from worker.sampler import Sampler

log = logging.getLogger(__name__)

DEFAULT_KV_CACHE_BYTES = 1 << 30


def default_dtype(device: str) -> str:
    """bf16 on a GPU (what serving models ship in), fp32 on CPU (exact against references)."""
    return "bfloat16" if str(device).startswith("cuda") else "float32"


class Worker:
    """One device's worker; with a TPGroup of several ranks, one rank of a replica.

    Every rank of a replica must get the same steps in the same order: the
    model's forward is a collective over the group.
    """

    def __init__(self, model_path: Optional[str] = None, *, block_size: int = 16,
                 num_blocks: Optional[int] = None, kv_cache_bytes: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, device: str = "cpu",
                 tp: Optional[TPGroup] = None, kernels: str = "auto"):
        self.model_path = model_path or default_model_path()
        self.device = torch.device(device)
        self.tp = tp or TPGroup()
        self.model, self.model_config = load_model(self.model_path, dtype=dtype, device=self.device,
                                                   ops=select_ops(self.device, kernels), tp=self.tp)
        cfg = self.model_config
        kv_heads = self.model.num_kv_heads          # this rank's share
        if num_blocks is None:
            num_blocks = KVPool.blocks_for_budget(kv_cache_bytes or DEFAULT_KV_CACHE_BYTES,
                                                  cfg.num_layers, kv_heads, cfg.head_dim,
                                                  block_size, dtype)
        self.pool = KVPool.allocate(cfg.num_layers, num_blocks, block_size, kv_heads,
                                    cfg.head_dim, dtype, self.device)
        self.sampler = Sampler(cfg.vocab_size, cfg.eos_token_ids, device=self.device)
        self.runner = ModelRunner(self.model, self.pool, self.sampler, self.device, tp=self.tp)
        log.info("worker ready: %s, %d KV blocks of %d tokens (%.1f MiB)", self.model_path,
                 num_blocks, block_size, self.pool.nbytes / 2**20)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def execute_step(self, step: StepRequest) -> StepResult:
        return self.runner.execute(step)
