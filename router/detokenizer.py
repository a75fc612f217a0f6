"""Incremental detokenization with stop strings, for one output sequence.

Text grows by decoding a small window of recent tokens, so each token costs a
bounded amount of decoding however long the output is and whatever it is made
of:

- The window is the last few tokens already turned into text (context, so a
  leading space or a merge comes out as in a whole decode) plus the tokens
  still pending. Text ending in an incomplete UTF-8 sequence (decoded as
  U+FFFD) stays pending until a later token completes it, so no multi-byte
  character is ever cut.
- A token that skip_special_tokens removes adds nothing to any decode, so it
  never joins the window (a run of them costs one small decode each).
- Pending tokens that never complete a character (a run of stray bytes) are
  capped: past _MAX_PENDING tokens, the text that later tokens can no longer
  change is accepted (see _accept_settled), and the window restarts after it.

While a stop string could still be forming at the end, its possible beginning
is held back too: what was handed out never has to be taken back. The text is
kept in pieces, so appending, stop search and handing out cost what is new,
not the length of the whole text.

After flush(final=True), text is what the tokens add to the prompt's text:
tokenizer.decode(tokens), but with the leading space a SentencePiece-style
decoder strips from a whole decode (cut at a stop string, when one ended the
output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

_CONTEXT = 5  # prompt tokens decoded along with the first outputs (leading spaces)
_MAX_PENDING = 8  # pending tokens without new text before settled text is accepted anyway
_REPLACEMENT = "\ufffd"


def _decode_function(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """tokenizer.decode for a list of ids, or the identical call straight into its Rust
    tokenizer when that is all tokenizer.decode would do (no clean-up of spaces, no
    override): a third of the cost, on the event loop, per token."""

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    try:
        from transformers import PreTrainedTokenizerFast as Fast
    except ImportError:  # pragma: no cover - transformers is a dependency
        return decode
    cls = type(tokenizer)
    if (
        isinstance(tokenizer, Fast)
        and cls.decode is Fast.decode
        and cls._decode is Fast._decode
        and not tokenizer.clean_up_tokenization_spaces
    ):
        rust = tokenizer.backend_tokenizer
        return lambda ids: rust.decode(ids, skip_special_tokens=skip_special_tokens)
    return decode


class _Text:
    """Append-only text in pieces: appending, and reading or cutting near the end, cost
    what they touch (a str attribute grown with += is copied whole every time)."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self.length = 0

    def append(self, s: str) -> None:
        if s:
            self._parts.append(s)
            self.length += len(s)

    def since(self, start: int, end: Optional[int] = None) -> str:
        """text[start:end] for start <= end near the end (walks back over the pieces after start)."""
        end = self.length if end is None else end
        picked, pos = [], self.length
        for p in reversed(self._parts):
            if pos <= start:
                break
            pos -= len(p)
            picked.append(p if pos >= start else p[start - pos :])
        return "".join(reversed(picked))[: end - start]

    def truncate(self, length: int) -> None:
        while self.length > length:
            p = self._parts.pop()
            self.length -= len(p)
            if self.length < length:
                self._parts.append(p[: length - self.length])
                self.length = length

    def value(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


@dataclass
class Detokenizer:
    """Text and stop strings of one output sequence; feed it with add(), hand text out
    with flush(). tokenizer needs only decode(ids, skip_special_tokens=...)."""

    tokenizer: object
    prompt_token_ids: Sequence[int]
    stop: Sequence[str] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    min_tokens: int = 0
    tokens: list[int] = field(default_factory=list)  # every output token kept
    stopped_by: Optional[str] = None
    _sent: int = 0  # chars of text already handed out

    def __post_init__(self) -> None:
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._decode = _decode_function(self.tokenizer, self.skip_special_tokens)
        self._text = _Text()
        # The window: context tokens (already text) then pending ones, from _read on.
        self._window: list[int] = list(self.prompt_token_ids[-_CONTEXT:])
        self._read = len(self._window)
        self._context_text: Optional[str] = None  # decode(window[:_read]), when known
        self._skipped: dict[int, bool] = {}

    @property
    def text(self) -> str:
        """All output text so far (after any stop cut)."""
        return self._text.value()

    def add(self, token_ids: Sequence[int]) -> bool:
        """Append tokens; return True when a stop string ended the output."""
        for t in token_ids:
            if self.stopped_by is not None:
                break
            self.tokens.append(t)
            self._step(t)
        return self.stopped_by is not None

    def _step(self, t: int) -> None:
        self._window.append(t)
        before = self._before()
        after = self._decode(self._window)
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self._accept(after[len(before) :])
            self._restart(self._read, after)
        elif self._skips(t):
            self._window.pop()  # adds nothing to any decode: never part of the window
        elif len(self._window) - self._read > _MAX_PENDING:
            self._accept_settled(before, after)

    def _before(self) -> str:
        if self._context_text is None:
            self._context_text = self._decode(self._window[: self._read])
        return self._context_text

    def _restart(self, start: int, context_text: Optional[str] = None) -> None:
        """New text reaches the window's end: what was pending becomes the context."""
        del self._window[:start]
        self._read = len(self._window)
        self._context_text = None if start else context_text

    def _skips(self, t: int) -> bool:
        """Whether decoding removes t (a special token under skip_special_tokens)."""
        if not self.skip_special_tokens:
            return False
        s = self._skipped.get(t)
        if s is None:
            s = self._skipped[t] = (
                self._decode([t]) == "" and self.tokenizer.decode([t], skip_special_tokens=False) != ""
            )
        return s

    def _accept_settled(self, before: str, after: str) -> None:
        """Too many pending tokens without new text: accept the text before the last token
        boundary m that later tokens cannot change, and decode on from m with no context.

        m qualifies when decoding the window in two parts split at m gives the whole
        decode, and the part after m decodes to some text. For a byte-level decoder (one
        lossy UTF-8 decode of all the bytes) that means no character or invalid sequence
        straddles m, and at least one byte follows m, so how the bytes before m decode is
        settled: later bytes can only complete the sequence at the very end, after m.
        With no such m (some other decoder), everything decoded so far is accepted.
        A decoder that decodes a whole run of byte tokens at once (SentencePiece byte
        fallback) may then show a character that a whole decode would replace.
        """
        n = len(self._window)
        for m in range(n - 1, self._read, -1):
            rest = self._decode(self._window[m:])
            if not rest:
                continue
            head = self._decode(self._window[:m])
            if head + rest == after and head.startswith(before):
                self._accept(head[len(before) :])
                del self._window[:m]
                self._read, self._context_text = 0, ""
                return
        self._accept(after[len(before) :])
        self._restart(self._read, after)

    def _accept(self, new: str) -> None:
        start = self._text.length
        self._text.append(new)
        if self.stop and new and len(self.tokens) > self.min_tokens:
            self._find_stop(start)

    def _find_stop(self, new_from: int) -> None:
        """Search only where a stop string could end in the new text."""
        lo = max(0, new_from - self._max_stop + 1)
        recent = self._text.since(lo)
        best = None
        for s in self.stop:
            i = recent.find(s)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self._text.truncate(lo + i + (len(s) if self.include_stop_str_in_output else 0))
            self.stopped_by = s

    def flush(self, final: bool) -> str:
        """Text not yet handed out. Unless final, keep back what may start a stop string.

        final also accepts what the pending tokens decode to (an output that ends in an
        unfinished character ends in U+FFFD, as a whole decode does).
        """
        if final and self.stopped_by is None and len(self._window) > self._read:
            before, after = self._before(), self._decode(self._window)
            if len(after) > len(before):
                self._accept(after[len(before) :])
            self._restart(len(self._window))
        end = self._text.length
        if not final and self.stopped_by is None and self._max_stop:
            end = max(self._sent, end - self._max_stop + 1)
        out = self._text.since(self._sent, end) if end > self._sent else ""
        self._sent = max(self._sent, end)
        return out
