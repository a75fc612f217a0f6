"""Choices as engine requests: admitted together, their outputs merged into one stream.

Each of n choices of each prompt is its own EngineRequest (router/choices.py,
the same rule as the offline LLM), so siblings share prompt blocks through the
prefix cache. Engine request ids are folio's own (a uuid): nothing the client
names crosses to the workers. Outputs come back as token ids; each choice's
ChoiceOutput makes text and finds stop strings (a stop string aborts the
choice's engine request, since only text reveals it).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Union

from folio.protos.messages import RequestOutput, SamplingParams, TokenLogprob
from folio.router.choices import ChoiceOutput, choice_requests
from folio.router.engine_client import NotReady, QueueFull, RequestFailed, RequestStream
from folio.router.errors import ApiError
from folio.router.openai import chunks
from folio.router.openai.prompts import Prompt
from folio.router.openai.served_model import ServedModel
from folio.router.protocol import _Sampling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the HTTP edge established it (router/edge.py)."""

    display_id: str  # the response id: the client's x-request-id when printable
    priority_allowed: bool = False  # honour the request's `priority`
    cache_salt: Optional[str] = None  # the API key's prefix-cache salt, if it has one


@dataclass
class Choice:
    """One output sequence: the state between its engine outputs and the response."""

    index: int
    prompt: Prompt
    output: ChoiceOutput  # tokens, text, stop strings, finish
    want_logprobs: bool
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of kept tokens
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None
    started: bool = False
    text_offset: int = 0  # characters streamed so far, for completion logprobs
    cached_tokens: int = 0  # of its prompt, from the prefix cache when it was first admitted

    @property
    def finish_reason(self) -> Optional[str]:
        return self.output.finish_reason

    @property
    def stop_reason(self) -> Union[int, str, None]:
        return self.output.stop_reason


@dataclass
class Event:
    """What one engine output changed in one choice."""

    choice: Choice
    text: str
    logprobs: list[TokenLogprob]
    first: bool
    finished: bool


def new_request_id() -> str:
    return uuid.uuid4().hex


def submit(
    model: ServedModel, prompts: list[Prompt], params: SamplingParams, caller: Caller, req: _Sampling
) -> tuple[list[Choice], list[RequestStream]]:
    """Admit every choice of every prompt, or none of them."""
    room = model.frontend.max_request_tokens
    for p in prompts:
        need = len(p.token_ids) + params.max_tokens
        if need > room:
            raise ApiError(
                400,
                f"This model's maximum context length is {room} tokens. "
                f"However, you requested {need} tokens ({len(p.token_ids)} in the "
                f"prompt, {params.max_tokens} for the completion). Reduce the "
                "prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
    priority = (req.priority or 0) if caller.priority_allowed else 0
    salt = "\x00".join(s for s in (caller.cache_salt, req.cache_salt) if s) or None
    requests = choice_requests(
        new_request_id(),
        [p.token_ids for p in prompts],
        params,
        priority=priority,
        arrival_time=time.monotonic(),
        cache_salt=salt,
    )
    choices, streams = [], []
    try:
        for index, request in enumerate(requests):
            p = prompts[index // params.n]
            streams.append(model.frontend.generate(request))
            choices.append(
                Choice(index, p, ChoiceOutput(model.tokenizer, p.token_ids, params), params.logprobs is not None)
            )
    except BaseException as e:
        for s in streams:
            s.cancel()
        if isinstance(e, QueueFull):
            raise ApiError(
                429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": str(e.retry_after)}
            ) from e
        if isinstance(e, NotReady):
            raise ApiError(
                503,
                "no replica is ready to serve; retry shortly",
                headers={"Retry-After": str(getattr(e, "retry_after", 5))},
            ) from e
        if isinstance(e, ValueError):
            raise ApiError(400, str(e)) from e
        raise
    return choices, streams


async def events(choices: list[Choice], streams: list[RequestStream]) -> AsyncIterator[Event]:
    """Merge the choices' output streams; end when every choice has finished.

    Leaving early (client gone, error) aborts every choice still running.
    """
    queue: asyncio.Queue[tuple[int, Union[RequestOutput, Exception]]] = asyncio.Queue()

    async def pump(k: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((k, out))
        except RequestFailed as e:
            queue.put_nowait((k, e))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        remaining = len(choices)
        while remaining:
            k, out = await queue.get()
            if isinstance(out, Exception):
                raise _failure(out)
            c = choices[k]
            if c.finish_reason is not None:
                continue  # the abort that follows a stop string
            ev = _apply(c, out, streams[k])
            if ev.finished:
                remaining -= 1
            if ev.text or ev.logprobs or ev.first or ev.finished:
                yield ev
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.cancel()


async def finish(choices: list[Choice], streams: list[RequestStream]) -> None:
    """Run every choice to its end, for a response sent whole."""
    async for _ in events(choices, streams):
        pass


def usage(prompts: list[Prompt], choices: list[Choice], completion: bool = True) -> dict:
    """Usage, as a dict (chunks.py): a chunk carries it as it is, a body's model validates it.
    A prompt's cached tokens are its choices' best hit (n choices share one prompt);
    completion=False counts no output (a prompt scored with echo and max_tokens 0)."""
    cached: dict[int, int] = {}
    for c in choices:
        cached[id(c.prompt)] = max(cached.get(id(c.prompt), 0), c.cached_tokens)
    return chunks.usage(
        sum(len(p.token_ids) for p in prompts),
        sum(len(c.output.tokens) for c in choices) if completion else 0,
        sum(cached.values()),
    )


def _apply(c: Choice, out: RequestOutput, stream: RequestStream) -> Event:
    first = not c.started
    c.started = True
    if out.prompt_logprobs is not None:
        c.prompt_logprobs = out.prompt_logprobs
    c.cached_tokens = max(c.cached_tokens, out.num_cached_tokens)
    step = c.output.add(out)
    new_lps = (out.logprobs or [])[: step.kept] if c.want_logprobs else []
    c.logprobs.extend(new_lps)
    if step.stopped:
        stream.cancel()  # only the text knew; free the engine's blocks now
    return Event(c, c.output.flush(), new_lps, first, step.finished)


def _failure(e: Exception) -> ApiError:
    """What a client learns of a failed request: its own fault (400, the reason), or that
    the cluster could not finish it (503, no internals: the log has them)."""
    if isinstance(e, RequestFailed) and not getattr(e, "retryable", True):
        return ApiError(400, f"the request cannot be served: {e}")
    log.warning("request failed: %s", e)
    return ApiError(
        503, "the replica serving this request failed and it could not be resumed; retry", headers={"Retry-After": "1"}
    )
