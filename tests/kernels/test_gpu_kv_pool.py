"""The KV pool sized from the GPU's memory (--gpu-memory-utilization), on a real GPU:
a worker given a share of the device fills it with KV blocks, a worst-case step still
fits inside the share, and a share smaller than what is already in use is refused.
Skipped without CUDA; the arithmetic is tested on CPU in tests/worker/test_kv_capacity.py.

    pytest tests/kernels/test_gpu_kv_pool.py --confcutdir=tests/kernels
"""

from __future__ import annotations

import gc
import logging

import pytest
import torch

from folio.protos.config import SchedulerConfig, WorkerConfig
from tests.model_fixtures import make_gpu_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEP_TOKENS = 4096


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_gpu_model("llama3-gqa4", tmp_path_factory.mktemp("kv-pool"), num_layers=2)


def _release():
    gc.collect()
    torch.cuda.empty_cache()


def test_a_share_below_what_is_in_use_is_refused(model):
    from folio.worker.worker import Worker

    _release()
    with pytest.raises(ValueError, match="no GPU memory left for the KV cache"):
        Worker(WorkerConfig(model=model, dtype="bfloat16", device="cuda", gpu_memory_utilization=0.001))
    _release()


def test_the_pool_fills_the_share_and_a_worst_case_step_stays_inside_it(model, caplog):
    from folio.worker.worker import Worker, profile_step

    _release()
    utilization = 0.5
    with caplog.at_level(logging.INFO, logger="folio.worker.worker"):
        worker = Worker(
            WorkerConfig(model=model, dtype="bfloat16", device="cuda", gpu_memory_utilization=utilization),
            SchedulerConfig(block_size=16, max_num_batched_tokens=STEP_TOKENS),
        )
    assert any("KV pool from GPU memory" in r.getMessage() for r in caplog.records)
    try:
        free, total = torch.cuda.mem_get_info()
        share = utilization * total
        in_use = total - free
        assert worker.pool.nbytes > 0.3 * total, "the pool should take most of the share"
        assert in_use <= share

        cfg = worker.model_config
        step, _ = profile_step(STEP_TOKENS, cfg.max_position_embeddings, 16, cfg.vocab_size)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
        result = worker.execute_step(step)
        torch.cuda.synchronize()
        assert not result.errors and all(len(o.token_ids) == 1 for o in result.outputs)
        peak = in_use + torch.cuda.max_memory_allocated() - allocated
        assert peak <= share + 0.01 * total, (peak / 2**30, share / 2**30)
        assert share - peak < 0.05 * total, "most of the share should be in use at a step's peak"
    finally:
        del worker
        _release()
