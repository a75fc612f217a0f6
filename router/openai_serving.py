"""The OpenAI API as router/app.py routes it: one object with every endpoint of
router/openai/ on the model it serves (cluster/entrypoints/serve.py builds it)."""

from __future__ import annotations

from typing import Optional

from folio.router.engine_client import EngineClient
from folio.router.limits import Limits
from folio.router.openai.chat import ChatCompletions
from folio.router.openai.completions import Completions
from folio.router.openai.generation import Caller, new_request_id
from folio.router.openai.models import Models
from folio.router.openai.served_model import ServedModel, longest_token_chars
from folio.router.openai.sse import StreamingResult
from folio.router.openai.tokenize import Tokenization

__all__ = ["Caller", "OpenAIServing", "StreamingResult", "longest_token_chars", "new_request_id"]


class OpenAIServing(ServedModel):
    """The served model with its endpoints on it. The endpoints read its state when a
    request comes, so a change to it (its templater's limits, say) applies to the next one."""

    def __init__(
        self, frontend: EngineClient, tokenizer, model_name: str, vocab_size: int, limits: Optional[Limits] = None
    ):
        super().__init__(frontend, tokenizer, model_name, vocab_size, limits)
        self.completions = Completions(self).create
        self.chat = ChatCompletions(self).create
        tokenization = Tokenization(self)
        self.tokenize, self.detokenize = tokenization.tokenize, tokenization.detokenize
        self.tokenizer_info = tokenization.info
        models = Models(self)
        self.models, self.model = models.model_list, models.retrieve
