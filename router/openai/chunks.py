"""Streamed chunks as plain dicts: exactly what the chunk models of responses.py dump to.

A stream sends a chunk for every engine step of every choice, all of them built on the
head's event loop. Built as models (validated, then dumped), a chunk costs two to three
times what building and encoding the plain dict does; `model_construct` is slower still.
So streams build them here, one function per model, key for key as the model dumps:
the same order, a field without a default always sent (null when it has no value), a
field that defaults to None left out while None.

The models stay the one description of each body (the OpenAPI document is theirs): a
field is added there, and then here, since tests/router/test_openapi_responses.py checks
that every chunk a stream sends is byte for byte what its model dumps to.
"""

from __future__ import annotations

from typing import Optional, Union

# JSON has no -inf (a token the sampling settings ruled out): such a logprob is sent as this
# floor, as OpenAI-compatible servers do, in streamed and whole bodies alike.
LOGPROB_FLOOR = -9999.0


def finite_logprob(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN, too, becomes the floor


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """Usage; cached_tokens: prompt tokens whose K/V came from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


# ---------------------------------------------------------------- /v1/completions


def _chunk(kind: str, envelope: dict, choice: Optional[dict], usage: Optional[dict]) -> dict:
    chunk = {
        "id": envelope["id"],
        "object": kind,
        "created": envelope["created"],
        "model": envelope["model"],
        "choices": [] if choice is None else [choice],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def completion_chunk(envelope: dict, choice: Optional[dict], usage: Optional[dict]) -> dict:
    """CompletionChunk: one choice (completion_choice), or (the last, with include_usage)
    none and the usage."""
    return _chunk("text_completion", envelope, choice, usage)


def completion_choice(
    index: int, text: str, logprobs: Optional[dict], finish_reason: Optional[str], stop_reason: Union[int, str, None]
) -> dict:
    """CompletionChoice; logprobs as completion_logprobs builds them."""
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }


def completion_logprobs(
    tokens: list[str],
    token_logprobs: list[Optional[float]],
    top_logprobs: list[Optional[dict[str, float]]],
    text_offset: list[int],
) -> dict:
    """CompletionLogprobs."""
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


# ---------------------------------------------------------------- /v1/chat/completions


def chat_chunk(envelope: dict, choice: Optional[dict], usage: Optional[dict]) -> dict:
    """ChatCompletionChunk: one choice (chat_chunk_choice), or (the last, with
    include_usage) none and the usage."""
    return _chunk("chat.completion.chunk", envelope, choice, usage)


def chat_chunk_choice(
    index: int, delta: dict, logprobs: Optional[dict], finish_reason: Optional[str], stop_reason: Union[int, str, None]
) -> dict:
    """ChatCompletionChunkChoice; delta as chat_delta builds it, logprobs as chat_logprobs."""
    return {
        "index": index,
        "delta": delta,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }


def chat_delta(role: Optional[str] = None, content: Optional[str] = None, tool_calls: Optional[list] = None) -> dict:
    """ChatCompletionDelta: each key left out while None; tool_calls as tool_call_delta builds them."""
    delta = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    return delta


def tool_call_delta(
    index: int, call_id: Optional[str] = None, name: Optional[str] = None, arguments: Optional[str] = None
) -> dict:
    """ToolCallDelta: the first piece of a call has its id, type and name; later ones argument text."""
    delta: dict = {"index": index}
    if call_id is not None:
        delta["id"] = call_id
        delta["type"] = "function"
    function = {}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    delta["function"] = function
    return delta


def chat_logprobs(content: list[dict]) -> dict:
    """ChatCompletionLogprobs; content as chat_token_logprob builds it."""
    return {"content": content}


def chat_token_logprob(token: str, logprob: float, top_logprobs: list[dict]) -> dict:
    """ChatTokenLogprob; top_logprobs as top_logprob builds them."""
    return {
        "token": token,
        "logprob": finite_logprob(logprob),
        "bytes": list(token.encode("utf-8")),
        "top_logprobs": top_logprobs,
    }


def top_logprob(token: str, logprob: float) -> dict:
    """TopLogprob."""
    return {"token": token, "logprob": finite_logprob(logprob), "bytes": list(token.encode("utf-8"))}
