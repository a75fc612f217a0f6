"""Every bound on what a client may send, in one place.

Two kinds:
- Fixed bounds (module constants) are part of the request schema
  (router/protocol.py), so a bad field fails validation before any work and
  the OpenAPI document shows the range. They follow the OpenAI API where it
  states one (n <= 128, top_logprobs <= 20, logit_bias values in [-100, 100],
  penalties in [-2, 2]) and are generous where vLLM users send more (16 stop
  strings where OpenAI allows 4).
- Operator limits (`Limits`, set by `folio serve` flags) depend on the
  deployment: the body size, client-supplied chat templates, how long a
  template may render, keep-alive of waiting streams.

Checks that need the model (vocabulary, context length) are the functions
below; the router calls them before tokenizing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from folio.router.errors import ApiError

INT32_MAX = 2**31 - 1
MAX_N = 128  # choices per prompt (OpenAI's bound)
MAX_PROMPTS = 256  # prompts in one completions request
MAX_CHOICES = 256  # n x prompts: engine requests one HTTP request may start
MAX_LOGPROBS = 20  # logprobs, top_logprobs, prompt logprobs per position
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024  # logit_bias entries
MAX_LOGIT_BIAS_VALUE = 100.0
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
MAX_MESSAGES = 4096
MAX_TOOLS = 128  # OpenAI's bound on tools per request
MAX_NAME_CHARS = 256  # model, user, role, name, cache_salt, template kwargs strings
MAX_REQUEST_ID_BYTES = 256  # x-request-id header
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # any signed or unsigned 64-bit seed

# chat_template_kwargs keys that switch documented template features (Qwen3's enable_thinking,
# DeepSeek's thinking, gpt-oss's reasoning_effort, Llama 3.1's date_string); anything else,
# chat_template above all, is refused unless the operator allows it.
DEFAULT_TEMPLATE_KWARGS = frozenset({"enable_thinking", "thinking", "reasoning_effort", "date_string"})


@dataclass(frozen=True)
class Limits:
    """What the operator sets (folio serve flags); defaults suit a public endpoint."""

    max_body_bytes: int = field(
        default=4 << 20,
        metadata={
            "help": "largest request body, e.g. 4MiB; larger ones get 413",
            "flag": "--max-request-body",
            "unit": "bytes",
        },
    )
    trust_request_chat_template: bool = field(
        default=False, metadata={"help": "accept chat templates sent with requests (they run on the head)"}
    )
    extra_chat_template_kwargs: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": f"allow this chat_template_kwargs key besides {', '.join(sorted(DEFAULT_TEMPLATE_KWARGS))} "
            "(repeatable)",
            "flag": "--chat-template-kwarg",
        },
    )
    chat_template_timeout_s: float = field(default=5.0, metadata={"help": "seconds a chat template may render"})
    grammar_compile_timeout_s: float = field(
        default=5.0,
        metadata={
            "help": "seconds a request's output constraint (JSON schema, regex, grammar) may take to compile",
            "flag": "--grammar-compile-timeout",
        },
    )
    tool_call_parser: str = field(
        default="auto",
        metadata={
            "help": 'how tool_choice "auto" reads the model\'s tool calls: hermes, mistral, llama3_json, '
            "generic (folio shows the tools and a JSON reply form), or auto (from the chat template; "
            "generic where it shows no format)",
            "choices": ("auto", "hermes", "mistral", "llama3_json", "generic"),
        },
    )
    stream_keepalive_s: float = field(
        default=10.0, metadata={"help": "seconds of silence after which a stream gets an SSE keep-alive comment"}
    )

    @property
    def chat_template_kwargs(self) -> frozenset[str]:
        """The chat_template_kwargs keys a request may set."""
        return DEFAULT_TEMPLATE_KWARGS | frozenset(self.extra_chat_template_kwargs)


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str, allow_empty: bool = False) -> None:
    if not ids and not allow_empty:
        raise ApiError(400, "the prompt is empty (it has no tokens)", param=param)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is out of the vocabulary [0, {vocab_size})", param=param)


def check_text_fits(num_chars: int, max_chars: int, max_model_len: int, param: str) -> None:
    """Refuse text that cannot fit the context whatever it tokenizes to, before tokenizing it.

    max_chars is max_model_len times the longest token's text: no tokenization
    of a longer text has max_model_len tokens or fewer.
    """
    if num_chars > max_chars:
        raise ApiError(
            400,
            f"the input has {num_chars} characters, more than fit this model's "
            f"maximum context length of {max_model_len} tokens",
            param=param,
        )


def check_choices(num_prompts: int, n: int) -> None:
    if num_prompts * n > MAX_CHOICES:
        raise ApiError(
            400,
            f"{num_prompts} prompts x n={n} asks for {num_prompts * n} sequences; at most {MAX_CHOICES} per request",
            param="n",
        )


def logit_bias_ids(bias: Optional[dict[str, float]], vocab_size: int) -> dict[int, float]:
    """logit_bias with its keys as token ids, each inside the vocabulary."""
    out = {}
    for key, value in (bias or {}).items():
        try:
            tok = int(key)
        except ValueError:
            raise ApiError(400, f"logit_bias keys must be token ids, got {key[:32]!r}", param="logit_bias") from None
        if not 0 <= tok < vocab_size:
            raise ApiError(
                400, f"logit_bias token id {tok} is out of the vocabulary [0, {vocab_size})", param="logit_bias"
            )
        out[tok] = value
    return out


def check_top_k(top_k: Optional[int], vocab_size: int) -> None:
    if top_k is not None and top_k > vocab_size:
        raise ApiError(
            400, f"top_k must be -1 (disabled) or at most the vocabulary size {vocab_size}, got {top_k}", param="top_k"
        )


def check_template_kwargs(kwargs: Optional[dict], allowed: Iterable[str]) -> dict:
    """chat_template_kwargs: only allowed keys, only scalar values (strings bounded)."""
    out = {}
    allowed = frozenset(allowed)
    for key, value in (kwargs or {}).items():
        if key not in allowed:
            raise ApiError(
                400,
                f"chat_template_kwargs key {key[:64]!r} is not allowed; allowed: "
                f"{', '.join(sorted(allowed)) or 'none'}",
                param="chat_template_kwargs",
            )
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ApiError(
                400, f"chat_template_kwargs[{key!r}] must be a string, number or boolean", param="chat_template_kwargs"
            )
        if isinstance(value, str) and len(value) > MAX_NAME_CHARS:
            raise ApiError(
                400,
                f"chat_template_kwargs[{key!r}] is longer than {MAX_NAME_CHARS} characters",
                param="chat_template_kwargs",
            )
        out[key] = value
    return out
