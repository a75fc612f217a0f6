"""Tensor parallelism on CPU: two worker processes behind real gRPC, one gloo group.

The head side is the real Replica (its per-rank LoadModel and step fan-out);
the reference is the same model on one worker. Greedy tokens must match and
logprobs (log-softmax of the logits, for every prompt position and every
sampled token's top alternatives) must agree within 1e-4 in fp32.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from folio.cluster.metrics import RequestMetrics
from folio.cluster.replica import Replica, WorkerLoadError
from folio.protos import worker_pb2 as pb
from folio.protos.config import SchedulerConfig
from folio.protos.messages import EngineRequest, SamplingParams
from folio.worker.config import ModelConfig
from folio.worker.loader import load_model_config
from folio.worker.models import MODEL_CLASSES
from folio.worker.models.common import RowParallelLinearWithBias
from folio.worker.models.llama import LlamaForCausalLM
from folio.worker.parallel import TPGroup, head_partition
from tests.gguf_fixtures import make_tiny_quantized_gguf
from tests.worker_processes import WorkerProcesses, start_replica

PROMPTS = [[1, 17, 42, 99, 5, 250, 31, 8, 77, 120, 64, 3, 200, 11, 9, 150, 44, 302, 18, 6], [1, 300, 12, 12, 87, 45]]
MAX_TOKENS = 8


async def _generate(addresses: list[str], model_path: str, quantization: str = "auto") -> tuple[list, list, list]:
    """Greedy outputs for PROMPTS on a replica of these workers (rank i at addresses[i]),
    exact fp32 kernels: a row-parallel layer through torch's int4 kernel would round each
    rank's partial sum to bf16 (CPU_OPS), which TP=1 rounds once."""
    config = SchedulerConfig(block_size=16, max_num_seqs=4, max_model_len=0)  # 0: what fits the pool
    replica = await start_replica(addresses, model_path, config, quantization, kernels="reference")
    try:
        return await _outputs(replica)
    finally:
        await replica.close()


async def _outputs(replica: Replica) -> tuple[list, list, list]:
    """-> per prompt: sampled token ids, their TokenLogprobs, the prompt's TokenLogprobs."""
    loop = asyncio.get_running_loop()
    done = [loop.create_future() for _ in PROMPTS]
    outs: list[list] = [[] for _ in PROMPTS]

    def sink(i):
        def put(item):
            outs[i].append(item)
            if getattr(item, "finished", True) and not done[i].done():
                done[i].set_result(None)

        return put

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5, prompt_logprobs=5)
    for i, prompt in enumerate(PROMPTS):
        replica.add_request(EngineRequest(f"r{i}", prompt, params), sink(i))
    await asyncio.wait_for(asyncio.gather(*done), 120)
    tokens = [[t for o in out for t in o.new_token_ids] for out in outs]
    logprobs = [[lp for o in out for lp in (o.logprobs or [])] for out in outs]
    prompt_lps = [[lp for o in out for lp in (o.prompt_logprobs or []) if lp is not None] for out in outs]
    return tokens, logprobs, prompt_lps


def _run(model_path: str, world_size: int, quantization: str = "auto"):
    with WorkerProcesses(world_size) as addresses:
        return asyncio.run(_generate(addresses, model_path, quantization))


def _assert_close(a: list, b: list) -> None:
    """Lists (per request) of TokenLogprob: same tokens and ranks, logprobs within 1e-4."""
    assert len(a) == len(b)
    for xs, ys in zip(a, b):
        assert len(xs) == len(ys) > 0
        for x, y in zip(xs, ys):
            assert x.token_id == y.token_id
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
            assert [v for _, v in x.top] == pytest.approx([v for _, v in y.top], abs=1e-4)


@pytest.mark.slow
# gemma: its single KV head is replicated on both ranks, which split its query heads.
# gpt_neox: regrouped fused q/k/v, biases after row-parallel all-reduces, LayerNorms.
# quantized_gguf: every kept GGUF block type, rows and columns cut before packing.
@pytest.mark.parametrize(
    "family",
    [
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "phi3",
        "gemma3",
        "gemma2",
        "falcon",
        "falcon_new",
        "mixtral",
        "qwen2_moe",
        "smollm2",
        "gemma",
        "gpt_neox",
        "quantized_gguf",
    ],
)
def test_tp2_matches_tp1(family, tiny_model, smollm2, model_dir):
    path = {"smollm2": smollm2, "quantized_gguf": make_tiny_quantized_gguf(model_dir)}.get(family) or tiny_model(family)
    quantization = "gguf" if family == "quantized_gguf" else "auto"
    ref_tokens, ref_lps, ref_prompt = _run(path, 1, quantization)
    tokens, lps, prompt = _run(path, 2, quantization)
    assert tokens == ref_tokens
    assert all(len(t) == MAX_TOKENS for t in tokens)
    _assert_close(lps, ref_lps)
    _assert_close(prompt, ref_prompt)


def _param_bytes(model: torch.nn.Module) -> tuple[int, int]:
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    return sum(sizes), max(sizes)


