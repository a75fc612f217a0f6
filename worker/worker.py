"""One worker: a model shard, its paged KV pool, its sampler, and the step loop body.

The head decides everything; a worker applies a StepRequest and returns a
StepResult. The same class runs in-process (offline generation, tests) and
behind the gRPC server (worker/server.py).

The KV pool's size: num_kv_blocks, else kv_cache_memory, else on a GPU what
gpu_memory_utilization of the device leaves once the weights are loaded and a
worst-case step (max_num_batched_tokens tokens, all asking for prompt logprobs)
has run and been measured, as vLLM does; on CPU a fixed byte budget.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from folio.kernels.ops import select_ops
from folio.kernels.reference import cpu_attention_dtype
from folio.protos.config import SchedulerConfig, WorkerConfig, default_device, default_dtype
from folio.protos.grammar import GrammarCompiler
from folio.protos.messages import NewRequest, SamplingParams, StepRequest, StepResult
from folio.worker.decode_graph import DecodeGraph
from folio.worker.drafter import load_draft
from folio.worker.heap import loading_heap
from folio.worker.kv_pool import GiB, KVPool, MemoryProfile, gpu_memory_budget
from folio.worker.loader import default_model_path, load_model, load_tokenizer
from folio.worker.model_runner import ModelRunner
from folio.worker.parallel import TPGroup
from folio.worker.sampler import Sampler

log = logging.getLogger(__name__)

DEFAULT_KV_CACHE_BYTES = 1 << 30  # CPU (or a device told no fraction): a fixed budget


class Worker:
    """One device's worker; with a TPGroup of several ranks, one rank of a replica.

    Every rank of a replica must get the same steps in the same order: the
    model's forward is a collective over the group. Of the scheduler's settings
    the worker reads block_size (its pool's layout) and max_num_batched_tokens
    (the step it profiles on a GPU).
    """

    def __init__(
        self,
        config: Optional[WorkerConfig] = None,
        scheduler: Optional[SchedulerConfig] = None,
        *,
        tp: Optional[TPGroup] = None,
    ):
        config, scheduler = config or WorkerConfig(), scheduler or SchedulerConfig()
        self.config = config
        self.model_path = config.model or default_model_path()
        device = config.device if config.device != "auto" else default_device(torch.cuda.is_available())
        self.device = torch.device(device)
        dtype = getattr(torch, config.dtype or default_dtype(device))
        self.tp = tp or TPGroup()
        ops = select_ops(self.device, config.kernels)
        self.draft = None
        with loading_heap():
            self.model, self.model_config = load_model(
                self.model_path,
                dtype=dtype,
                device=self.device,
                ops=ops,
                tp=self.tp,
                quantization=config.quantization,
            )
            if config.speculative_model:
                self.draft = load_draft(
                    config.speculative_model, self.model_path, dtype, self.device, ops, self.tp.rank
                )
        cfg = self.model_config
        kv_dtype = kv_cache_dtype(config.kv_cache_dtype, dtype, ops.name, kept_quantized=bool(cfg.quantization))
        kv_heads = self.model.num_kv_heads  # this rank's share
        block_size, num_blocks, kv_cache_bytes = scheduler.block_size, config.num_kv_blocks, config.kv_cache_memory
        # A draft's pool has as many blocks as the target's, so a block costs both.
        per_block = KVPool.bytes_per_block(cfg.num_layers, kv_heads, cfg.head_dim, block_size, kv_dtype)
        per_block += self.draft.bytes_per_block(block_size) if self.draft else 0
        if num_blocks is None and kv_cache_bytes is None and self.device.type == "cuda":
            kv_cache_bytes = self._kv_bytes_from_gpu_memory(
                config.gpu_memory_utilization, scheduler.max_num_batched_tokens, block_size, kv_dtype, per_block
            )
        if num_blocks is None:
            num_blocks = (kv_cache_bytes or DEFAULT_KV_CACHE_BYTES) // per_block
            if num_blocks < 1:
                raise ValueError(f"KV cache budget of {kv_cache_bytes} bytes is below one block ({per_block} bytes)")
        self.pool = KVPool.allocate(
            cfg.num_layers, num_blocks, block_size, kv_heads, cfg.head_dim, kv_dtype, self.device
        )
        grammars = GrammarCompiler(lambda: load_tokenizer(self.model_path), cfg.vocab_size, cfg.eos_token_ids)
        self.sampler = Sampler(cfg.vocab_size, cfg.eos_token_ids, device=self.device, grammars=grammars)
        drafter = self.draft.drafter(num_blocks, block_size, scheduler.max_num_batched_tokens) if self.draft else None
        self.runner = ModelRunner(
            self.model,
            self.pool,
            self.sampler,
            self.device,
            tp=self.tp,
            drafter=drafter,
            draft_model=bool(self.draft),
            decode_graph=self._decode_graph(config.compile, ops.name, block_size),
        )
        log.info(
            "worker ready: %s (%s weights), %d KV blocks of %d tokens in %s (%.1f MiB)",
            self.model_path,
            self.model_config.quantization or "dense",
            num_blocks,
            block_size,
            str(kv_dtype).removeprefix("torch."),
            self.pool.nbytes / 2**20,
        )

    def _decode_graph(self, option: str, kernels: str, block_size: int) -> Optional[DecodeGraph]:
        """The compiled forward of decode steps (worker/decode_graph.py) where it applies:
        on CPU with folio's CPU kernels (the references are kept exact) and one rank (a
        graph around the collectives of tensor parallelism is not built)."""
        if option == "off" or self.device.type != "cpu" or kernels != "cpu" or self.tp.world_size > 1:
            return None
        if torch._dynamo.config.disable:  # TORCH_COMPILE_DISABLE=1, torch's own switch
            log.info("decode steps stay eager: torch.compile is disabled (TORCH_COMPILE_DISABLE)")
            return None
        graph = DecodeGraph(self.model, self.pool.caches, block_size)
        log.info("compiling decode steps (about two minutes on two cores the first time, cached after)")
        why_not = graph.warm_up()
        if why_not is not None:
            log.warning("decode steps stay eager: %s", why_not)
            return None
        return graph

    def _kv_bytes_from_gpu_memory(
        self, utilization: float, step_tokens: int, block_size: int, dtype: torch.dtype, per_block: int
    ) -> int:
        profile = self._profile_gpu_memory(step_tokens, block_size, dtype)
        budget = gpu_memory_budget(profile, utilization, per_block)
        log.info(
            "KV pool from GPU memory: %g of %.2f GiB, less %.2f GiB in use and %.2f GiB at "
            "the peak of a %d-token step, leaves %.2f GiB: %d blocks of %d tokens",
            utilization,
            profile.total / GiB,
            profile.in_use / GiB,
            profile.step_peak / GiB,
            step_tokens,
            budget / GiB,
            budget // per_block,
            block_size,
        )
        return budget

    def _profile_gpu_memory(self, step_tokens: int, block_size: int, dtype: torch.dtype) -> MemoryProfile:
        """Run one worst-case step on a scratch pool just big enough for it and measure.

        The scratch pool is not part of the step's peak (the real pool replaces it).
        Every tensor-parallel rank runs the same step: the forward is a collective.
        """
        cfg, dev = self.model_config, self.device
        step, blocks = profile_step(step_tokens, cfg.max_position_embeddings, block_size, cfg.vocab_size)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        pool = KVPool.allocate(cfg.num_layers, blocks, block_size, self.model.num_kv_heads, cfg.head_dim, dtype, dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        runner = ModelRunner(self.model, pool, Sampler(cfg.vocab_size, cfg.eos_token_ids, device=dev), dev, tp=self.tp)
        try:
            result = runner.execute(step)
            torch.cuda.synchronize(dev)
        except torch.cuda.OutOfMemoryError as e:
            raise ValueError(
                f"a step of {step_tokens} tokens (max_num_batched_tokens) does not fit "
                f"in GPU memory next to the model; lower --max-num-batched-tokens"
            ) from e
        if result.errors:
            raise RuntimeError(f"the profiling step was refused: {result.errors[0].message}")
        step_peak = torch.cuda.max_memory_allocated(dev) - base
        del runner, pool, result
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        return MemoryProfile(total=total, in_use=total - free, step_peak=step_peak)

    @property
    def speculative_model(self) -> bool:
        return self.draft is not None

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def execute_step(self, step: StepRequest) -> StepResult:
        return self.runner.execute(step)


def kv_cache_dtype(option: str, model_dtype: torch.dtype, kernels: str, kept_quantized: bool) -> torch.dtype:
    """The KV pool's dtype for --kv-cache-dtype. ValueError where the Triton kernels would
    have to attend in another dtype than the model's (their dots take one dtype on both
    sides).

    auto is the model's dtype, except for a float32 model whose weights stay quantized
    on CPU: its matmuls take bfloat16 inputs already (torch's int4 kernel), and a 16-bit
    pool holds twice the tokens, as llama.cpp's default f16 cache does. Which 16 bits
    follows what attends to it (reference.cpu_attention_dtype): where the CPU has AMX,
    bfloat16, attended to in bf16, 15% faster at 16 streams; elsewhere attention widens
    the pool's K/V to float32 (as fast from either), and float16 keeps three more
    mantissa bits than bfloat16 in the same bytes. On 24 chat prompts the bundled model's
    first answer token strayed from the dense fp32 model's logprob by at most 0.07 nats
    over an fp16 pool, 0.12 over a bf16 one (0.04 over fp32), and a bf16 pool flipped its
    0.08-nat tie on "What is the capital of France?" (README, "Quantized weights"). Its
    K and V peak near 26 in magnitude, far inside float16's range (llama.cpp's default
    cache is f16 for every model)."""
    if option == "auto":
        if kept_quantized and kernels == "cpu" and model_dtype == torch.float32:
            bf16_attended_in_bf16 = cpu_attention_dtype(torch.bfloat16) == torch.bfloat16
            return torch.bfloat16 if bf16_attended_in_bf16 else torch.float16
        return model_dtype
    dtype = getattr(torch, option)
    if dtype != model_dtype and kernels == "triton":
        raise ValueError(
            f"--kv-cache-dtype {option} differs from the model's dtype "
            f"({str(model_dtype).removeprefix('torch.')}), which the Triton kernels do not attend across; "
            f"use --kv-cache-dtype auto or --dtype {option}"
        )
    return dtype


def profile_step(num_tokens: int, max_positions: int, block_size: int, vocab_size: int) -> tuple[StepRequest, int]:
    """The most a step can ask of memory: num_tokens prompt tokens (in requests of at most
    max_positions), every one asking for prompt logprobs (logits for all its tokens).
    Returns the step and the number of blocks it uses (ids 0 .. n-1)."""
    requests, blocks = [], 0
    while num_tokens > 0:
        n = min(num_tokens, max_positions)
        need = -(-n // block_size)
        i = len(requests)
        requests.append(
            NewRequest(
                f"profile-{i}",
                [(7 * j + i) % vocab_size for j in range(n)],
                n,
                SamplingParams(max_tokens=1, top_p=0.9, prompt_logprobs=1),
                list(range(blocks, blocks + need)),
                num_computed_tokens=0,
                num_scheduled_tokens=n,
            )
        )
        blocks += need
        num_tokens -= n
    return StepRequest(step_id=0, new_requests=requests), blocks
