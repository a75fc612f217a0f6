"""POST /v1/completions: prompts as text or token ids, n choices each, echo and the
legacy logprobs object."""

from __future__ import annotations

import time
from typing import AsyncIterator, Optional, Union

from folio.protos.messages import TokenLogprob
from folio.router.engine_client import RequestStream
from folio.router.errors import ApiError
from folio.router.limits import check_choices
from folio.router.openai import chunks, generation
from folio.router.openai.generation import Caller, Choice
from folio.router.openai.prompts import Prompt, completion_prompts, prompt_text
from folio.router.openai.responses import Completion, CompletionChoice
from folio.router.openai.served_model import ServedModel
from folio.router.openai.sse import DONE, StreamingResult, sse, streaming
from folio.router.protocol import CompletionRequest


class Completions:
    def __init__(self, model: ServedModel):
        self.model = model

    async def create(self, req: CompletionRequest, caller: Caller) -> Union[Completion, StreamingResult]:
        model = self.model
        model.check_model(req.model)
        if req.suffix is not None:
            raise ApiError(400, "suffix is not supported", param="suffix")
        n = req.n or 1
        if req.best_of is not None and req.best_of != n:
            raise ApiError(400, "best_of must equal n (folio returns every sequence it samples)", param="best_of")
        check_choices(len(req.prompt) if _is_prompt_list(req.prompt) else 1, n)
        # max_tokens 0 with echo scores the prompt (its logprobs) and generates nothing
        # the client sees: the engine samples one token, which the response leaves out.
        score_only = req.max_tokens == 0
        if score_only and not req.echo:
            raise ApiError(400, "max_tokens 0 needs echo: true (it returns the prompt scored)", param="max_tokens")
        max_tokens = 16 if req.max_tokens is None else max(1, req.max_tokens)
        # every plain field checked before the grammar compiles
        model.sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs, prompt_logprobs=None)
        params = model.sampling_params(
            req,
            max_tokens=max_tokens,
            logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if req.echo else None,
            grammar=await model.grammar(req),
        )
        prompts = await completion_prompts(model, req)
        choices, streams = generation.submit(model, prompts, params, caller, req)
        # What the body and every chunk of this response carry alike.
        envelope = dict(id=f"cmpl-{caller.display_id}", created=int(time.time()), model=model.model_name)
        if req.stream:
            chunks = self._chunks(req, envelope, prompts, choices, streams, score_only)
            return streaming(chunks, streams, model.limits.stream_keepalive_s)

        await generation.finish(choices, streams)
        echo = bool(req.echo)
        out = []
        for c in choices:
            text = (await prompt_text(model, c.prompt) if echo else "") + ("" if score_only else c.output.text)
            logprobs = self._logprobs(c, [] if score_only else c.logprobs, echo) if c.want_logprobs else None
            out.append(
                CompletionChoice(
                    index=c.index,
                    text=text,
                    logprobs=logprobs,
                    finish_reason="length" if score_only else c.finish_reason,
                    stop_reason=None if score_only else c.stop_reason,
                )
            )
        return Completion(**envelope, choices=out, usage=generation.usage(prompts, choices, not score_only))

    async def _chunks(
        self,
        req: CompletionRequest,
        envelope: dict,
        prompts: list[Prompt],
        choices: list[Choice],
        streams: list[RequestStream],
        score_only: bool,
    ) -> AsyncIterator[str]:
        opts = req.stream_options
        continuous_usage = opts is not None and bool(opts.continuous_usage_stats)
        async for ev in generation.events(choices, streams):
            c = ev.choice
            text = "" if score_only else ev.text
            with_prompt = bool(req.echo) and ev.first
            if with_prompt:
                text = await prompt_text(self.model, c.prompt) + text
            lps = [] if score_only else ev.logprobs
            logprobs = self._logprobs(c, lps, with_prompt) if c.want_logprobs else None
            finish, stop = (
                (("length", None) if score_only else (c.finish_reason, c.stop_reason)) if ev.finished else (None, None)
            )
            choice = chunks.completion_choice(c.index, text, logprobs, finish, stop)
            usage = generation.usage(prompts, choices, not score_only) if continuous_usage else None
            yield sse(chunks.completion_chunk(envelope, choice, usage))
        if opts is not None and opts.include_usage:
            yield sse(chunks.completion_chunk(envelope, None, generation.usage(prompts, choices, not score_only)))
        yield DONE

    def _logprobs(self, c: Choice, lps: list[TokenLogprob], with_prompt: bool) -> dict:
        """The legacy logprobs object (CompletionLogprobs, as a dict: chunks.py) of lps'
        tokens, preceded by the prompt's when echoing it; the choice's text offset moves
        past them."""
        ids = [t.token_id for t in lps]
        entries: list[Optional[TokenLogprob]] = list(lps)
        if with_prompt:
            ids = c.prompt.token_ids + ids
            entries = list(c.prompt_logprobs or [None] * len(c.prompt.token_ids)) + entries
        text_of = self.model.token_text
        tokens, token_lps, tops, offsets = [], [], [], []
        for tok, e in zip(ids, entries):
            s = text_of(tok)
            tokens.append(s)
            offsets.append(c.text_offset)
            c.text_offset += len(s)
            if e is None:
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(chunks.finite_logprob(e.logprob))
            top = {text_of(t): chunks.finite_logprob(lp) for t, lp in e.top}
            top.setdefault(s, token_lps[-1])
            tops.append(top)
        return chunks.completion_logprobs(tokens, token_lps, tops, offsets)


def _is_prompt_list(p) -> bool:
    return isinstance(p, list) and bool(p) and not isinstance(p[0], int)
