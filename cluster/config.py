"""Configuration of the head-side engine (one replica's scheduler)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one replica's continuous batching."""

    block_size: int = 16
    max_num_seqs: int = 64  # running requests at once
    max_num_batched_tokens: int = 512  # tokens computed per step (chunked prefill above this)
    max_model_len: int = 2048  # prompt + output, per request
    enable_prefix_caching: bool = True
    eos_token_ids: tuple[int, ...] = ()
    # Speculative decoding with n-gram (prompt lookup) drafts; 0 turns it off.
    num_speculative_tokens: int = 0
    prompt_lookup_min: int = 2  # shortest suffix n-gram to look up
    prompt_lookup_max: int = 4  # longest, tried first

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        if self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be non-negative")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"{self.prompt_lookup_min}, {self.prompt_lookup_max}"
            )
