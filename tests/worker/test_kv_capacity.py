"""Capacity that is true: the KV pool's size on a GPU (the arithmetic, and the profiling
step it measures, here on CPU; the measurement itself in tests/kernels/test_gpu_kv_pool.py),
and a replica's max_model_len checked against its pool at start (real worker processes)."""

from __future__ import annotations

import argparse
import asyncio
import logging

import pytest
import torch

from folio.cluster.entrypoints.serve import ServeConfig, add_cli_args
from folio.cluster.entrypoints.serve import main as serve_main
from folio.cluster.frontend import Frontend
from folio.cluster.metrics import RequestMetrics
from folio.cluster.replica import Replica, WorkerLoadError
from folio.kernels.quant import amx_granted
from folio.protos import worker_pb2 as pb
from folio.protos.config import SchedulerConfig, WorkerConfig
from folio.protos.messages import EngineRequest, NewRequest, SamplingParams, StepRequest
from folio.worker.kv_pool import GiB, KVPool, MemoryProfile, gpu_memory_budget
from folio.worker.model_runner import ModelRunner
from folio.worker.sampler import Sampler
from folio.worker.worker import Worker, kv_cache_dtype, profile_step
from tests.worker_processes import CREDENTIALS, WorkerProcesses

MiB = 1 << 20


# ------------------------------------------------------------------ the GPU budget, in numbers


def test_the_pool_gets_the_allowed_share_less_what_is_in_use_and_a_steps_peak():
    h100 = MemoryProfile(total=80 * GiB, in_use=17 * GiB, step_peak=3 * GiB)
    assert gpu_memory_budget(h100, 0.9, 2 * MiB) == 52 * GiB  # 72 - 17 - 3
    assert gpu_memory_budget(h100, 1.0, 2 * MiB) == 60 * GiB
    assert gpu_memory_budget(h100, 0.5, 2 * MiB) == 20 * GiB


