"""The tool-call text models write of their own accord, read back into calls
(tool_choice "auto"). One parser per format, picked by `--tool-call-parser` or
from the chat template, which shows the model the format it was trained on:

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number,
  text around them (Hermes, Qwen 2.5 and 3, SmolLM3, many fine-tunes);
- mistral: `[TOOL_CALLS]` then a JSON array of {"name", "arguments"} to the end;
- llama3_json: the whole reply is one JSON object {"name", "parameters"} (or a
  `;`-separated list of them), optionally after `<|python_tag|>` (Llama 3.1-3.3).

A StreamingToolParser turns the generated text, piece by piece, into content
and whole calls: content is passed on until something may start a call, a call
is sent only once it is complete and parses, and text that turns out not to be a
call is sent as content after all. So a client never sees a fragment of a call
that is later withdrawn, nor a call's text as content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

PARSERS = ("hermes", "mistral", "llama3_json")


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


@dataclass
class Parsed:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


def detect_parser(chat_template: Optional[str]) -> Optional[str]:
    """The format a chat template shows its model, or None when it shows none."""
    t = chat_template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or ("ipython" in t and "parameters" in t):
        return "llama3_json"
    return None


def _call(obj, args_key: str) -> Optional[ParsedCall]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse(parser: str, text: str) -> Parsed:
    """The whole reply: its content and the calls in it (none if they do not parse)."""
    if parser == "hermes":
        calls, content, last = [], [], 0
        for m in _HERMES.finditer(text):
            try:
                call = _call(json.loads(m.group(1)), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is None:
                continue  # left in the content, as written
            content.append(text[last : m.start()])
            last = m.end()
            calls.append(call)
        content.append(text[last:])
        return Parsed("".join(content).strip() if calls else text, calls)
    if parser == "mistral":
        head, sep, tail = text.partition("[TOOL_CALLS]")
        if not sep:
            return Parsed(text)
        try:
            value = json.loads(tail.strip())
        except json.JSONDecodeError:
            return Parsed(text)
        calls = [_call(o, "arguments") for o in (value if isinstance(value, list) else [value])]
        return Parsed(head.strip(), calls) if calls and None not in calls else Parsed(text)
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return Parsed(text)
    calls = []
    for part in body.split(";"):
        try:
            calls.append(_call(json.loads(part), "parameters"))
        except json.JSONDecodeError:
            return Parsed(text)
    return Parsed("", calls) if calls and None not in calls else Parsed(text)


# Where a call may begin: the text from here on is held back until it is known.
_OPENERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}


class StreamingToolParser:
    """feed() pieces of generated text, then finish(); each returns (content, calls)
    ready to send. Content that may begin a call is held back until it is known."""

    def __init__(self, parser: str):
        self.parser = parser
        self.text = ""  # everything generated
        self.sent = 0  # text[:sent] is settled: sent as content or consumed by calls
        self.calls_sent = 0

    def feed(self, piece: str) -> tuple[str, list[ParsedCall]]:
        self.text += piece
        if self.parser == "llama3_json":
            # A reply that opens with "{" or the python tag may be a call: held to the end.
            head = self.text.lstrip()
            if not head or head.startswith("{") or "<|python_tag|>".startswith(head[:14]) or head.startswith("<|"):
                return "", []
            return self._content_up_to(len(self.text))
        if self.parser == "mistral":
            i = self.text.find("[TOOL_CALLS]", self.sent)
            if i >= 0:
                return self._content_up_to(i)  # the calls run to the end: parsed in finish()
            return self._content_up_to(self._safe_end("[TOOL_CALLS]"))
        return self._hermes()

    def finish(self) -> tuple[str, list[ParsedCall]]:
        rest = self.text[self.sent :]
        self.sent = len(self.text)
        if self.parser == "hermes":
            return rest, []  # an unclosed or broken call stays text
        parsed = parse(self.parser, rest)
        if parsed.calls:
            self.calls_sent += len(parsed.calls)
            return parsed.content, parsed.calls
        return rest, []

    def _hermes(self) -> tuple[str, list[ParsedCall]]:
        content, calls = "", []
        while True:
            start = self.text.find("<tool_call>", self.sent)
            if start < 0:
                c, _ = self._content_up_to(self._safe_end("<tool_call>"))
                return content + c, calls
            end = self.text.find("</tool_call>", start)
            if end < 0:
                c, _ = self._content_up_to(start)  # the call is still being written
                return content + c, calls
            block = self.text[start : end + len("</tool_call>")]
            parsed = parse("hermes", block)
            c, _ = self._content_up_to(start)
            content += c
            self.sent = end + len("</tool_call>")
            if parsed.calls:
                calls += parsed.calls
                self.calls_sent += len(parsed.calls)
            else:
                content += block  # not a call after all: it was text

    def _safe_end(self, opener: str) -> int:
        """How far the text can be sent: short of a suffix that could begin `opener`."""
        for k in range(min(len(opener) - 1, len(self.text) - self.sent), 0, -1):
            if opener.startswith(self.text[-k:]):
                return len(self.text) - k
        return len(self.text)

    def _content_up_to(self, end: int) -> tuple[str, list[ParsedCall]]:
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out, []
