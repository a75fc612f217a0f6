"""Chat templates and tokenization, off the event loop and within limits.

The head's one event loop also runs every replica's step loop, so nothing a
request sends may hold it: rendering a template and tokenizing a long prompt
run on their own threads (tokenizers releases the GIL while it encodes).

A template is rendered by transformers' sandboxed Jinja, under
- a time limit: a template still rendering after `timeout_s` is interrupted
  (an exception raised in its thread at the next bytecode; Jinja templates
  are Python code) and the request gets a 400;
- an output limit: rendered text longer than `max_chars` (the longest text
  that could still fit the context) is a 400.
Templates come from the model's files (the operator's); a template sent in a
request is refused unless the operator trusts clients with it
(--trust-request-chat-template), and chat_template_kwargs passes only an
allow-list of scalar settings.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

from folio.router.errors import ApiError
from folio.router.limits import Limits, check_template_kwargs

T = TypeVar("T")


class _Interrupted(BaseException):
    """Raised inside a render thread past its deadline; a BaseException so that a
    template's or library's `except Exception` cannot swallow it."""


@dataclass
class ChatInput:
    """What one request asks the template to render."""

    messages: list[dict]
    add_generation_prompt: bool
    continue_final_message: bool = False
    tools: Optional[list[dict]] = None
    template: Optional[str] = None  # from the request; None: the model's
    kwargs: Optional[dict[str, Any]] = None  # chat_template_kwargs as sent


class Templater:
    """Renders chat templates and tokenizes text for the router, never on the event loop."""

    def __init__(self, tokenizer, limits: Limits, max_chars: int):
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_chars = max_chars
        # One thread each: a tokenizer is not meant to be driven from several threads at
        # once, and a template that will not stop must not hold up tokenization.
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix="folio-tokenize")
        self._render = ThreadPoolExecutor(1, thread_name_prefix="folio-template")

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenize, lambda: self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        )

    async def decode(self, ids: list[int]) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, lambda: self.tokenizer.decode(ids))

    async def render(self, chat: ChatInput) -> str:
        """The conversation as text, ready to tokenize; ApiError(400) for what the request
        may not do, a template error, a render past the time limit or text that cannot fit."""
        kwargs = check_template_kwargs(chat.kwargs, self.limits.chat_template_kwargs)
        if chat.template is not None and not self.limits.trust_request_chat_template:
            raise ApiError(
                400,
                "chat templates sent with a request are not accepted by this "
                "server (the operator can allow them with "
                "--trust-request-chat-template)",
                param="chat_template",
            )
        if chat.continue_final_message:
            kwargs["continue_final_message"] = True
        if chat.tools:
            kwargs["tools"] = chat.tools

        def render() -> str:
            return self.tokenizer.apply_chat_template(
                chat.messages,
                tokenize=False,
                chat_template=chat.template,
                add_generation_prompt=chat.add_generation_prompt,
                **kwargs,
            )

        try:
            text = await run_with_deadline(self._render, render, self.limits.chat_template_timeout_s)
        except TimeoutError:
            raise ApiError(
                400,
                f"the chat template did not finish rendering within {self.limits.chat_template_timeout_s:g} s",
                param="messages",
            ) from None
        except Exception as e:  # noqa: BLE001 - template errors come from the request's messages
            raise ApiError(400, f"cannot apply the chat template: {_short(e)}", param="messages") from None
        if not isinstance(text, str):
            raise ApiError(400, "the chat template did not render text", param="messages")
        if len(text) > self.max_chars:
            raise ApiError(
                400,
                f"the conversation renders to {len(text)} characters, more than fit "
                "this model's maximum context length",
                param="messages",
            )
        return text


def _short(e: Exception) -> str:
    """A template error's message, bounded: it may quote the request's own text."""
    text = str(e) or type(e).__name__
    return text if len(text) <= 300 else text[:300] + "..."


async def run_with_deadline(pool: ThreadPoolExecutor, fn: Callable[[], T], timeout: float) -> T:
    """fn() on the pool's thread; past `timeout` seconds it is interrupted and TimeoutError raised.

    Interrupting uses CPython's PyThreadState_SetAsyncExc, which raises an exception in
    another thread at its next bytecode: enough for Python code such as a Jinja template
    however it loops, not for one long call into C (a template can make one, e.g. a huge
    string repeat: one reason a request's own template needs the operator's trust).
    The thread is then free for the next job.
    """
    lock = threading.Lock()
    state = {"thread": None, "interrupted": False}

    def job() -> T:
        try:
            with lock:
                state["thread"] = threading.get_ident()
            try:
                return fn()
            finally:
                with lock:
                    tid, state["thread"] = state["thread"], None
                    if state["interrupted"] and tid is not None:
                        _async_raise(tid, None)  # not fired yet: cancel it
        except _Interrupted:
            raise TimeoutError("interrupted at its deadline") from None

    future = asyncio.get_running_loop().run_in_executor(pool, job)
    future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, even when late
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout)
    except asyncio.TimeoutError:
        with lock:
            if state["thread"] is not None:
                state["interrupted"] = True
                _async_raise(state["thread"], _Interrupted)
        raise TimeoutError(f"did not finish within {timeout} s") from None


def _async_raise(thread_id: int, exc: Optional[type]) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
    )
