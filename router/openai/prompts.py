"""Prompts as token ids: text, token ids, or chat messages through the template.

Text that could not fit the context is refused before it is tokenized (a long
text costs the tokenizer thread time), and templating and tokenization run off
the event loop (router/templating.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from folio.router.errors import ApiError
from folio.router.limits import check_text_fits, check_token_ids
from folio.router.openai.served_model import ServedModel
from folio.router.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, TokenizeRequest
from folio.router.templating import ChatInput
from folio.router.tools import generic_history


@dataclass
class Prompt:
    token_ids: list[int]
    text: Optional[str]  # as the client sent it, or decoded once for echo


async def completion_prompts(model: ServedModel, req: CompletionRequest) -> list[Prompt]:
    p = req.prompt
    add_special = True if req.add_special_tokens is None else req.add_special_tokens
    if isinstance(p, str) or (p and isinstance(p[0], str)):
        texts = [p] if isinstance(p, str) else list(p)
        for t in texts:  # all checked before any is tokenized
            check_text_fits(len(t), model.max_chars, model.frontend.max_model_len, "prompt")
        prompts = [Prompt(await model.templater.encode(t, add_special), t) for t in texts]
    elif not p:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    elif isinstance(p[0], int):
        prompts = [Prompt(list(p), None)]
    else:
        prompts = [Prompt(list(ids), None) for ids in p]
    for pr in prompts:
        check_token_ids(pr.token_ids, model.vocab_size, "prompt")
    return prompts


async def chat_token_ids(
    model: ServedModel, req: Union[ChatCompletionRequest, TokenizeRequest], tools_system: Optional[str] = None
) -> list[int]:
    """The conversation through the chat template, tokenized; refused before any work when
    its text alone could not fit. tools_system: the tools as text for a model whose
    template shows none (router/tools.py), put first in the system message."""
    messages = [_message_dict(m) for m in req.messages or []]
    if tools_system is not None:
        messages = generic_history(messages)
        if messages and messages[0].get("role") == "system":
            messages[0] = dict(messages[0], content=f"{tools_system}\n\n{messages[0]['content']}")
        else:
            messages.insert(0, {"role": "system", "content": tools_system})
    check_text_fits(sum(_text_chars(m) for m in messages), model.max_chars, model.frontend.max_model_len, "messages")
    kwargs = dict(getattr(req, "chat_template_kwargs", None) or {})
    template = getattr(req, "chat_template", None)
    if template is None and "chat_template" in kwargs:
        template = kwargs.pop("chat_template")
        if not isinstance(template, str):
            raise ApiError(400, "chat_template must be a string", param="chat_template_kwargs")
    continue_final = bool(getattr(req, "continue_final_message", None))
    add_gen = req.add_generation_prompt
    text = await model.templater.render(
        ChatInput(
            messages,
            add_generation_prompt=(not continue_final) if add_gen is None else add_gen,
            continue_final_message=continue_final,
            tools=[t.model_dump(exclude_none=True) for t in getattr(req, "tools", None) or []] or None,
            template=template,
            kwargs=kwargs,
        )
    )
    return await model.templater.encode(text, bool(req.add_special_tokens))


async def prompt_text(model: ServedModel, p: Prompt) -> str:
    """The prompt as text, for echo: as sent, or token ids decoded off the event loop."""
    if p.text is None:
        p.text = await model.templater.decode(p.token_ids)
    return p.text


def _message_dict(m: ChatMessage) -> dict:
    """A chat message as the template sees it: content parts joined into one string."""
    d = m.model_dump(exclude_none=True)
    content = m.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text":
                raise ApiError(
                    400,
                    f"content parts of type {part.type[:32]!r} are not supported; folio serves text models",
                    param="messages",
                )
            if part.text is None:
                raise ApiError(400, "a content part of type 'text' needs its 'text' string", param="messages")
            texts.append(part.text)
        content = "\n".join(texts)
    d["content"] = content or ""
    return d


def _text_chars(message: dict) -> int:
    """Characters of a message's strings (content, name, any extra string field)."""
    return sum(len(v) for v in message.values() if isinstance(v, str))
