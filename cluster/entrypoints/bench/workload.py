"""Synthetic request mixes shaped like chat traffic, reproducible from a seed."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class SyntheticRequest:
    prompt_token_ids: list[int]
    output_len: int


def chat_like(
    num_requests: int,
    vocab_size: int,
    seed: int = 0,
    prompt_median: int = 96,
    output_median: int = 64,
    max_prompt: int = 768,
    max_output: int = 320,
) -> list[SyntheticRequest]:
    """Log-normal prompt and output lengths (long right tails, as in chat logs)."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        p = min(max_prompt, max(4, int(rng.lognormvariate(0, 0.8) * prompt_median)))
        o = min(max_output, max(1, int(rng.lognormvariate(0, 0.9) * output_median)))
        ids = [rng.randrange(100, vocab_size - 1) for _ in range(p)]
        out.append(SyntheticRequest(ids, o))
    return out
