"""N-gram (prompt lookup) proposals for speculative decoding.

When a sequence's last n tokens occurred earlier in it, the tokens that
followed that earlier occurrence are a cheap guess at what comes next:
summaries quote their source, code edits repeat the code, RAG answers copy
passages. The worker verifies all guesses in one forward pass
(worker/model_runner.py), so a correct guess of k tokens yields k + 1 tokens
for about the price of one decode step, and a wrong one costs only the extra
positions of compute.

Each request keeps an index from every n-gram (prompt_lookup_min <= n <=
prompt_lookup_max) to where its latest occurrence ended. The index is
extended with the tokens that arrived since the last proposal, so the cost
per step follows the new tokens, not the sequence length.
"""

from __future__ import annotations

from typing import Sequence


class NgramIndex:
    """Latest end position of every n-gram of one growing sequence."""

    def __init__(self, min_n: int, max_n: int):  # 1 <= min_n <= max_n: SchedulerConfig checks it
        self.min_n, self.max_n = min_n, max_n
        self._ends: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending before this position are in _ends

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest
        suffix n-gram of `tokens` (which only ever grows between calls)."""
        end = len(tokens)
        # Index every n-gram that ends before the current end: the suffix itself
        # must not match itself.
        for e in range(max(self._indexed, self.min_n), end):
            for n in range(self.min_n, min(self.max_n, e) + 1):
                self._ends[tuple(tokens[e - n : e])] = e
        self._indexed = max(self._indexed, end)
        if k <= 0:
            return []
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            start = self._ends.get(tuple(tokens[end - n : end]))
            if start is not None:
                return list(tokens[start : start + k])
        return []
