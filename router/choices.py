"""A request's choices, one rule for the OpenAI router and the offline LLM alike.

choice_requests turns a request (its prompts and n) into engine requests: choice
`index` = prompt index * n + i, engine id `<request id>#<index>`, and the params
of SamplingParams.for_choice(i) (one sequence, seed + i). ChoiceOutput turns a
choice's engine outputs into its kept tokens, text and finish: stop strings live
here, on the head, because only the text knows them; when one ends a choice,
its caller aborts the engine request to free its blocks at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from folio.protos.messages import EngineRequest, RequestOutput, SamplingParams
from folio.router.detokenizer import Detokenizer


def choice_id(request_id: str, index: int) -> str:
    return f"{request_id}#{index}"


def choice_requests(
    request_id: str,
    prompts: Sequence[list[int]],
    params: SamplingParams,
    *,
    priority: int = 0,
    arrival_time: float = 0.0,
    cache_salt: Optional[str] = None,
) -> list[EngineRequest]:
    """The engine requests of every choice of every prompt, in choice order."""
    return [
        EngineRequest(
            choice_id(request_id, pi * params.n + i),
            list(ids),
            params.for_choice(i),
            priority,
            arrival_time,
            cache_salt=cache_salt,
        )
        for pi, ids in enumerate(prompts)
        for i in range(params.n)
    ]


@dataclass
class ChoiceStep:
    """What one engine output changed in a choice."""

    kept: int  # new tokens kept (a stop string drops those after it)
    stopped: bool  # a stop string ended the choice here: abort its engine request
    finished: bool


class ChoiceOutput:
    """One choice's tokens, text and finish, fed with its engine outputs in order.
    Without a tokenizer there is no text and no stop strings (token ids in, out)."""

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams):
        self.detok = (
            None
            if tokenizer is None
            else Detokenizer(
                tokenizer,
                prompt_token_ids,
                params.stop,
                params.include_stop_str_in_output,
                params.skip_special_tokens,
                params.min_tokens,
            )
        )
        self._tokens: list[int] = []
        self.finish_reason: Optional[str] = None
        self.stop_reason: Union[int, str, None] = None

    @property
    def tokens(self) -> list[int]:
        return self.detok.tokens if self.detok is not None else self._tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, out: RequestOutput) -> ChoiceStep:
        before = len(self.tokens)
        if self.detok is not None:
            stopped = self.detok.add(out.new_token_ids)
        else:
            self._tokens.extend(out.new_token_ids)
            stopped = False
        if stopped:
            self.finish_reason, self.stop_reason = "stop", self.detok.stopped_by
        elif out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
        return ChoiceStep(len(self.tokens) - before, stopped, self.finished)

    def flush(self) -> str:
        """Text not handed out yet; all of it once the choice has finished. (Joining the
        text per step is quadratic: a caller that needs only the end calls this once.)"""
        return self.detok.flush(final=self.finished) if self.detok is not None else ""

    @property
    def text(self) -> str:
        """All text handed out by flush() so far."""
        return self.detok.text if self.detok is not None else ""
