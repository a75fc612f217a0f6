"""Conversion between the dataclasses of protos/messages.py and protobuf.

encode_* turns a dataclass into its protobuf message, decode_* does the
reverse; decode(encode(x)) == x for every message. Optional scalars travel as
proto3 `optional` fields so None survives the trip. Nothing else crosses the
head <-> worker boundary, so these functions are the whole wire contract on
the Python side.
"""

from __future__ import annotations

from folio.protos import worker_pb2 as pb
from folio.protos.config import SchedulerConfig, WorkerConfig
from folio.protos.grammar import Grammar
from folio.protos.messages import (
    CachedRequest,
    NewRequest,
    RequestError,
    SampledRequest,
    SamplingParams,
    StepRequest,
    StepResult,
    TokenLogprob,
)

# ---------------------------------------------------------------- loading


def encode_load_request(worker: WorkerConfig, scheduler: SchedulerConfig) -> pb.LoadModelRequest:
    """The worker's settings, and the two of the scheduler's it reads (block_size lays out
    its pool, max_num_batched_tokens sizes the step it profiles). Placement adds rank,
    world size and rendezvous."""
    return pb.LoadModelRequest(
        model_path=worker.model or "",
        device="" if worker.device == "auto" else worker.device,
        dtype=worker.dtype or "",
        kernels=worker.kernels,
        quantization=worker.quantization,
        speculative_model=worker.speculative_model or "",
        kv_cache_dtype=worker.kv_cache_dtype,
        compile=worker.compile,
        kv_cache_bytes=worker.kv_cache_memory or 0,
        num_blocks=worker.num_kv_blocks or 0,
        gpu_memory_utilization=worker.gpu_memory_utilization,
        block_size=scheduler.block_size,
        max_num_batched_tokens=scheduler.max_num_batched_tokens,
    )


def decode_load_request(m: pb.LoadModelRequest) -> tuple[WorkerConfig, SchedulerConfig]:
    """A field left at 0 or "" takes its default. Raises ValueError for a value out of
    range (a hostile head's as well as a typo)."""
    defaults = SchedulerConfig()
    worker = WorkerConfig(
        model=m.model_path or None,
        device=m.device or "auto",
        dtype=m.dtype or None,
        kernels=m.kernels or "auto",
        quantization=m.quantization or "auto",
        speculative_model=m.speculative_model or None,
        kv_cache_dtype=m.kv_cache_dtype or "auto",
        compile=m.compile or "auto",
        kv_cache_memory=m.kv_cache_bytes or None,
        num_kv_blocks=m.num_blocks or None,
        gpu_memory_utilization=m.gpu_memory_utilization or WorkerConfig.gpu_memory_utilization,
    )
    scheduler = SchedulerConfig(
        block_size=m.block_size or defaults.block_size,
        max_num_batched_tokens=m.max_num_batched_tokens or defaults.max_num_batched_tokens,
    )
    return worker, scheduler


# ---------------------------------------------------------------- sampling


def encode_sampling_params(p: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        n=p.n,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        seed=p.seed,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        logit_bias=p.logit_bias,
        logprobs=p.logprobs,
        prompt_logprobs=p.prompt_logprobs,
        max_tokens=p.max_tokens,
        min_tokens=p.min_tokens,
        stop_token_ids=p.stop_token_ids,
        ignore_eos=p.ignore_eos,
        grammar=None if p.grammar is None else pb.Grammar(kind=p.grammar.kind, spec=p.grammar.spec),
    )


def decode_sampling_params(m: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        n=m.n,
        temperature=m.temperature,
        top_p=m.top_p,
        top_k=m.top_k,
        min_p=m.min_p,
        seed=m.seed if m.HasField("seed") else None,
        presence_penalty=m.presence_penalty,
        frequency_penalty=m.frequency_penalty,
        repetition_penalty=m.repetition_penalty,
        logit_bias=dict(m.logit_bias),
        logprobs=m.logprobs if m.HasField("logprobs") else None,
        prompt_logprobs=m.prompt_logprobs if m.HasField("prompt_logprobs") else None,
        max_tokens=m.max_tokens,
        min_tokens=m.min_tokens,
        stop_token_ids=list(m.stop_token_ids),
        ignore_eos=m.ignore_eos,
        grammar=Grammar(m.grammar.kind, m.grammar.spec) if m.HasField("grammar") else None,
    )


