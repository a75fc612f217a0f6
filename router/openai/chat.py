"""POST /v1/chat/completions: messages through the chat template, n choices, logprobs
with their top alternatives."""

from __future__ import annotations

import json
import time
from typing import AsyncIterator, Optional, Sequence, Union

from folio.protos.grammar import Grammar
from folio.protos.messages import TokenLogprob
from folio.router.engine_client import RequestStream
from folio.router.errors import ApiError
from folio.router.limits import INT32_MAX, check_choices, check_token_ids
from folio.router.openai import chunks, generation
from folio.router.openai.generation import Caller, Choice
from folio.router.openai.prompts import Prompt, chat_token_ids
from folio.router.openai.responses import ChatCompletion, ChatCompletionChoice, ChatCompletionMessage
from folio.router.openai.served_model import ServedModel
from folio.router.openai.sse import DONE, StreamingResult, sse, streaming
from folio.router.protocol import ChatCompletionRequest
from folio.router.tool_parsers import StreamingToolParser
from folio.router.tool_parsers import parse as parse_tool_calls
from folio.router.tools import (
    ForcedCall,
    GenericReply,
    forced_call,
    generic_reply,
    tool_call,
    tools_prompt,
    wants_auto_calls,
)


class ChatCompletions:
    def __init__(self, model: ServedModel):
        self.model = model

    async def create(self, req: ChatCompletionRequest, caller: Caller) -> Union[ChatCompletion, StreamingResult]:
        model = self.model
        model.check_model(req.model)
        for legacy in ("functions", "function_call"):
            if getattr(req, legacy) is not None:
                raise ApiError(400, f"{legacy} is not supported; send its current form, tools", param=legacy)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        check_choices(1, req.n or 1)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        # Checked once before the template runs (max_tokens provisional), so a bad field costs nothing.
        model.sampling_params(
            req, max_tokens=INT32_MAX if max_tokens is None else max_tokens, logprobs=logprobs, prompt_logprobs=None
        )
        grammar, forced, parser, generic = await self._output_form(req)
        prompt = Prompt(await chat_token_ids(model, req, tools_prompt(req) if generic else None), None)
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
            chunks = self._chunks(req, envelope, prompt, choices, streams, forced or generic, parser)
            return streaming(chunks, streams, model.limits.stream_keepalive_s)

        await generation.finish(choices, streams)
        out = []
        for c in choices:
            message, finish = ChatCompletionMessage(content=c.output.text), c.finish_reason
            if forced is not None and finish == "stop":  # complete: the grammar made it a call
                message, finish = (
                    ChatCompletionMessage(content=None, tool_calls=forced.calls(c.output.text)),
                    "tool_calls",
                )
            elif generic is not None:
                if finish == "stop":  # complete: a JSON object of the reply form
                    content, calls = generic.read(c.output.text)
                else:  # cut short: the answer as far as it went, or the text
                    content, calls = generic.answer_so_far(c.output.text) or c.output.text, []
                message = ChatCompletionMessage(content=content, tool_calls=calls or None)
                finish = "tool_calls" if calls else finish
            elif parser is not None:
                parsed = parse_tool_calls(parser, c.output.text)
                if parsed.calls:
                    calls = [tool_call(p.name, p.arguments) for p in parsed.calls]
                    message = ChatCompletionMessage(content=parsed.content or None, tool_calls=calls)
                    finish = "tool_calls"
            out.append(
                ChatCompletionChoice(
                    index=c.index,
                    message=message,
                    logprobs=self._logprobs(c.logprobs) if c.want_logprobs else None,
                    finish_reason=finish,
                    stop_reason=None if finish == "tool_calls" else c.stop_reason,
                )
            )
        return ChatCompletion(**envelope, choices=out, usage=generation.usage([prompt], choices))

    async def _output_form(
        self, req: ChatCompletionRequest
    ) -> tuple[Optional[Grammar], Optional[ForcedCall], Optional[str], Optional[GenericReply]]:
        """What shapes the reply: its grammar (a structured output, a forced tool call's or
        the generic reply form's), the forced call, the parser that reads a model's own
        "auto" tool calls back, and the generic reply form of a model that has none."""
        model = self.model
        grammar = await model.grammar(req)
        forced = forced_call(req)
        parser = generic = None
        if wants_auto_calls(req):
            parser = model.tool_parser
            if parser == "generic":
                generic = generic_reply(req, _answer_schema(grammar))
                await model.grammars.check(generic.grammar, "tools")
                return generic.grammar, None, None, generic
        if forced is not None:
            if grammar is not None:
                raise ApiError(400, "a forced tool call takes no other output constraint", param="tool_choice")
            await model.grammars.check(forced.grammar, "tool_choice")
            grammar = forced.grammar
        return grammar, forced, parser, generic

    async def _chunks(
        self,
        req: ChatCompletionRequest,
        envelope: dict,
        prompt: Prompt,
        choices: list[Choice],
        streams: list[RequestStream],
        forced: Union[ForcedCall, GenericReply, None],
        parser: Optional[str],
    ) -> AsyncIterator[str]:
        opts = req.stream_options
        continuous_usage = opts is not None and bool(opts.continuous_usage_stats)

        def chunk(c: Choice, delta: dict, lps: Optional[list[TokenLogprob]], finished: bool) -> str:
            finish = c.finish_reason if finished else None
            if finish is not None and (isinstance(forced, ForcedCall) and finish == "stop" or c.index in called):
                finish = "tool_calls"
            choice = chunks.chat_chunk_choice(
                c.index,
                delta,
                self._logprobs(lps) if lps is not None else None,
                finish,
                c.stop_reason if finished and finish != "tool_calls" else None,
            )
            usage = generation.usage([prompt], choices) if continuous_usage else None
            return sse(chunks.chat_chunk(envelope, choice, usage))

        if isinstance(forced, GenericReply):
            calls = {c.index: _StreamedGenericReply(forced) for c in choices}
        else:
            calls = {c.index: _StreamedCall(forced) for c in choices} if forced is not None else {}
        readers = {c.index: StreamingToolParser(parser) for c in choices} if parser is not None else {}
        called: set[int] = set()  # choices that made a call: they finish with "tool_calls"
        for c in choices:  # the role first, before any token is ready
            yield chunk(c, chunks.chat_delta(role="assistant", content=None if calls else ""), None, False)
        async for ev in generation.events(choices, streams):
            c = ev.choice
            lps = ev.logprobs if c.want_logprobs else None
            if readers:
                delta = _read_calls(readers[c.index], ev.text, ev.finished)
                if "tool_calls" in delta:
                    called.add(c.index)
            elif calls:
                delta = calls[c.index].delta(ev.text, ev.finished, ev.finished and c.finish_reason == "stop")
                if delta.get("tool_calls"):
                    called.add(c.index)
            else:
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


