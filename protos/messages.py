"""Messages between router, scheduler and workers, as plain dataclasses.

The step messages follow DESIGN.md: the scheduler sends a worker only what
changed since the previous step. A request is sent in full once (NewRequest);
after that only its new block ids and how many tokens to compute this step
(CachedRequest). The worker keeps each request's token ids and appends the
tokens it samples itself, so sampled tokens never travel head -> worker (draft
tokens for speculative decoding do: they are the head's guesses, to verify).

Invariant shared by both sides: a request is *sampled* in a step when, after
the step, its computed tokens reach its known tokens (num_computed_tokens +
num_scheduled_tokens == len(token_ids) on the worker, drafts counted as known). A chunk of a prefill
that stops short of that samples nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from folio.protos.grammar import Grammar


@dataclass
class SamplingParams:
    """How to sample one request's tokens and when to stop (OpenAI semantics).

    stop, include_stop_str_in_output and skip_special_tokens are the head's
    alone (only text reveals a stop string); they never cross to a worker.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: Optional[int] = None  # top alternatives per sampled token; 0 = sampled token only
    prompt_logprobs: Optional[int] = None  # same, for every prompt token (the first has none)
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    grammar: Optional[Grammar] = None  # what the output must spell (protos/grammar.py)

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self) -> None:
        """Raise ValueError with a client-facing message for out-of-range values."""

        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        check(self.n >= 1, f"n must be at least 1, got {self.n}")
        check(self.temperature >= 0.0, f"temperature must be non-negative, got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, f"top_k must be -1 (disabled) or positive, got {self.top_k}")
        check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(-2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value}")
        check(self.repetition_penalty > 0.0, f"repetition_penalty must be positive, got {self.repetition_penalty}")
        check(self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}")
        check(0 <= self.min_tokens <= self.max_tokens, f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        check(self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}")
        check(
            self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
            f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}",
        )
        for tok, bias in self.logit_bias.items():
            check(-100.0 <= bias <= 100.0, f"logit_bias values must be in [-100, 100], got {bias} for {tok}")
        # A grammar ends its output with EOS once complete; these would forbid that end.
        check(self.grammar is None or not self.ignore_eos, "ignore_eos cannot be combined with a structured output")
        check(self.grammar is None or self.min_tokens == 0, "min_tokens cannot be combined with a structured output")

    def for_choice(self, index: int) -> "SamplingParams":
        """The params of choice `index` of n: one sequence, its own seed (seed + index).

        Seeds wrap around 2**64 into the signed 64-bit range the wire carries, so
        a client may use any signed or unsigned 64-bit seed with any n; the
        sampler reads seeds modulo 2**64, so wrapping changes no draw.
        """
        seed = self.seed
        if seed is not None:
            seed = (seed + index + 2**63) % 2**64 - 2**63
        return replace(self, n=1, seed=seed)

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


# ---------------------------------------------------------------- router <-> cluster


@dataclass
class EngineRequest:
    """One request as the router hands it to the cluster (already tokenized)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    priority: int = 0  # lower runs first; FCFS within a priority
    arrival_time: float = 0.0
    # Outputs it already produced on a replica that then failed: the request resumes
    # after them (they count toward max_tokens and seeds continue from their index).
    output_token_ids: list[int] = field(default_factory=list)
    # Requests hit each other's prefix-cache blocks only when their salts are equal
    # (None included): a tenant's prompts never reveal, by timing, what another sent.
    cache_salt: Optional[str] = None


@dataclass
class TokenLogprob:
    """Logprob of one chosen token plus the top alternatives at that position."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one step produced for one request; streamed back to the router."""

    request_id: str
    new_token_ids: list[int]
    logprobs: Optional[list[TokenLogprob]] = None  # one per new token, when asked
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None  # whole prompt, first is None
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | None
    stop_reason: Optional[int] = None  # the stop token id that ended it
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# ---------------------------------------------------------------- cluster <-> worker


@dataclass
class NewRequest:
    """A request the worker has not seen (or must rebuild after preemption)."""

    request_id: str
    token_ids: list[int]  # prompt, plus outputs so far when resumed
    num_prompt_tokens: int  # where the prompt ends inside token_ids
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # prefix-cache hit: these need no compute
    num_scheduled_tokens: int
    num_output_tokens: int = 0  # outputs inside token_ids (seeded sampling uses it)


@dataclass
class CachedRequest:
    """A request the worker holds: only what changed since its last step.

    With draft_token_ids (speculative decoding) the step computes the last
    known token and the drafts (num_scheduled_tokens = 1 + len(drafts)); the
    worker keeps the drafts its sampler agrees with and reports the tokens it
    accepted, and the head rolls num_computed_tokens back past the rest.
    With num_model_drafts instead, the worker's own draft model proposes that
    many drafts (num_scheduled_tokens = 1 + num_model_drafts); the rest is the same."""

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int  # the head's count before this step; the worker checks it
    num_scheduled_tokens: int
    draft_token_ids: list[int] = field(default_factory=list)
    num_model_drafts: int = 0


@dataclass
class StepRequest:
    """One step for one replica: everything a worker needs, as a diff."""

    step_id: int
    new_requests: list[NewRequest] = field(default_factory=list)
    cached_requests: list[CachedRequest] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)  # drop these first

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(r.num_scheduled_tokens for r in self.new_requests) + sum(
            r.num_scheduled_tokens for r in self.cached_requests
        )


@dataclass
class SampledRequest:
    """What one step produced for one request on the worker."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)  # empty: nothing sampled (partial prefill);
    # more than one when drafts were accepted: the accepted drafts, then one sampled token
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when asked
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    # prompt_logprobs: for each position computed in this step that predicts a
    # prompt token, the logprob of that prompt token (in order).


@dataclass
class RequestError:
    """A request the worker refused or could not run; it fails alone, the step goes on."""

    request_id: str
    message: str


@dataclass
class StepResult:
    step_id: int
    outputs: list[SampledRequest] = field(default_factory=list)
    errors: list[RequestError] = field(default_factory=list)
