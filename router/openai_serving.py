"""OpenAI completions and chat on top of the frontend.

Requests become EngineRequests: prompts are tokenized here (a string, a list of
strings, token ids, or a list of token-id lists; chat messages through the
tokenizer's chat template), and each of n choices of each prompt is its own
EngineRequest (router/choices.py, the same rule as the offline LLM), so siblings
share prompt blocks through the prefix cache. RequestOutputs come back as token
ids; each choice's ChoiceOutput makes text and finds stop strings (a stop string
aborts the choice's engine request, since only text reveals it).

Every field is bounded before any work (router/protocol.py, router/limits.py):
text that cannot fit the context is refused before it is tokenized, and
templating and tokenization run on their own threads (router/templating.py).
Engine request ids are folio's own (a uuid): nothing the client names crosses
to the workers. Per output the event loop does work for the new tokens only:
incremental detokenization, logprob entries, one SSE chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Sequence, Union

from protos.messages import RequestOutput, SamplingParams, TokenLogprob
from router.choices import ChoiceOutput, choice_requests
from router.engine_client import EngineClient, NotReady, QueueFull, RequestFailed, RequestStream
from router.errors import ApiError
from router.limits import (
    INT32_MAX,
    Limits,
    check_choices,
    check_text_fits,
    check_token_ids,
    check_top_k,
    logit_bias_ids,
)
from router.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    _Sampling,
)
from router.templating import ChatInput, Templater

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the HTTP edge established it (router/edge.py)."""

    display_id: str  # the response id: the client's x-request-id when printable
    priority_allowed: bool = False  # honour the request's `priority`
    cache_salt: Optional[str] = None  # the API key's prefix-cache salt, if it has one


@dataclass
class _Prompt:
    token_ids: list[int]
    text: Optional[str]  # as the client sent it, or decoded once for echo


@dataclass
class _Choice:
    """One output sequence: the state between its engine outputs and the response."""

    index: int
    prompt: _Prompt
    output: ChoiceOutput  # tokens, text, stop strings, finish
    want_logprobs: bool
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of kept tokens
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None
    started: bool = False
    text_offset: int = 0  # characters streamed so far, for completion logprobs

    @property
    def finish_reason(self) -> Optional[str]:
        return self.output.finish_reason

    @property
    def stop_reason(self) -> Union[int, str, None]:
        return self.output.stop_reason


@dataclass
class _Event:
    """What one engine output changed in one choice."""

    choice: _Choice
    text: str
    logprobs: list[TokenLogprob]
    first: bool
    finished: bool


@dataclass
class StreamingResult:
    """SSE chunks of a streaming response; close() aborts whatever still runs."""

    chunks: AsyncIterator[str]
    streams: list[RequestStream]

    def close(self) -> None:
        for s in self.streams:
            s.cancel()


