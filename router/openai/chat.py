"""POST /v1/chat/completions: messages through the chat template, n choices, logprobs
with their top alternatives."""

from __future__ import annotations

import time
from typing import AsyncIterator, Optional, Sequence, Union

from protos.messages import TokenLogprob
from router.engine_client import RequestStream
from router.errors import ApiError
from router.limits import INT32_MAX, check_choices, check_token_ids
from router.openai import chunks, generation
from router.openai.generation import Caller, Choice
from router.openai.prompts import Prompt, chat_token_ids
from router.openai.responses import ChatCompletion, ChatCompletionChoice, ChatCompletionMessage
from router.openai.served_model import ServedModel
from router.openai.sse import DONE, StreamingResult, sse, streaming
from router.protocol import ChatCompletionRequest


class ChatCompletions:
    def __init__(self, model: ServedModel):
        self.model = model

    async def create(self, req: ChatCompletionRequest, caller: Caller) -> Union[ChatCompletion, StreamingResult]:
        model = self.model
        model.check_model(req.model)
        if req.tools and req.tool_choice != "none":
            raise ApiError(400, 'tool calling is not supported; send tool_choice "none"', param="tools")
        for legacy in ("functions", "function_call"):
            if getattr(req, legacy) is not None:
                raise ApiError(400, f"{legacy} is not supported; folio does not call tools yet", param=legacy)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        check_choices(1, req.n or 1)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        # Checked once before the template runs (max_tokens provisional), so a bad field costs nothing.
        model.sampling_params(
            req, max_tokens=INT32_MAX if max_tokens is None else max_tokens, logprobs=logprobs, prompt_logprobs=None
        )
        grammar = await model.grammar(req)
        prompt = Prompt(await chat_token_ids(model, req), None)
        check_token_ids(prompt.token_ids, model.vocab_size, "messages")
        if max_tokens is None:
            # As much as is left of the room one request has: always admissible.
            max_tokens = max(1, model.frontend.max_request_tokens - len(prompt.token_ids))
        params = model.sampling_params(
            req, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=None, grammar=grammar
        )
        choices, streams = generation.submit(model, [prompt], params, caller, req)
        # What the body and every chunk of this response carry alike.
        envelope = dict(id=f"chatcmpl-{caller.display_id}", created=int(time.time()), model=model.model_name)
        if req.stream:
            chunks = self._chunks(req, envelope, prompt, choices, streams)
            return streaming(chunks, streams, model.limits.stream_keepalive_s)

        await generation.finish(choices, streams)
        out = [
            ChatCompletionChoice(
                index=c.index,
                message=ChatCompletionMessage(content=c.output.text),
                logprobs=self._logprobs(c.logprobs) if c.want_logprobs else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in choices
        ]
        return ChatCompletion(**envelope, choices=out, usage=generation.usage([prompt], choices))

    async def _chunks(
        self,
        req: ChatCompletionRequest,
        envelope: dict,
        prompt: Prompt,
        choices: list[Choice],
        streams: list[RequestStream],
    ) -> AsyncIterator[str]:
        opts = req.stream_options
        continuous_usage = opts is not None and bool(opts.continuous_usage_stats)

        def chunk(c: Choice, delta: dict, lps: Optional[list[TokenLogprob]], finished: bool) -> str:
            choice = chunks.chat_chunk_choice(
                c.index,
                delta,
                self._logprobs(lps) if lps is not None else None,
                c.finish_reason if finished else None,
                c.stop_reason if finished else None,
            )
            usage = generation.usage([prompt], choices) if continuous_usage else None
            return sse(chunks.chat_chunk(envelope, choice, usage))

        for c in choices:  # the role first, before any token is ready
            yield chunk(c, chunks.chat_delta(role="assistant", content=""), None, False)
        async for ev in generation.events(choices, streams):
            c = ev.choice
            lps = ev.logprobs if c.want_logprobs else None
            # A choice that ends with no new text ends on an empty delta.
            delta = chunks.chat_delta(content=ev.text) if ev.text or not ev.finished else chunks.chat_delta()
            yield chunk(c, delta, lps, ev.finished)
        if opts is not None and opts.include_usage:
            yield sse(chunks.chat_chunk(envelope, None, generation.usage([prompt], choices)))
        yield DONE

    def _logprobs(self, lps: Sequence[TokenLogprob]) -> dict:
        """ChatCompletionLogprobs of lps' tokens, as a dict (chunks.py): a chunk carries it as
        it is, a body's model validates it."""
        text_of = self.model.token_text
        top_logprob, token_logprob = chunks.top_logprob, chunks.chat_token_logprob
        return chunks.chat_logprobs(
            [
                token_logprob(text_of(t.token_id), t.logprob, [top_logprob(text_of(tok), lp) for tok, lp in t.top])
                for t in lps
            ]
        )
