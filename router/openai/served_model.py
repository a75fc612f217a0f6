"""The model the endpoints serve, and the checks every request passes against it.

The schema (router/protocol.py) bounded each field alone; what needs the model
(its name, vocabulary, context) is checked here, before any work.
"""

from __future__ import annotations

from typing import Optional

from folio.protos.grammar import Grammar
from folio.protos.messages import SamplingParams
from folio.router.engine_client import EngineClient
from folio.router.errors import ApiError
from folio.router.limits import Limits, check_token_ids, check_top_k, logit_bias_ids
from folio.router.protocol import _Sampling
from folio.router.structured import GrammarCheck, requested_grammar
from folio.router.templating import Templater
from folio.router.tool_parsers import detect_parser


class ServedModel:
    """One model behind the engine, as every endpoint sees it."""

    def __init__(
        self, frontend: EngineClient, tokenizer, model_name: str, vocab_size: int, limits: Optional[Limits] = None
    ):
        self.frontend = frontend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.limits = limits or Limits()
        self.max_token_chars = longest_token_chars(tokenizer)
        self.templater = Templater(tokenizer, self.limits, self.max_chars)
        self.grammars = GrammarCheck(tokenizer, vocab_size, self.limits.grammar_compile_timeout_s)
        self._token_text: dict[int, str] = {}

    @property
    def tool_parser(self) -> str:
        """The tool-call format tool_choice "auto" reads (router/tool_parsers.py), or
        "generic" for a model without one (router/tools.py)."""
        if self.limits.tool_call_parser != "auto":
            return self.limits.tool_call_parser
        return detect_parser(getattr(self.tokenizer, "chat_template", None)) or "generic"

    @property
    def max_chars(self) -> int:
        """The longest text that could still fit the context (see check_text_fits)."""
        return self.frontend.max_model_len * self.max_token_chars

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(
                404,
                f"the model {name[:64]!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def grammar(self, req: _Sampling) -> Optional[Grammar]:
        """The request's output constraint (router/structured.py), compiled once to be sure it can be."""
        grammar, param = requested_grammar(req)
        if grammar is not None:
            await self.grammars.check(grammar, param)
        return grammar

    def sampling_params(
        self,
        req: _Sampling,
        *,
        max_tokens: int,
        logprobs: Optional[int],
        prompt_logprobs: Optional[int],
        grammar: Optional[Grammar] = None,
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
                grammar=grammar,
            )
        except ValueError as e:
            raise ApiError(400, str(e)) from e

    def token_text(self, token_id: int) -> str:
        """One token decoded alone, as logprobs name it; cached, since the same few
        thousand tokens come back all the time."""
        s = self._token_text.get(token_id)
        if s is None:
            s = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return s


def longest_token_chars(tokenizer) -> int:
    """Characters of the longest token's text: no text longer than n times this is n tokens
    or fewer (a token's stored form is never shorter than the text it decodes to)."""
    vocab = tokenizer.get_vocab()
    return max(8, max(map(len, vocab), default=1))
