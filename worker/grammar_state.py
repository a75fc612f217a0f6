"""Structured output in the sampler: each constrained request's grammar, from its
compile to the matcher that masks its logits and follows its tokens.

A request's grammar starts compiling on a thread of its own when the request
arrives (protos/grammar.py's GrammarCompiler). Once compiled, an xgrammar
matcher replays the request's outputs so far (non-empty when a preempted
request is rebuilt) and then accepts every token recorded for it. The sampler
samples drafts one position at a time (Sampler.verify), so a draft the grammar
forbids is never accepted and the matcher only ever sees accepted tokens:
nothing is rolled back. Every child of n > 1 is its own request, with its own
matcher.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class GrammarState:
    """One request's grammar: compiling until finish_compile() builds its matcher."""

    def __init__(self, compiling: Future, output_token_ids: Sequence[int]):
        self._compiling = compiling
        self._replay = tuple(output_token_ids)
        self.matcher: Any = None  # xgrammar.GrammarMatcher once compiled
        self.ended = False  # the grammar engine failed on this request: it may only end (EOS)

    def finish_compile(self, timeout: float) -> bool:
        """Build the matcher if the compile is done within timeout; False while it is still
        compiling. Raises ValueError for a grammar that failed to compile or outputs that
        do not fit it. Called until it returns True, not after."""
        try:
            compiled = self._compiling.result(timeout=max(0.0, timeout))
        except TimeoutError:
            return False
        self.matcher = build_matcher(compiled, self._replay)
        self._replay = ()
        return True

    @property
    def complete(self) -> bool:
        return self.ended or self.matcher.is_terminated()

    def accept(self, token: int) -> None:
        # The mask allowed only tokens the grammar accepts, so this fails only for a row
        # the mask left empty (a grammar with a dead end): the request then goes on
        # with its matcher where it was, and its output no longer fits the grammar.
        if not self.complete and not self.matcher.accept_token(token):
            log.warning("a sampled token does not fit its request's grammar: %d", token)


def build_matcher(compiled, output_token_ids: Sequence[int]):
    """A matcher for a compiled grammar that has accepted output_token_ids."""
    import xgrammar

    matcher = xgrammar.GrammarMatcher(compiled)
    for t in output_token_ids:
        if not matcher.accept_token(int(t)):
            raise ValueError("the tokens already generated do not fit the request's grammar")
    return matcher


def mask_by_grammar(x: Tensor, rows: list[int], states: list[GrammarState], eos_token_ids: list[int]) -> Tensor:
    """In place on x [N, V] (a copy of the logits): -inf wherever row rows[i]'s grammar,
    states[i], forbids the token; a complete grammar allows only EOS."""
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(x.shape[0], x.shape[1])
    masked, ended = [], []
    for row, state in zip(rows, states):
        try:
            if not state.complete:
                state.matcher.fill_next_token_bitmask(bitmask, row)
                masked.append(row)
                continue
        except RuntimeError:  # the engine's own failure fails this request alone, below
            log.exception("grammar mask failed; the request ends")
            state.ended = True
        ended.append(row)
    if masked:
        xgrammar.apply_token_bitmask_inplace(x, bitmask.to(x.device), indices=masked)
    if ended:
        # The head may have scheduled one more step before it saw the EOS that
        # completed the grammar; that step's token is dropped.
        ended_rows = torch.tensor(ended, dtype=torch.long, device=x.device)
        x[ended_rows] = float("-inf")
        if eos_token_ids:
            x[ended_rows[:, None], torch.tensor(eos_token_ids[:1], dtype=torch.long, device=x.device)] = 0.0
    return x