def encode_token_logprob(t: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=t.token_id,
        logprob=t.logprob,
        rank=t.rank,
        top_token_ids=[tok for tok, _ in t.top],
        top_logprobs=[lp for _, lp in t.top],
    )


def decode_token_logprob(m: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        token_id=m.token_id, logprob=m.logprob, rank=m.rank, top=list(zip(m.top_token_ids, m.top_logprobs))
    )


# ---------------------------------------------------------------- step request


def encode_step_request(s: StepRequest) -> pb.StepRequest:
    return pb.StepRequest(
        step_id=s.step_id,
        new_requests=[
            pb.NewRequest(
                request_id=r.request_id,
                token_ids=r.token_ids,
                num_prompt_tokens=r.num_prompt_tokens,
                sampling_params=encode_sampling_params(r.sampling_params),
                block_ids=r.block_ids,
                num_computed_tokens=r.num_computed_tokens,
                num_scheduled_tokens=r.num_scheduled_tokens,
                num_output_tokens=r.num_output_tokens,
            )
            for r in s.new_requests
        ],
        cached_requests=[
            pb.CachedRequest(
                request_id=r.request_id,
                new_block_ids=r.new_block_ids,
                num_computed_tokens=r.num_computed_tokens,
                num_scheduled_tokens=r.num_scheduled_tokens,
                draft_token_ids=r.draft_token_ids,
                num_model_drafts=r.num_model_drafts,
            )
            for r in s.cached_requests
        ],
        finished_ids=s.finished_ids,
    )


def decode_step_request(m: pb.StepRequest) -> StepRequest:
    return StepRequest(
        step_id=m.step_id,
        new_requests=[
            NewRequest(
                request_id=r.request_id,
                token_ids=list(r.token_ids),
                num_prompt_tokens=r.num_prompt_tokens,
                sampling_params=decode_sampling_params(r.sampling_params),
                block_ids=list(r.block_ids),
                num_computed_tokens=r.num_computed_tokens,
                num_scheduled_tokens=r.num_scheduled_tokens,
                num_output_tokens=r.num_output_tokens,
            )
            for r in m.new_requests
        ],
        cached_requests=[
            CachedRequest(
                request_id=r.request_id,
                new_block_ids=list(r.new_block_ids),
                num_computed_tokens=r.num_computed_tokens,
                num_scheduled_tokens=r.num_scheduled_tokens,
                draft_token_ids=list(r.draft_token_ids),
                num_model_drafts=r.num_model_drafts,
            )
            for r in m.cached_requests
        ],
        finished_ids=list(m.finished_ids),
    )


# ---------------------------------------------------------------- step result


def encode_step_result(s: StepResult) -> pb.StepResult:
    return pb.StepResult(
        step_id=s.step_id,
        outputs=[
            pb.SampledRequest(
                request_id=o.request_id,
                token_ids=o.token_ids,
                logprobs=[encode_token_logprob(t) for t in o.logprobs],
                prompt_logprobs=[encode_token_logprob(t) for t in o.prompt_logprobs],
            )
            for o in s.outputs
        ],
        errors=[pb.RequestError(request_id=e.request_id, message=e.message) for e in s.errors],
    )


def decode_step_result(m: pb.StepResult) -> StepResult:
    return StepResult(
        step_id=m.step_id,
        outputs=[
            SampledRequest(
                request_id=o.request_id,
                token_ids=list(o.token_ids),
                logprobs=[decode_token_logprob(t) for t in o.logprobs],
                prompt_logprobs=[decode_token_logprob(t) for t in o.prompt_logprobs],
            )
            for o in m.outputs
        ],
        errors=[RequestError(e.request_id, e.message) for e in m.errors],
    )