def _replicated_bytes(model: torch.nn.Module) -> int:
    """Norms, and biases added after a row-parallel all-reduce: whole on every rank."""
    total = 0
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rpartition(".")[0])
        if "norm" in name or (name.endswith(".bias") and isinstance(module, RowParallelLinearWithBias)):
            total += p.numel() * p.element_size()
    return total


@pytest.mark.parametrize(
    "family,embedding",
    [("llama", "model.embed_tokens"), ("qwen2", "model.embed_tokens"), ("gpt_neox", "gpt_neox.embed_in")],
)
def test_each_rank_holds_only_its_shard(family, embedding, tiny_model):
    """Build each rank's shard (construction and loading need no collectives) and weigh it."""
    from folio.worker.loader import _fill, _safetensors_tensors

    path = tiny_model(family)
    cfg = load_model_config(path)
    model_class = MODEL_CLASSES[cfg.architecture]
    full = model_class(cfg)
    _fill(full, _safetensors_tensors(path))
    full_total, full_largest = _param_bytes(full)
    for rank in range(2):
        shard = model_class(cfg, tp=TPGroup(rank, 2))
        _fill(shard, _safetensors_tensors(path))
        total, largest = _param_bytes(shard)
        replicated = _replicated_bytes(shard)
        assert replicated == _replicated_bytes(full)
        # Everything but the replicated norms and biases is split in half.
        assert total - replicated == (full_total - replicated) // 2
        assert largest <= full_largest // 2
        # The shard holds exactly the rows it claims: embedding rows of its vocab half.
        rows = shard.get_submodule(embedding).weight
        full_rows = full.get_submodule(embedding).weight
        assert torch.equal(rows, full_rows[rank * rows.shape[0] : (rank + 1) * rows.shape[0]])


def _cfg(num_q: int, num_kv: int) -> ModelConfig:
    return ModelConfig(
        "llama", 32, num_q * 4, 1, num_q, num_kv, 4, 8, 1e-5, 1e4, None, 64, None, False, False, None, ()
    )


def test_head_partition():
    # SmolLM2's 9 query / 3 KV heads on 2 ranks: whole GQA groups, uneven (2 groups + 1).
    shards = [head_partition(9, 3, TPGroup(r, 2)) for r in range(2)]
    assert [(s.q_start, s.num_q, s.kv_start, s.num_kv) for s in shards] == [(0, 6, 0, 2), (6, 3, 2, 1)]
    # Fewer KV heads than ranks: each KV head replicated on 2 ranks that split its query heads.
    shards = [head_partition(8, 2, TPGroup(r, 4)) for r in range(4)]
    assert [(s.q_start, s.num_q, s.kv_start, s.num_kv) for s in shards] == [
        (0, 2, 0, 1),
        (2, 2, 0, 1),
        (4, 2, 1, 1),
        (6, 2, 1, 1),
    ]


def test_indivisible_heads_are_refused_at_load(tiny_model):
    # 4 query / 2 KV heads over 3 ranks: a KV head cannot be replicated evenly.
    with pytest.raises(ValueError, match="cannot split 4 query / 2 KV heads over 3 tensor-parallel ranks"):
        LlamaForCausalLM(load_model_config(tiny_model("llama")), tp=TPGroup(0, 3))
    with pytest.raises(ValueError, match="cannot split"):
        LlamaForCausalLM(_cfg(6, 2), tp=TPGroup(1, 4))


@pytest.mark.slow
def test_refusal_reaches_the_head(tiny_model):
    """Over gRPC, an impossible split fails LoadModel on every rank with the reason."""
    with WorkerProcesses(3) as addresses:
        with pytest.raises(WorkerLoadError, match="cannot split 4 query / 2 KV heads"):
            asyncio.run(_generate(addresses, tiny_model("llama")))


@pytest.mark.slow
def test_ray_replica_with_two_ranks(tiny_model):
    """launch_replica: one placement group of two bundles, two WorkerActors, rendezvous on rank 0."""
    import ray

    from folio.cluster.placement import ReplicaSpec, launch_replica, release_replica

    path = tiny_model("qwen2")
    ref_tokens, ref_lps, _ = _run(path, 1)
    if not ray.is_initialized():
        from folio.cluster.placement import start_local_ray

        start_local_ray()
    spec = ReplicaSpec(
        load=pb.LoadModelRequest(model_path=path, block_size=16, num_blocks=64, dtype="float32", device="cpu"),
        scheduler=SchedulerConfig(block_size=16, max_num_seqs=4),
        use_gpu=False,
        cpus_per_worker=1,
        worker_host="127.0.0.1",
        tensor_parallel_size=2,
    )

    async def run():
        handle = await launch_replica(0, spec, RequestMetrics())
        try:
            assert len(handle.actors) == 2 and len(handle.replica.addresses) == 2
            assert ray.util.placement_group_table(handle.placement_group)["strategy"] == "STRICT_PACK"
            return await _outputs(handle.replica)
        finally:
            await release_replica(handle)

    tokens, lps, _ = asyncio.run(run())
    assert tokens == ref_tokens
    _assert_close(lps, ref_lps)
