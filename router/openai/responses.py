"""Response bodies of the OpenAI API that folio serves, as pydantic models.

The wire format is what the models dump to (`model_dump()`, field order is key
order): a field without a default is always sent, null when it has no value
(`logprobs`, `finish_reason`, `stop_reason`); a field that defaults to None is
left out until it has a value (a chunk's `usage`, a delta's `role` and
`content`). The OpenAPI document states exactly that: serialization schemas
require every field a body always carries, defaults included.

Streams send their chunks as the plain dicts these models dump to, built by
chunks.py (per token, validation would cost more than the encoding); a field
added to a chunk's model is added there too, or tests/router/test_openapi_responses.py
fails.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Response(BaseModel):
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


def _omitted_while_none():
    return Field(default=None, exclude_if=lambda v: v is None)


StopReason = Union[int, str, None]  # the stop token id or stop string that ended the choice (vLLM's field)


class PromptTokensDetails(_Response):
    cached_tokens: int  # prompt tokens whose K/V the prefix cache held


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


# ---------------------------------------------------------------- /v1/completions


class CompletionLogprobs(_Response):
    """The legacy logprobs object: one entry per token; None where the prompt's first
    token has no logprob."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Optional[str]
    stop_reason: StopReason


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Response):
    """One SSE event of a streaming completion: one choice's new text, or (last, with
    include_usage) no choice and the usage."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = _omitted_while_none()


# ---------------------------------------------------------------- /v1/chat/completions


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]  # the token's UTF-8 bytes


class ChatTokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatCompletionLogprobs(_Response):
    content: list[ChatTokenLogprob]


class FunctionCall(_Response):
    name: str
    arguments: str  # JSON text


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]  # None when the message is tool calls
    tool_calls: Optional[list[ToolCall]] = _omitted_while_none()


class ChatCompletionChoice(_Response):
    index: int
    message: ChatCompletionMessage
    logprobs: Optional[ChatCompletionLogprobs]
    finish_reason: Optional[str]
    stop_reason: StopReason


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class FunctionCallDelta(_Response):
    name: Optional[str] = _omitted_while_none()
    arguments: Optional[str] = _omitted_while_none()


class ToolCallDelta(_Response):
    """A call streamed in pieces: the id, type and name come first, then argument text."""

    index: int
    id: Optional[str] = _omitted_while_none()
    type: Optional[Literal["function"]] = _omitted_while_none()
    function: FunctionCallDelta


class ChatCompletionDelta(_Response):
    """What a chunk adds to the message: the role once, first; then text."""

    role: Optional[Literal["assistant"]] = _omitted_while_none()
    content: Optional[str] = _omitted_while_none()
    tool_calls: Optional[list[ToolCallDelta]] = _omitted_while_none()


class ChatCompletionChunkChoice(_Response):
    index: int
    delta: ChatCompletionDelta
    logprobs: Optional[ChatCompletionLogprobs]
    finish_reason: Optional[str]
    stop_reason: StopReason


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Optional[Usage] = _omitted_while_none()


# ---------------------------------------------------------------- /v1/models, /tokenize, /detokenize


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: Literal["folio"] = "folio"
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    tokens: list[int]
    count: int
    max_model_len: int


class TokenizerInfo(_Response):
    tokenizer_class: str
    vocab_size: int
    model_max_length: int  # the served context, not the tokenizer file's own figure
    chat_template: Optional[str] = None
    bos_token: Optional[str] = None
    bos_token_id: Optional[int] = None
    eos_token: Optional[str] = None
    eos_token_id: Optional[int] = None
    pad_token: Optional[str] = None
    pad_token_id: Optional[int] = None
    unk_token: Optional[str] = None
    unk_token_id: Optional[int] = None


class DetokenizeResponse(_Response):
    prompt: str
