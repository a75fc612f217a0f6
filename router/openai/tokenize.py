"""POST /tokenize and /detokenize (vLLM's): the served tokenizer and chat template,
under the same bounds as generation; GET /tokenizer_info, what clients without the
tokenizer (lm-eval's remote tokenizer, Captum) need to know of it."""

from __future__ import annotations

from folio.router.errors import ApiError
from folio.router.limits import check_text_fits, check_token_ids
from folio.router.openai.prompts import chat_token_ids
from folio.router.openai.responses import DetokenizeResponse, TokenizeResponse, TokenizerInfo
from folio.router.openai.served_model import ServedModel
from folio.router.protocol import DetokenizeRequest, TokenizeRequest


class Tokenization:
    def __init__(self, model: ServedModel):
        self.model = model

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        model = self.model
        model.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "send either prompt or messages")
        if req.messages is not None:
            ids = await chat_token_ids(model, req)
        else:
            check_text_fits(len(req.prompt), model.max_chars, model.frontend.max_model_len, "prompt")
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await model.templater.encode(req.prompt, add_special)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=model.frontend.max_model_len)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        model = self.model
        model.check_model(req.model)
        max_len = model.frontend.max_model_len
        if len(req.tokens) > max_len:
            raise ApiError(
                400,
                f"at most {max_len} tokens (the maximum context length) can be detokenized at once",
                param="tokens",
            )
        check_token_ids(req.tokens, model.vocab_size, "tokens", allow_empty=True)
        return DetokenizeResponse(prompt=await model.templater.decode(req.tokens))

    def info(self) -> TokenizerInfo:
        tok = self.model.tokenizer

        def special(name: str) -> dict:
            return {
                f"{name}_token": getattr(tok, f"{name}_token", None),
                f"{name}_token_id": getattr(tok, f"{name}_token_id", None),
            }

        return TokenizerInfo(
            tokenizer_class=type(tok).__name__,
            vocab_size=self.model.vocab_size,
            model_max_length=self.model.frontend.max_model_len,
            chat_template=getattr(tok, "chat_template", None),
            **special("bos"),
            **special("eos"),
            **special("pad"),
            **special("unk"),
        )
