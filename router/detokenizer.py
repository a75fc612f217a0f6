"""Incremental detokenization with stop strings, for one output sequence.

Text grows by decoding a small window of recent tokens, so each step costs a
few tokens' worth of decoding however long the output is. Text ending in an
incomplete UTF-8 sequence (decoded as U+FFFD) is held back until the next token
completes it, so no multi-byte character is ever cut. While a stop string could
still be forming at the end, its possible beginning is held back too: what was
sent to a client never has to be taken back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

_CONTEXT = 5     # prompt tokens decoded along with the first outputs (leading spaces)


@dataclass
class Detokenizer:
    tokenizer: object
    prompt_token_ids: Sequence[int]
    stop: Sequence[str] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    min_tokens: int = 0
    text: str = ""                          # all output text so far (after any stop cut)
    tokens: list[int] = field(default_factory=list)
    stopped_by: Optional[str] = None
    _sent: int = 0                          # chars of text already handed out
    _prefix: int = 0                        # window start within tokens (may be negative: prompt)
    _read: int = 0                          # tokens whose text is in self.text

    def __post_init__(self) -> None:
        self._ctx = list(self.prompt_token_ids[-_CONTEXT:])
        self._prefix = -len(self._ctx)
        self._max_stop = max((len(s) for s in self.stop), default=0)

    def _window(self, a: int, b: int) -> list[int]:
        allt = self._ctx + self.tokens
        off = len(self._ctx)
        return allt[a + off: b + off]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: Sequence[int]) -> bool:
        """Append tokens; return True when a stop string ended the output."""
        for t in token_ids:
            if self.stopped_by is not None:
                break
            self.tokens.append(t)
            before = self._decode(self._window(self._prefix, self._read))
            after = self._decode(self._window(self._prefix, len(self.tokens)))
            if len(after) <= len(before) or after.endswith("\ufffd"):
                continue          # wait for the rest of a multi-byte character
            start = len(self.text)
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.tokens)
            if self.stop and len(self.tokens) > self.min_tokens:
                self._find_stop(start)
        return self.stopped_by is not None

    def _find_stop(self, new_from: int) -> None:
        lo = max(0, new_from - self._max_stop + 1)
        best = None
        for s in self.stop:
            i = self.text.find(s, lo)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.text = self.text[: i + len(s)] if self.include_stop_str_in_output else self.text[:i]
            self.stopped_by = s

    def flush(self, final: bool) -> str:
        """Text not yet handed out. Unless final, keep back what may start a stop string."""
        end = len(self.text)
        if not final and self.stopped_by is None and self._max_stop:
            end = max(self._sent, end - self._max_stop + 1)
        out = self.text[self._sent:end]
        self._sent = end
        return out