class _StreamedCall:
    """One choice's forced tool call as stream deltas. A named function's call opens with
    its id and name, then each piece of text is argument text (cut short by max_tokens,
    it ends unfinished, with finish_reason "length"). "required" calls are sent whole once
    the array is complete, or as content if max_tokens cut it short."""

    def __init__(self, forced: ForcedCall):
        self.forced = forced
        self.text = ""
        self.opened = False

    def delta(self, text: str, finished: bool, complete: bool) -> dict:
        self.text += text
        fn = self.forced.function
        if fn is not None:
            pieces = []
            if not self.opened:
                self.opened = True
                pieces.append(chunks.tool_call_delta(0, tool_call(fn, "")["id"], fn, ""))
            if text:
                pieces.append(chunks.tool_call_delta(0, arguments=text))
            return chunks.chat_delta(tool_calls=pieces) if pieces else chunks.chat_delta()
        if not finished:
            return chunks.chat_delta()
        if not complete:  # cut short: no call to make of it
            return chunks.chat_delta(content=self.text)
        calls = self.forced.calls(self.text)
        return chunks.chat_delta(
            tool_calls=[
                chunks.tool_call_delta(i, call["id"], call["function"]["name"], call["function"]["arguments"])
                for i, call in enumerate(calls)
            ]
        )


class _StreamedGenericReply:
    """One choice's generic reply form as stream deltas. A text answer streams as it is
    generated (GenericReply.answer_so_far). Calls, or an answer in a response_format
    schema, are sent once the JSON object is complete; cut short by max_tokens, such
    an output goes out as content, the text it was."""

    def __init__(self, reply: GenericReply):
        self.reply = reply
        self.text = ""
        self.sent = 0  # characters of the answer sent as content

    def delta(self, text: str, finished: bool, complete: bool) -> dict:
        self.text += text
        if finished and complete:
            content, calls = self.reply.read(self.text)
            if calls:
                return chunks.chat_delta(tool_calls=_whole_calls(calls))
            return chunks.chat_delta(content=content[self.sent :] or None)
        answer = self.reply.answer_so_far(self.text)
        if answer is None:
            return chunks.chat_delta(content=self.text) if finished else chunks.chat_delta()
        piece, self.sent = answer[self.sent :], len(answer)
        return chunks.chat_delta(content=piece or None)


def _whole_calls(calls: list[dict]) -> list[dict]:
    return [
        chunks.tool_call_delta(i, call["id"], call["function"]["name"], call["function"]["arguments"])
        for i, call in enumerate(calls)
    ]


def _answer_schema(grammar: Optional[Grammar]) -> Optional[dict]:
    """The JSON schema an "auto" reply's answer takes from the request's own constraint."""
    if grammar is None:
        return None
    if grammar.kind == "json_schema":
        return json.loads(grammar.spec)
    if grammar.kind == "json_object":
        return {"type": "object"}
    raise ApiError(
        400,
        'with tools and tool_choice "auto", this model replies in JSON: its answer can take a JSON schema '
        f"or json_object, not a {grammar.kind} constraint",
        param="tool_choice",
    )


def _read_calls(reader: StreamingToolParser, text: str, finished: bool) -> dict:
    """The delta of one piece of "auto" output: the content that is settled, and each call
    the model completed, whole (id, name and arguments in one piece)."""
    content, calls = reader.feed(text)
    if finished:
        more, late = reader.finish()
        content, calls = content + more, calls + late
    first = reader.calls_sent - len(calls)
    pieces = [
        chunks.tool_call_delta(first + i, tool_call(c.name, "")["id"], c.name, c.arguments) for i, c in enumerate(calls)
    ]
    return chunks.chat_delta(content=content or None, tool_calls=pieces or None)
