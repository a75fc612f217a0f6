"""Request bodies of the OpenAI API that folio serves, as pydantic models.

Validation is strict about types (a string where a number belongs is a 400,
never silently coerced) and lenient about presence: unknown fields are ignored
and every optional field accepts null, because real clients send `seed: null`
or `logprobs: null` and fields from newer API versions. Every field is bounded
here (router/limits.py says why each bound is what it is); floats must be
finite. Bounds that need the model (vocabulary, context length) are checked in
router/openai/ (served_model.py, prompts.py) before tokenizing.

Besides the OpenAI fields, the sampling extensions vLLM accepts are here too
(top_k, min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids, ...),
so load tools and evaluation harnesses written for vLLM work unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from folio.protos.grammar import MAX_SPEC_CHARS
from folio.router import limits as L

Name = Annotated[str, Field(max_length=L.MAX_NAME_CHARS)]
StopString = Annotated[str, Field(max_length=L.MAX_STOP_CHARS)]
TokenId = Annotated[int, Field(ge=0, le=L.INT32_MAX)]
GrammarText = Annotated[str, Field(max_length=MAX_SPEC_CHARS)]
Schema = Union[dict[str, Any], GrammarText]  # a JSON schema, as an object or as JSON text
Choices = Annotated[
    list[Annotated[str, Field(max_length=L.MAX_STOP_CHARS)]], Field(min_length=1, max_length=L.MAX_CHOICES)
]
Count = Annotated[int, Field(ge=0, le=L.INT32_MAX)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class JsonSchemaFormat(_Body):
    name: Optional[Name] = None
    description: Optional[GrammarText] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None  # folio's schemas are always strict: no property the schema does not name


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs (router/structured.py). Unknown keys are refused, not ignored:
    each names a constraint."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    json_: Optional[Schema] = Field(None, alias="json")
    regex: Optional[GrammarText] = None
    choice: Optional[Choices] = None
    grammar: Optional[GrammarText] = None
    json_object: Optional[bool] = None
    whitespace_pattern: Optional[GrammarText] = None
    structural_tag: Optional[Any] = None
    # What these ask for is what folio always does: no fallback to unconstrained
    # decoding, no free whitespace, no properties a schema does not name.
    disable_fallback: Optional[bool] = None
    disable_any_whitespace: Optional[bool] = None
    disable_additional_properties: Optional[bool] = None


class StreamOptions(_Body):
    include_usage: Optional[bool] = None
    continuous_usage_stats: Optional[bool] = None  # vLLM: usage on every chunk


class _Sampling(_Body):
    """Fields completions and chat share."""

    model: Optional[Name] = None
    n: Optional[int] = Field(None, ge=1, le=L.MAX_N)
    temperature: Optional[float] = Field(None, ge=0.0, le=L.MAX_TEMPERATURE)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=L.SEED_MIN, le=L.SEED_MAX)
    stop: Union[StopString, Annotated[list[StopString], Field(max_length=L.MAX_STOP)], None] = None
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    logit_bias: Optional[
        Annotated[
            dict[
                Annotated[str, Field(max_length=16)],
                Annotated[float, Field(ge=-L.MAX_LOGIT_BIAS_VALUE, le=L.MAX_LOGIT_BIAS_VALUE)],
            ],
            Field(max_length=L.MAX_LOGIT_BIAS),
        ]
    ] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    user: Optional[Name] = None
    # vLLM extensions
    top_k: Optional[int] = Field(None, ge=-1, le=L.INT32_MAX)  # <= the vocabulary, checked later
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=L.MAX_REPETITION_PENALTY)
    ignore_eos: Optional[bool] = None
    min_tokens: Optional[Count] = None
    stop_token_ids: Optional[Annotated[list[TokenId], Field(max_length=L.MAX_STOP_TOKEN_IDS)]] = None
    skip_special_tokens: Optional[bool] = None
    include_stop_str_in_output: Optional[bool] = None
    # Honoured only when the operator allows it (--enable-priority or the API key's setting).
    priority: Optional[int] = Field(None, ge=-L.INT32_MAX, le=L.INT32_MAX)
    # Keeps this request's prefix-cache entries apart from requests without the same salt.
    cache_salt: Optional[Annotated[str, Field(min_length=1, max_length=L.MAX_NAME_CHARS)]] = None
    # Structured output (router/structured.py): OpenAI's field, then vLLM's.
    response_format: Optional[ResponseFormat] = None
    guided_json: Optional[Schema] = None
    guided_regex: Optional[GrammarText] = None
    guided_choice: Optional[Choices] = None
    guided_grammar: Optional[GrammarText] = None
    guided_decoding_backend: Optional[Name] = None
    guided_whitespace_pattern: Optional[GrammarText] = None
    structured_outputs: Optional[StructuredOutputs] = None


PromptInput = Union[
    str,
    Annotated[list[str], Field(min_length=1, max_length=L.MAX_PROMPTS)],
    list[int],
    Annotated[list[list[int]], Field(min_length=1, max_length=L.MAX_PROMPTS)],
]


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: PromptInput
    max_tokens: Optional[int] = Field(None, ge=0, le=L.INT32_MAX)  # default 16, as OpenAI's; 0 with echo scores
    logprobs: Optional[int] = Field(None, ge=0, le=L.MAX_LOGPROBS)  # alternatives per token (0: chosen only)
    echo: Optional[bool] = None
    best_of: Optional[int] = Field(None, ge=1, le=L.MAX_N)
    suffix: Optional[str] = None
    add_special_tokens: Optional[bool] = None


class ContentPart(BaseModel):
    """One element of a content array; only "text" parts can be served."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: Name
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # tool_calls etc. reach the template
    role: Name
    content: Union[str, list[ContentPart], None] = None
    name: Optional[Name] = None


ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]  # OpenAI's rule for function names


class FunctionDefinition(_Body):
    name: ToolName
    description: Optional[GrammarText] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema of type object (router/tools.py checks)
    strict: Optional[bool] = None  # folio's forced calls are always strict


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: ToolName


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=L.MAX_MESSAGES)
    max_tokens: Optional[int] = Field(None, ge=1, le=L.INT32_MAX)  # old name of max_completion_tokens
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=L.INT32_MAX)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=L.MAX_LOGPROBS)
    tools: Optional[Annotated[list[Tool], Field(max_length=L.MAX_TOOLS)]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    # OpenAI's deprecated form of tools: refused (router/openai/chat.py), never ignored
    functions: Optional[list[Any]] = None
    function_call: Union[str, dict[str, Any], None] = None
    # vLLM extensions
    add_generation_prompt: Optional[bool] = None
    continue_final_message: Optional[bool] = None
    add_special_tokens: Optional[bool] = None
    chat_template: Optional[str] = None  # refused unless --trust-request-chat-template
    chat_template_kwargs: Optional[dict[Name, Any]] = None


class TokenizeRequest(_Body):
    """POST /tokenize: either a prompt or chat messages."""

    model: Optional[Name] = None
    prompt: Optional[str] = None
    messages: Optional[Annotated[list[ChatMessage], Field(min_length=1, max_length=L.MAX_MESSAGES)]] = None
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: Optional[bool] = None


class DetokenizeRequest(_Body):
    """POST /detokenize."""

    model: Optional[Name] = None
    tokens: list[int]
