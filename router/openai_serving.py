"""OpenAI completions and chat on top of the frontend.

Requests become EngineRequests: prompts are tokenized here (a string, a list of
strings, token ids, or a list of token-id lists; chat messages through the
tokenizer's chat template), and each of n choices of each prompt is its own
EngineRequest (`<id>#<i>`, seed + i), so siblings share prompt blocks through
the prefix cache. RequestOutputs come back as token ids; each choice has a
Detokenizer that makes text and finds stop strings (a stop string aborts the
choice's engine request, since only text reveals it).

Everything runs on the head's event loop. Per output this does work for the
new tokens only: incremental detokenization, logprob entries, one SSE chunk.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Optional, Sequence, Union

from cluster.frontend import Frontend, NotReady, QueueFull, RequestStream
from cluster.replica import RequestFailed
from protos.messages import EngineRequest, RequestOutput, SamplingParams, TokenLogprob
from router.detokenizer import Detokenizer
from router.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest,
                             DetokenizeRequest, TokenizeRequest, _Sampling)


class ApiError(Exception):
    """An error the client sees as an OpenAI error object with this HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


@dataclass
class _Prompt:
    token_ids: list[int]
    text: Optional[str]            # as the client sent it, when it was text


@dataclass
class _Choice:
    """One output sequence: the state between its engine outputs and the response."""
    index: int
    prompt: _Prompt
    detok: Detokenizer
    want_logprobs: bool
    logprobs: list[TokenLogprob] = field(default_factory=list)     # of kept tokens
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None
    started: bool = False
    text_offset: int = 0           # characters streamed so far, for completion logprobs
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


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
    def __init__(self, frontend: Frontend, tokenizer, model_name: str, vocab_size: int):
        self.frontend = frontend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.vocab_size = vocab_size
        self._token_text: dict[int, str] = {}

    # ---------------------------------------------------------------- completions
    async def completions(self, req: CompletionRequest, request_id: str
                          ) -> Union[dict, StreamingResult]:
        self._check_model(req.model)
        if req.suffix is not None:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise ApiError(400, "best_of must equal n (folio returns every sequence it samples)",
                           param="best_of")
        prompts = self._completion_prompts(req)
        echo = bool(req.echo)
        logprobs = req.logprobs
        params = self._sampling_params(
            req, max_tokens=16 if req.max_tokens is None else req.max_tokens, logprobs=logprobs,
            prompt_logprobs=logprobs if echo else None)
        choices, streams = self._submit(prompts, params, request_id, req.priority or 0,
                                        want_logprobs=logprobs is not None)
        rid, created = f"cmpl-{request_id}", int(time.time())

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
                        text = self._prompt_text(c.prompt) + text
                    chunk = {"id": rid, "object": "text_completion", "created": created,
                             "model": self.model_name,
                             "choices": [{"index": c.index, "text": text,
                                          "logprobs": choice_logprobs(c, ev.logprobs, with_prompt)
                                          if c.want_logprobs else None,
                                          "finish_reason": c.finish_reason if ev.finished else None,
                                          "stop_reason": c.stop_reason if ev.finished else None}]}
                    if opts is not None and opts.continuous_usage_stats:
                        chunk["usage"] = self._usage(prompts, choices)
                    yield _sse(chunk)
                if opts is not None and opts.include_usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": created,
                                "model": self.model_name, "choices": [],
                                "usage": self._usage(prompts, choices)})
                yield "data: [DONE]\n\n"
            return StreamingResult(self._sse_errors(chunks()), streams)

        async for _ in self._events(choices, streams):
            pass
        out = []
        for c in choices:
            text = (self._prompt_text(c.prompt) if echo else "") + c.detok.text
            out.append({"index": c.index, "text": text,
                        "logprobs": choice_logprobs(c, c.logprobs, echo) if c.want_logprobs else None,
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": out, "usage": self._usage(prompts, choices)}

    def _completion_prompts(self, req: CompletionRequest) -> list[_Prompt]:
        p = req.prompt
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
        if isinstance(p, str):
            prompts = [_Prompt(self.tokenizer.encode(p, add_special_tokens=add_special), p)]
        elif not p:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        elif isinstance(p[0], str):
            prompts = [_Prompt(self.tokenizer.encode(s, add_special_tokens=add_special), s) for s in p]
        elif isinstance(p[0], int):
            prompts = [_Prompt(list(p), None)]
        else:
            prompts = [_Prompt(list(ids), None) for ids in p]
        for pr in prompts:
            self._check_token_ids(pr.token_ids, "prompt")
        return prompts

    def _completion_logprobs(self, ids: Sequence[int], entries: Sequence[Optional[TokenLogprob]],
                             offset: int) -> tuple[dict, int]:
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
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}, offset

    # ---------------------------------------------------------------- chat
    async def chat(self, req: ChatCompletionRequest, request_id: str) -> Union[dict, StreamingResult]:
        self._check_model(req.model)
        if req.tools and req.tool_choice != "none":
            raise ApiError(400, "tool calling is not supported; send tool_choice \"none\"", param="tools")
        if req.response_format is not None and req.response_format.type != "text":
            raise ApiError(400, f"response_format {req.response_format.type!r} is not supported",
                           param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        prompt = _Prompt(self._apply_chat_template(req), None)
        self._check_token_ids(prompt.token_ids, "messages")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, self.frontend.max_model_len - len(prompt.token_ids))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self._sampling_params(req, max_tokens=max_tokens, logprobs=logprobs,
                                       prompt_logprobs=None)
        choices, streams = self._submit([prompt], params, request_id, req.priority or 0,
                                        want_logprobs=logprobs is not None)
        rid, created = f"chatcmpl-{request_id}", int(time.time())

        if req.stream:
            opts = req.stream_options

            def chunk(c: _Choice, delta: dict, lps: Optional[list[TokenLogprob]], finished: bool) -> str:
                body = {"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": self.model_name,
                        "choices": [{"index": c.index, "delta": delta,
                                     "logprobs": self._chat_logprobs(lps) if lps is not None else None,
                                     "finish_reason": c.finish_reason if finished else None,
                                     "stop_reason": c.stop_reason if finished else None}]}
                if opts is not None and opts.continuous_usage_stats:
                    body["usage"] = self._usage([prompt], choices)
                return _sse(body)

            async def chunks() -> AsyncIterator[str]:
                for c in choices:     # the role first, before any token is ready
                    yield chunk(c, {"role": "assistant", "content": ""}, None, False)
                async for ev in self._events(choices, streams):
                    c = ev.choice
                    lps = ev.logprobs if c.want_logprobs else None
                    yield chunk(c, {"content": ev.text} if ev.text or not ev.finished else {},
                                lps, ev.finished)
                if opts is not None and opts.include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": self.model_name, "choices": [],
                                "usage": self._usage([prompt], choices)})
                yield "data: [DONE]\n\n"
            return StreamingResult(self._sse_errors(chunks()), streams)

        async for _ in self._events(choices, streams):
            pass
        out = [{"index": c.index, "message": {"role": "assistant", "content": c.detok.text},
                "logprobs": self._chat_logprobs(c.logprobs) if c.want_logprobs else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in choices]
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": out, "usage": self._usage([prompt], choices)}

    def _apply_chat_template(self, req: Union[ChatCompletionRequest, TokenizeRequest]) -> list[int]:
        messages = [_message_dict(m) for m in req.messages or []]
        kwargs: dict[str, Any] = dict(getattr(req, "chat_template_kwargs", None) or {})
        continue_final = bool(getattr(req, "continue_final_message", None))
        add_gen = req.add_generation_prompt
        kwargs["add_generation_prompt"] = (not continue_final) if add_gen is None else add_gen
        if continue_final:
            kwargs["continue_final_message"] = True
        if getattr(req, "tools", None):
            kwargs["tools"] = req.tools
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        except Exception as e:     # noqa: BLE001 - template errors are the client's messages' fault
            raise ApiError(400, f"cannot apply the chat template: {e}", param="messages") from e
        return self.tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))

    def _chat_logprobs(self, lps: Sequence[TokenLogprob]) -> dict:
        def entry(tok: int, lp: float) -> dict:
            s = self._text_of(tok)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {"content": [dict(entry(t.token_id, t.logprob),
                                 top_logprobs=[entry(tok, lp) for tok, lp in t.top])
                            for t in lps]}

    # ---------------------------------------------------------------- tokenize
    def tokenize(self, req: TokenizeRequest) -> dict:
        self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "send either prompt or messages")
        if req.messages is not None:
            ids = self._apply_chat_template(req)
        else:
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=add_special)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.frontend.max_model_len}

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self._check_model(req.model)
        self._check_token_ids(req.tokens, "tokens", allow_empty=True)
        return {"prompt": self.tokenizer.decode(req.tokens)}

    # ---------------------------------------------------------------- shared
    def _check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")

    def _check_token_ids(self, ids: Sequence[int], param: str, allow_empty: bool = False) -> None:
        if not ids and not allow_empty:
            raise ApiError(400, "the prompt is empty (it has no tokens)", param=param)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is out of the vocabulary [0, {self.vocab_size})",
                           param=param)

    def _sampling_params(self, req: _Sampling, *, max_tokens: int, logprobs: Optional[int],
                         prompt_logprobs: Optional[int]) -> SamplingParams:
        def pick(value, default):
            return default if value is None else value
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
        except ValueError:
            raise ApiError(400, "logit_bias keys must be token ids", param="logit_bias") from None
        self._check_token_ids(list(bias), "logit_bias", allow_empty=True)
        try:
            return SamplingParams(
                n=pick(req.n, 1), temperature=pick(req.temperature, 1.0), top_p=pick(req.top_p, 1.0),
                top_k=pick(req.top_k, 0), min_p=pick(req.min_p, 0.0), seed=req.seed,
                presence_penalty=pick(req.presence_penalty, 0.0),
                frequency_penalty=pick(req.frequency_penalty, 0.0),
                repetition_penalty=pick(req.repetition_penalty, 1.0),
                logit_bias=bias,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs, max_tokens=max_tokens,
                min_tokens=pick(req.min_tokens, 0), stop=[s for s in stop if s],
                stop_token_ids=list(req.stop_token_ids or []), ignore_eos=bool(req.ignore_eos),
                include_stop_str_in_output=bool(req.include_stop_str_in_output),
                skip_special_tokens=pick(req.skip_special_tokens, True))
        except ValueError as e:
            raise ApiError(400, str(e)) from e

    def _submit(self, prompts: list[_Prompt], params: SamplingParams, request_id: str,
                priority: int, want_logprobs: bool) -> tuple[list[_Choice], list[RequestStream]]:
        """Admit every choice of every prompt, or none of them."""
        limit = self.frontend.max_model_len
        for p in prompts:
            if len(p.token_ids) + params.max_tokens > limit:
                raise ApiError(400, f"This model's maximum context length is {limit} tokens. "
                                    f"However, you requested {len(p.token_ids) + params.max_tokens} "
                                    f"tokens ({len(p.token_ids)} in the prompt, {params.max_tokens} "
                                    f"for the completion). Reduce the prompt or max_tokens.",
                               param="max_tokens")
        choices, streams = [], []
        now = time.monotonic()
        try:
            for pi, p in enumerate(prompts):
                for i in range(params.n):
                    index = pi * params.n + i
                    child = replace(params, n=1,
                                    seed=None if params.seed is None else params.seed + i)
                    streams.append(self.frontend.generate(EngineRequest(
                        f"{request_id}#{index}", p.token_ids, child, priority, now)))
                    choices.append(_Choice(index, p, Detokenizer(
                        self.tokenizer, p.token_ids, child.stop, child.include_stop_str_in_output,
                        child.skip_special_tokens, child.min_tokens), want_logprobs))
        except BaseException as e:
            for s in streams:
                s.cancel()
            if isinstance(e, QueueFull):
                raise ApiError(429, str(e), type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(e.retry_after)}) from e
            if isinstance(e, NotReady):
                raise ApiError(503, str(e), type="service_unavailable") from e
            if isinstance(e, ValueError):
                raise ApiError(400, str(e)) from e
            raise
        return choices, streams

    async def _events(self, choices: list[_Choice], streams: list[RequestStream]
                      ) -> AsyncIterator[_Event]:
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
                    raise ApiError(503, f"the request failed: {out}", type="service_unavailable")
                c = choices[k]
                if c.finish_reason is not None:
                    continue              # the abort that follows a stop string
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
        before = len(c.detok.tokens)
        stopped = c.detok.add(out.new_token_ids)
        kept = len(c.detok.tokens) - before
        new_lps = (out.logprobs or [])[:kept] if c.want_logprobs else []
        c.logprobs.extend(new_lps)
        if stopped:
            c.finish_reason, c.stop_reason = "stop", c.detok.stopped_by
            stream.cancel()               # only the text knew; free the engine's blocks now
        elif out.finished:
            c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
        finished = c.finish_reason is not None
        return _Event(c, c.detok.flush(final=finished), new_lps, first, finished)

    def _usage(self, prompts: list[_Prompt], choices: list[_Choice]) -> dict:
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        completion = sum(len(c.detok.tokens) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def _prompt_text(self, p: _Prompt) -> str:
        return p.text if p.text is not None else self.tokenizer.decode(p.token_ids)

    def _text_of(self, token_id: int) -> str:
        s = self._token_text.get(token_id)
        if s is None:
            s = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return s

    async def _sse_errors(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """Once streaming has begun, an error can only be reported inside the stream."""
        try:
            async for c in chunks:
                yield c
        except ApiError as e:
            yield _sse(e.body())
            yield "data: [DONE]\n\n"


def _message_dict(m: ChatMessage) -> dict:
    """A chat message as the template sees it: content parts joined into one string."""
    d = m.model_dump(exclude_none=True)
    content = m.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"content parts of type {part.type!r} are not supported; "
                                    "folio serves text models", param="messages")
            texts.append(part.text)
        content = "\n".join(texts)
    d["content"] = content or ""
    return d


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def new_request_id() -> str:
    return uuid.uuid4().hex