def test_the_budget_is_whole_blocks():
    profile = MemoryProfile(total=10 * GiB, in_use=GiB, step_peak=GiB // 3)
    per_block = 3 * MiB + 12345
    budget = gpu_memory_budget(profile, 0.9, per_block)
    assert budget % per_block == 0
    assert 0 <= int(10 * GiB * 0.9) - GiB - GiB // 3 - budget < per_block


@pytest.mark.parametrize("in_use,step_peak", [(70 * GiB, 2 * GiB), (72 * GiB - MiB, 0), (80 * GiB, 0)])
def test_no_room_for_one_block_is_refused_saying_why(in_use, step_peak):
    with pytest.raises(ValueError) as e:
        gpu_memory_budget(MemoryProfile(80 * GiB, in_use, step_peak), 0.9, 2 * MiB)
    message = str(e.value)
    assert "gpu_memory_utilization 0.9" in message and "80.00 GiB" in message
    assert f"{in_use / GiB:.2f} GiB is in use" in message and "--gpu-memory-utilization" in message


def test_exactly_one_block_is_enough():
    profile = MemoryProfile(total=100 * MiB, in_use=50 * MiB, step_peak=40 * MiB)
    assert gpu_memory_budget(profile, 1.0, 10 * MiB) == 10 * MiB


@pytest.mark.parametrize("utilization", [0.0, -0.5, 1.01, float("nan"), float("inf")])
def test_utilization_outside_zero_to_one_is_refused(utilization):
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        gpu_memory_budget(MemoryProfile(80 * GiB, GiB, GiB), utilization, MiB)


# ------------------------------------------------------------------ the profiled step


def test_the_profiling_step_is_the_token_budget_in_requests_the_model_can_hold():
    step, blocks = profile_step(600, 256, 16, 384)
    lengths = [r.num_scheduled_tokens for r in step.new_requests]
    assert lengths == [256, 256, 88] and step.num_scheduled_tokens == 600
    assert [len(r.block_ids) for r in step.new_requests] == [16, 16, 6] and blocks == 38
    assert sorted(b for r in step.new_requests for b in r.block_ids) == list(range(38))
    for r in step.new_requests:
        assert r.num_prompt_tokens == len(r.token_ids) == r.num_scheduled_tokens
        assert r.sampling_params.prompt_logprobs is not None  # logits for every token
        assert max(r.token_ids) < 384


def test_the_profiling_step_runs_on_a_worker_model(tiny_model):
    """What the GPU worker measures must be a step its runner accepts and computes in full."""
    worker = Worker(WorkerConfig(model=tiny_model("llama"), num_kv_blocks=4), SchedulerConfig(block_size=16))
    cfg = worker.model_config
    step, blocks = profile_step(300, cfg.max_position_embeddings, 16, cfg.vocab_size)
    pool = KVPool.allocate(cfg.num_layers, blocks, 16, worker.model.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    runner = ModelRunner(worker.model, pool, Sampler(cfg.vocab_size, cfg.eos_token_ids), "cpu")
    result = runner.execute(step)
    assert not result.errors
    assert [len(o.prompt_logprobs) for o in result.outputs] == [255, 43]
    assert all(len(o.token_ids) == 1 for o in result.outputs)


def test_serve_takes_a_gpu_memory_utilization():
    parser = argparse.ArgumentParser()
    add_cli_args(parser.add_subparsers().add_parser("serve"))
    assert ServeConfig().worker.gpu_memory_utilization == 0.9
    assert parser.parse_args(["serve"]).gpu_memory_utilization == 0.9
    assert parser.parse_args(["serve", "--gpu-memory-utilization", "0.5"]).gpu_memory_utilization == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--gpu-memory-utilization", "x"])
    for bad in ("0", "1.5", "nan"):  # refused with a clear line before anything starts
        with pytest.raises(SystemExit, match="gpu_memory_utilization must be above 0 and at most 1"):
            serve_main(parser.parse_args(["serve", "--gpu-memory-utilization", bad]))


# ------------------------------------------------------------------ the pool's dtype

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def test_kv_cache_dtype_auto_is_the_models_but_16_bit_beside_quantized_weights_on_cpu():
    # bf16 where AMX attends to it in bf16; fp16 where attention widens K/V to fp32
    assert kv_cache_dtype("auto", F32, "cpu", kept_quantized=True) == (BF16 if amx_granted() else F16)
    assert kv_cache_dtype("auto", F32, "cpu", kept_quantized=False) == F32
    assert kv_cache_dtype("auto", F32, "reference", kept_quantized=True) == F32  # the references stay exact
    assert kv_cache_dtype("auto", torch.float16, "cpu", kept_quantized=True) == torch.float16
    assert kv_cache_dtype("auto", BF16, "triton", kept_quantized=True) == BF16
    assert kv_cache_dtype("float32", F32, "cpu", kept_quantized=True) == F32
    assert kv_cache_dtype("bfloat16", F32, "cpu", kept_quantized=False) == BF16
    assert kv_cache_dtype("bfloat16", BF16, "triton", kept_quantized=False) == BF16
    with pytest.raises(ValueError, match="--kv-cache-dtype float32 differs from the model's dtype .bfloat16."):
        kv_cache_dtype("float32", BF16, "triton", kept_quantized=False)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, bfloat16, float16"):
        WorkerConfig(kv_cache_dtype="int8")
    assert WorkerConfig(kv_cache_dtype=BF16).kv_cache_dtype == "bfloat16"  # a torch.dtype, by its name


def test_the_bundled_gguf_gets_a_16_bit_pool_of_twice_the_tokens():
    """The default model (weights kept quantized, float32 on CPU) gets a 16-bit pool by
    default (bf16 where AMX attends to it, else fp16): twice the blocks of a float32
    pool in the same bytes. Both serve."""
    pools = {}
    for option in ("auto", "float32"):
        worker = Worker(WorkerConfig(device="cpu", kv_cache_dtype=option, kv_cache_memory=32 * MiB))
        k, v = worker.pool.caches[0]
        assert k.dtype == v.dtype == (kv_cache_dtype("auto", F32, "cpu", True) if option == "auto" else F32)
        assert k.element_size() == (2 if option == "auto" else 4)
        assert worker.pool.nbytes <= 32 * MiB
        pools[option] = worker.num_blocks
        step = StepRequest(
            step_id=1,
            new_requests=[
                NewRequest(
                    "r", list(range(100, 140)), 40, SamplingParams(max_tokens=1, temperature=0), [0, 1, 2], 0, 40
                )
            ],
        )
        result = worker.execute_step(step)
        assert not result.errors and len(result.outputs[0].token_ids) == 1
    assert pools["auto"] // 2 == pools["float32"]  # whole blocks of half the bytes


# ------------------------------------------------------------------ max_model_len against the pool

POOL_BLOCKS = 8  # 128 tokens of KV; the tiny model has 256 positions


async def _start(address: str, model: str, max_model_len: int) -> Replica:
    replica = Replica(
        0,
        [address],
        SchedulerConfig(block_size=16, max_model_len=max_model_len),
        RequestMetrics(),
        credentials=CREDENTIALS,
    )
    try:
        await replica.start(pb.LoadModelRequest(model_path=model, block_size=16, num_blocks=POOL_BLOCKS, device="cpu"))
    except BaseException:
        await replica.close()
        raise
    return replica


async def _capacity_scenarios(addresses: list[str], model: str) -> dict:
    out = {}
    lowered = await _start(addresses[0], model, 0)  # 0: the model's own limit
    try:
        out["lowered"] = lowered.config.max_model_len
        stream = Frontend([lowered], lowered.metrics).generate(
            EngineRequest("r", list(range(3, 23)), SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
        )
        outputs = [o async for o in stream]
        out["generated"] = sum(len(o.new_token_ids) for o in outputs)
        out["finish"] = outputs[-1].finish_reason
    finally:
        await lowered.close()
    with pytest.raises(WorkerLoadError) as e:
        await _start(addresses[1], model, 200)
    out["refused"] = str(e.value)
    fits = await _start(addresses[2], model, 120)
    out["kept"] = fits.config.max_model_len
    await fits.close()
    return out


@pytest.mark.slow
def test_max_model_len_is_lowered_to_the_pool_or_refused_when_set(tiny_model, caplog):
    """A pool of 128 tokens under a 256-position model: the model's limit becomes 128 (with a
    warning) and a request really stops there; --max-model-len 200 refuses to start, 120 is kept."""
    with caplog.at_level(logging.WARNING, logger="folio.cluster.replica"), WorkerProcesses(3) as addresses:
        out = asyncio.run(_capacity_scenarios(addresses, tiny_model("llama")))
    assert out["lowered"] == POOL_BLOCKS * 16
    assert out["generated"] == POOL_BLOCKS * 16 - 20 and out["finish"] == "length"
    assert any("max_model_len lowered from the model's 256 to 128" in r.getMessage() for r in caplog.records)
    assert "max_model_len 200 does not fit the KV cache of 128 tokens" in out["refused"]
    assert out["kept"] == 120