class OpenAIServing:
    def __init__(
        self, frontend: EngineClient, tokenizer, model_name: str, vocab_size: int, limits: Optional[Limits] = None
    ):
        self.frontend = frontend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.limits = limits or Limits()
        self.max_token_chars = longest_token_chars(tokenizer)
        self.templater = Templater(tokenizer, limits, self.max_chars)
        self._token_text: dict[int, str] = {}

    @property
    def max_chars(self) -> int:
        """The longest text that could still fit the context (see check_text_fits)."""
        return self.frontend.max_model_len * self.max_token_chars

    # ---------------------------------------------------------------- completions
    async def completions(self, req: CompletionRequest, caller: Caller) -> Union[dict, StreamingResult]:
        self._check_model(req.model)
        if req.suffix is not None:
            raise ApiError(400, "suffix is not supported", param="suffix")
        n = req.n or 1
        if req.best_of is not None and req.best_of != n:
            raise ApiError(400, "best_of must equal n (folio returns every sequence it samples)", param="best_of")
        check_choices(len(req.prompt) if _is_prompt_list(req.prompt) else 1, n)
        params = self._sampling_params(
            req,
            max_tokens=16 if req.max_tokens is None else req.max_tokens,
            logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if req.echo else None,
        )
        prompts = await self._completion_prompts(req)
        echo = bool(req.echo)
        choices, streams = self._submit(prompts, params, caller, req)
        rid, created = f"cmpl-{caller.display_id}", int(time.time())

        def choice_logprobs(c: _Choice, lps: list[TokenLogprob], with_prompt: bool) -> dict:
            """Logprobs of lps' tokens, preceded by the prompt's when echoing it."""
            ids = [t.token_id for t in lps]
            entries: list[Optional[TokenLogprob]] = list(lps)
            if with_prompt:
                ids = c.prompt.token_ids + ids
                entries = list(c.prompt_logprobs or [None] * len(c.prompt.token_ids)) + entries
            body, c.text_offset = self._completion_logprobs(ids, entries, c.text_offset)
            return body

        if req.stream:
            opts = req.stream_options

            async def chunks() -> AsyncIterator[str]:
                async for ev in self._events(choices, streams):
                    c = ev.choice
                    text = ev.text
                    with_prompt = echo and ev.first
                    if with_prompt:
                        text = await self._prompt_text(c.prompt) + text
                    chunk = {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": self.model_name,
                        "choices": [
                            {
                                "index": c.index,
                                "text": text,
                                "logprobs": choice_logprobs(c, ev.logprobs, with_prompt) if c.want_logprobs else None,
                                "finish_reason": c.finish_reason if ev.finished else None,
                                "stop_reason": c.stop_reason if ev.finished else None,
                            }
                        ],
                    }
                    if opts is not None and opts.continuous_usage_stats:
                        chunk["usage"] = self._usage(prompts, choices)
                    yield _sse(chunk)
                if opts is not None and opts.include_usage:
                    yield _sse(
                        {
                            "id": rid,
                            "object": "text_completion",
                            "created": created,
                            "model": self.model_name,
                            "choices": [],
                            "usage": self._usage(prompts, choices),
                        }
                    )
                yield "data: [DONE]\n\n"

            return self._streaming(chunks(), streams)

        async for _ in self._events(choices, streams):
            pass
        out = []
        for c in choices:
            text = (await self._prompt_text(c.prompt) if echo else "") + c.output.text
            out.append(
                {
                    "index": c.index,
                    "text": text,
                    "logprobs": choice_logprobs(c, c.logprobs, echo) if c.want_logprobs else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": self.model_name,
            "choices": out,
            "usage": self._usage(prompts, choices),
        }

    async def _completion_prompts(self, req: CompletionRequest) -> list[_Prompt]:
        p = req.prompt
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
        if isinstance(p, str) or (p and isinstance(p[0], str)):
            texts = [p] if isinstance(p, str) else list(p)
            for t in texts:  # all checked before any is tokenized
                check_text_fits(len(t), self.max_chars, self.frontend.max_model_len, "prompt")
            prompts = [_Prompt(await self.templater.encode(t, add_special), t) for t in texts]
        elif not p:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        elif isinstance(p[0], int):
            prompts = [_Prompt(list(p), None)]
        else:
            prompts = [_Prompt(list(ids), None) for ids in p]
        for pr in prompts:
            check_token_ids(pr.token_ids, self.vocab_size, "prompt")
        return prompts

    def _completion_logprobs(
        self, ids: Sequence[int], entries: Sequence[Optional[TokenLogprob]], offset: int
    ) -> tuple[dict, int]:
        """The legacy logprobs object, and the text offset after its tokens."""
        tokens, token_lps, tops, offsets = [], [], [], []
        for tok, e in zip(ids, entries):
            s = self._text_of(tok)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
            if e is None:
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(e.logprob)
            top = {self._text_of(t): lp for t, lp in e.top}
            top.setdefault(s, e.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, offset

    # ---------------------------------------------------------------- chat
    async def chat(self, req: ChatCompletionRequest, caller: Caller) -> Union[dict, StreamingResult]:
        self._check_model(req.model)
        if req.tools and req.tool_choice != "none":
            raise ApiError(400, 'tool calling is not supported; send tool_choice "none"', param="tools")
        if req.response_format is not None and req.response_format.type != "text":
            raise ApiError(
                400, f"response_format {req.response_format.type!r} is not supported", param="response_format"
            )
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        check_choices(1, req.n or 1)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        # Checked once before the template runs (max_tokens provisional), so a bad field costs nothing.
        self._sampling_params(
            req, max_tokens=INT32_MAX if max_tokens is None else max_tokens, logprobs=logprobs, prompt_logprobs=None
        )
        prompt = _Prompt(await self._chat_token_ids(req), None)
        check_token_ids(prompt.token_ids, self.vocab_size, "messages")
        if max_tokens is None:
            # As much as is left of the room one request has: always admissible.
            max_tokens = max(1, self.frontend.max_request_tokens - len(prompt.token_ids))
        params = self._sampling_params(req, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=None)
        choices, streams = self._submit([prompt], params, caller, req)
        rid, created = f"chatcmpl-{caller.display_id}", int(time.time())

        if req.stream:
            opts = req.stream_options

            def chunk(c: _Choice, delta: dict, lps: Optional[list[TokenLogprob]], finished: bool) -> str:
                body = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.model_name,
                    "choices": [
                        {
                            "index": c.index,
                            "delta": delta,
                            "logprobs": self._chat_logprobs(lps) if lps is not None else None,
                            "finish_reason": c.finish_reason if finished else None,
                            "stop_reason": c.stop_reason if finished else None,
                        }
                    ],
                }
                if opts is not None and opts.continuous_usage_stats:
                    body["usage"] = self._usage([prompt], choices)
                return _sse(body)

            async def chunks() -> AsyncIterator[str]:
                for c in choices:  # the role first, before any token is ready
                    yield chunk(c, {"role": "assistant", "content": ""}, None, False)
                async for ev in self._events(choices, streams):
                    c = ev.choice
                    lps = ev.logprobs if c.want_logprobs else None
                    yield chunk(c, {"content": ev.text} if ev.text or not ev.finished else {}, lps, ev.finished)
                if opts is not None and opts.include_usage:
                    yield _sse(
                        {
                            "id": rid,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": self.model_name,
                            "choices": [],
                            "usage": self._usage([prompt], choices),
                        }
                    )
                yield "data: [DONE]\n\n"

            return self._streaming(chunks(), streams)

        async for _ in self._events(choices, streams):
            pass
        out = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.output.text},
                "logprobs": self._chat_logprobs(c.logprobs) if c.want_logprobs else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in choices
        ]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": self.model_name,
            "choices": out,
            "usage": self._usage([prompt], choices),
        }

    async def _chat_token_ids(self, req: Union[ChatCompletionRequest, TokenizeRequest]) -> list[int]:
        """The conversation through the chat template, tokenized; refused before any work when
        its text alone could not fit."""
        messages = [_message_dict(m) for m in req.messages or []]
        check_text_fits(sum(_text_chars(m) for m in messages), self.max_chars, self.frontend.max_model_len, "messages")
        kwargs = dict(getattr(req, "chat_template_kwargs", None) or {})
        template = getattr(req, "chat_template", None)
        if template is None and "chat_template" in kwargs:
            template = kwargs.pop("chat_template")
            if not isinstance(template, str):
                raise ApiError(400, "chat_template must be a string", param="chat_template_kwargs")
        continue_final = bool(getattr(req, "continue_final_message", None))
        add_gen = req.add_generation_prompt
        text = await self.templater.render(
            ChatInput(
                messages,
                add_generation_prompt=(not continue_final) if add_gen is None else add_gen,
                continue_final_message=continue_final,
                tools=getattr(req, "tools", None) or None,
                template=template,
                kwargs=kwargs,
            )
        )
        return await self.templater.encode(text, bool(req.add_special_tokens))

    def _chat_logprobs(self, lps: Sequence[TokenLogprob]) -> dict:
        def entry(tok: int, lp: float) -> dict:
            s = self._text_of(tok)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {
            "content": [
                dict(entry(t.token_id, t.logprob), top_logprobs=[entry(tok, lp) for tok, lp in t.top]) for t in lps
            ]
        }

    # ---------------------------------------------------------------- tokenize
    async def tokenize(self, req: TokenizeRequest) -> dict:
        self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "send either prompt or messages")
        if req.messages is not None:
            ids = await self._chat_token_ids(req)
        else:
            check_text_fits(len(req.prompt), self.max_chars, self.frontend.max_model_len, "prompt")
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await self.templater.encode(req.prompt, add_special)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.frontend.max_model_len}

    async def detokenize(self, req: DetokenizeRequest) -> dict:
        self._check_model(req.model)
        if len(req.tokens) > self.frontend.max_model_len:
            raise ApiError(
                400,
                f"at most {self.frontend.max_model_len} tokens (the maximum context length) can be detokenized at once",
                param="tokens",
            )
        check_token_ids(req.tokens, self.vocab_size, "tokens", allow_empty=True)
        return {"prompt": await self.templater.decode(req.tokens)}

    # ---------------------------------------------------------------- shared
    def _check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(
                404,
                f"the model {name[:64]!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _sampling_params(
        self, req: _Sampling, *, max_tokens: int, logprobs: Optional[int], prompt_logprobs: Optional[int]
    ) -> SamplingParams:
        """The request's sampling fields, checked against the model (the schema bounded the rest)."""

        def pick(value, default):
            return default if value is None else value

        check_top_k(req.top_k, self.vocab_size)
        stop_ids = list(req.stop_token_ids or [])
        check_token_ids(stop_ids, self.vocab_size, "stop_token_ids", allow_empty=True)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            return SamplingParams(
                n=pick(req.n, 1),
                temperature=pick(req.temperature, 1.0),
                top_p=pick(req.top_p, 1.0),
                top_k=pick(req.top_k, 0),
                min_p=pick(req.min_p, 0.0),
                seed=req.seed,
                presence_penalty=pick(req.presence_penalty, 0.0),
                frequency_penalty=pick(req.frequency_penalty, 0.0),
                repetition_penalty=pick(req.repetition_penalty, 1.0),
                logit_bias=logit_bias_ids(req.logit_bias, self.vocab_size),
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                max_tokens=max_tokens,
                min_tokens=pick(req.min_tokens, 0),
                stop=[s for s in stop if s],
                stop_token_ids=stop_ids,
                ignore_eos=bool(req.ignore_eos),
                include_stop_str_in_output=bool(req.include_stop_str_in_output),
                skip_special_tokens=pick(req.skip_special_tokens, True),
            )
        except ValueError as e:
            raise ApiError(400, str(e)) from e

    def _submit(
        self, prompts: list[_Prompt], params: SamplingParams, caller: Caller, req: _Sampling
    ) -> tuple[list[_Choice], list[RequestStream]]:
        """Admit every choice of every prompt, or none of them."""
        room = self.frontend.max_request_tokens
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
                streams.append(self.frontend.generate(request))
                choices.append(
                    _Choice(index, p, ChoiceOutput(self.tokenizer, p.token_ids, params), params.logprobs is not None)
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

    async def _events(self, choices: list[_Choice], streams: list[RequestStream]) -> AsyncIterator[_Event]:
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
                ev = self._apply(c, out, streams[k])
                if ev.finished:
                    remaining -= 1
                if ev.text or ev.logprobs or ev.first or ev.finished:
                    yield ev
        finally:
            for t in tasks:
                t.cancel()
            for s in streams:
                s.cancel()

    def _apply(self, c: _Choice, out: RequestOutput, stream: RequestStream) -> _Event:
        first = not c.started
        c.started = True
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        step = c.output.add(out)
        new_lps = (out.logprobs or [])[: step.kept] if c.want_logprobs else []
        c.logprobs.extend(new_lps)
        if step.stopped:
            stream.cancel()  # only the text knew; free the engine's blocks now
        return _Event(c, c.output.flush(), new_lps, first, step.finished)

    def _usage(self, prompts: list[_Prompt], choices: list[_Choice]) -> dict:
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        completion = sum(len(c.output.tokens) for c in choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    async def _prompt_text(self, p: _Prompt) -> str:
        """The prompt as text, for echo: as sent, or token ids decoded off the event loop."""
        if p.text is None:
            p.text = await self.templater.decode(p.token_ids)
        return p.text

    def _text_of(self, token_id: int) -> str:
        s = self._token_text.get(token_id)
        if s is None:
            s = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return s

    def _streaming(self, chunks: AsyncIterator[str], streams: list[RequestStream]) -> StreamingResult:
        return StreamingResult(_keepalive(_sse_errors(chunks), self.limits.stream_keepalive_s), streams)


def _failure(e: Exception) -> ApiError:
    """What a client learns of a failed request: its own fault (400, the reason), or that
    the cluster could not finish it (503, no internals: the log has them)."""
    if isinstance(e, RequestFailed) and not getattr(e, "retryable", True):
        return ApiError(400, f"the request cannot be served: {e}")
    log.warning("request failed: %s", e)
    return ApiError(
        503, "the replica serving this request failed and it could not be resumed; retry", headers={"Retry-After": "1"}
    )


async def _sse_errors(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once streaming has begun, an error can only be reported inside the stream: every
    failure ends it with an error event and [DONE]."""
    try:
        async for c in chunks:
            yield c
    except ApiError as e:
        yield _sse(e.body())
        yield "data: [DONE]\n\n"
    except Exception:  # noqa: BLE001 - reported to the client without internals, logged here
        log.exception("a stream failed")
        yield _sse(ApiError(500, "internal error while streaming").body())
        yield "data: [DONE]\n\n"


async def _keepalive(chunks: AsyncIterator[str], interval: float) -> AsyncIterator[str]:
    """Pass chunks through; while none comes for `interval` seconds (queued, or a long
    prefill), send an SSE comment so proxies and clients with idle timeouts keep the stream."""
    it = chunks.__aiter__()
    pending: Optional[asyncio.Task] = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield ": keep-alive\n\n"
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield chunk
    finally:
        if pending is not None:  # the client left mid-wait: stop the source first
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await it.aclose()


def _message_dict(m: ChatMessage) -> dict:
    """A chat message as the template sees it: content parts joined into one string."""
    d = m.model_dump(exclude_none=True)
    content = m.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise ApiError(
                    400,
                    f"content parts of type {part.type[:32]!r} are not supported; folio serves text models",
                    param="messages",
                )
            texts.append(part.text)
        content = "\n".join(texts)
    d["content"] = content or ""
    return d


def _text_chars(message: dict) -> int:
    """Characters of a message's strings (content, name, any extra string field)."""
    return sum(len(v) for v in message.values() if isinstance(v, str))


def _is_prompt_list(p) -> bool:
    return isinstance(p, list) and bool(p) and not isinstance(p[0], int)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def new_request_id() -> str:
    return uuid.uuid4().hex


def longest_token_chars(tokenizer) -> int:
    """Characters of the longest token's text: no text longer than n times this is n tokens
    or fewer (a token's stored form is never shorter than the text it decodes to)."""
    vocab = tokenizer.get_vocab()
    return max(8, max(map(len, vocab), default=1))
