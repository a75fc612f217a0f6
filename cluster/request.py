"""A request as the scheduler tracks it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from folio.cluster.block_manager import BlockHash, hash_blocks, salt_root
from folio.cluster.ngram import NgramIndex
from folio.protos.messages import EngineRequest, SamplingParams, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (Status.FINISHED_STOPPED, Status.FINISHED_LENGTH, Status.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    """Head-side state of one sequence.

    token_ids holds the prompt and every output token known so far.
    num_computed_tokens counts tokens whose KV is (or, once in-flight steps
    finish, will be) in the pool. num_pending counts tokens that in-flight
    steps will sample but whose ids the head has not seen yet, so the
    scheduler can plan the next step before the previous one returns.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    priority: int
    seq: int  # arrival order: FCFS within a priority
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    num_pending: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_keys: list[BlockHash] = field(default_factory=list)  # of known full blocks
    num_published_blocks: int = 0  # leading blocks published to the prefix cache
    num_sent_blocks: int = 0  # leading block ids the worker already has
    epoch: int = 0  # bumped by preemption; stale step results are dropped
    on_worker: bool = False  # the worker caches this request's state
    num_cached_tokens: int = 0  # prefix-cache hit at first admission
    num_preemptions: int = 0
    first_scheduled_time: Optional[float] = None
    stop_reason: Optional[int] = None
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[Optional[TokenLogprob]] = field(default_factory=list)
    ngrams: Optional[NgramIndex] = None  # speculative decoding's draft source, built lazily
    draft_len: int = 0  # drafts to propose next (0: the configured maximum)
    grammar_ready: bool = False  # the worker has sampled this request under its grammar since it last joined
    cache_root: Optional[BlockHash] = None  # parent of the first block's key: the cache salt

    @staticmethod
    def from_engine_request(req: EngineRequest, seq: int) -> "Request":
        return Request(
            request_id=req.request_id,
            token_ids=list(req.prompt_token_ids) + list(req.output_token_ids),
            num_prompt_tokens=len(req.prompt_token_ids),
            params=req.sampling_params,
            priority=req.priority,
            seq=seq,
            cache_root=salt_root(req.cache_salt),
        )

    @property
    def num_tokens(self) -> int:
        """Known tokens plus those in-flight steps will add."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.seq)

    def update_block_keys(self, block_size: int) -> None:
        """Extend the hash chain over full blocks of known tokens (incremental)."""
        done = len(self.block_keys)
        if len(self.token_ids) // block_size > done:
            parent = self.block_keys[-1] if done else self.cache_root
            self.block_keys.extend(hash_blocks(self.token_ids, block_size, done, parent))
