"""Request bodies of the OpenAI API that folio serves, as pydantic models.

Validation is strict about types (a string where a number belongs is a 400,
never silently coerced) and lenient about presence: unknown fields are ignored
and every optional field accepts null, because real clients send `seed: null`
or `logprobs: null` and fields from newer API versions. Range checks live in
SamplingParams.validate(), so the HTTP API and offline generation agree.

Besides the OpenAI fields, the sampling extensions vLLM accepts are here too
(top_k, min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids, ...),
so load tools and evaluation harnesses written for vLLM work unchanged.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: Optional[bool] = None
    continuous_usage_stats: Optional[bool] = None     # vLLM: usage on every chunk


class _Sampling(_Body):
    """Fields completions and chat share."""
    model: Optional[str] = None
    n: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # vLLM extensions
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: Optional[bool] = None
    min_tokens: Optional[int] = None
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: Optional[bool] = None
    include_stop_str_in_output: Optional[bool] = None
    priority: Optional[int] = None


PromptInput = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Sampling):
    """POST /v1/completions."""
    prompt: PromptInput
    max_tokens: Optional[int] = None          # default 16, as OpenAI's
    logprobs: Optional[int] = None            # top alternatives per token (0: chosen only)
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    add_special_tokens: Optional[bool] = None


class ContentPart(BaseModel):
    """One element of a content array; only "text" parts can be served."""
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")    # tool_calls etc. reach the template
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None          # deprecated spelling of max_completion_tokens
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    # vLLM extensions
    add_generation_prompt: Optional[bool] = None
    continue_final_message: Optional[bool] = None
    add_special_tokens: Optional[bool] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


class TokenizeRequest(_Body):
    """POST /tokenize: either a prompt or chat messages."""
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: Optional[bool] = None


class DetokenizeRequest(_Body):
    """POST /detokenize."""
    model: Optional[str] = None
    tokens: list[int]
