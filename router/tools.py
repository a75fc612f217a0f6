"""Tool calls forced by `tool_choice`: "required" or a named function.

The request's output is constrained (protos/grammar.py) to the call itself, so even
a small model writes calls that parse and fit each function's parameters:
- a named function: the output is its arguments, a JSON object of its `parameters`
  schema; streamed as OpenAI streams a call: the id and name first, then the
  arguments in fragments as they are generated;
- "required": a JSON array of one or more {"name", "arguments"} objects, each naming
  a declared function with arguments of its schema (exactly one object when
  `parallel_tool_calls` is false); streamed whole once it is complete, because a
  call's name is known only once its object has been read.
The message then has `tool_calls` and no content, and finish_reason "tool_calls". A
forced call cut short by max_tokens is returned as content, finish_reason "length".

`tool_choice` "none" renders the tools into the template and calls nothing. "auto"
(the default with tools) lets the model choose, and reads its own tool-call text
back into calls (router/tool_parsers.py). A model whose chat template shows no
tool-call format (the `generic` parser) is shown the tools and a JSON reply form in
a system message (tools_prompt), and its output is constrained to that form: either
{"tool_calls": [{"name", "arguments"}, ...]} or {"response": ...}, the answer, a
string or the request's response_format schema (GenericReply). So "auto" works on
any model, never as if no tools were declared.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Optional

from folio.protos.grammar import Grammar
from folio.router.errors import ApiError
from folio.router.protocol import ChatCompletionRequest


@dataclass(frozen=True)
class ForcedCall:
    """How a request's output becomes tool calls."""

    grammar: Grammar
    function: Optional[str]  # the named function; None: "required", an array of calls
    single: bool  # "required" without parallel calls: one object, not an array

    def calls(self, text: str) -> list[dict]:
        """The tool calls the finished output spells (OpenAI's message.tool_calls)."""
        value = json.loads(text)
        if self.function is not None:
            return [tool_call(self.function, text)]
        items = [value] if self.single else value
        return [tool_call(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in items]


def tool_call(name: str, arguments: str, call_id: Optional[str] = None) -> dict:
    return {
        "id": call_id or f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def wants_auto_calls(req: ChatCompletionRequest) -> bool:
    """Tools with tool_choice "auto" (OpenAI's default when tools are sent)."""
    return bool(req.tools) and req.tool_choice in (None, "auto")


def forced_call(req: ChatCompletionRequest) -> Optional[ForcedCall]:
    """The constrained form of the request's tool_choice; None when it forces no call
    ("none", "auto", no tools). Raises a 400 for tools folio cannot call."""
    choice = req.tool_choice
    if choice is None and not req.tools:
        return None
    if not req.tools:
        if choice == "none":
            return None
        raise ApiError(400, "tool_choice needs tools", param="tool_choice")
    params = _tool_schemas(req)
    if choice in (None, "auto", "none"):
        return None
    if choice == "required":
        return _required(params, single=req.parallel_tool_calls is False)
    name = choice.function.name
    if name not in params:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return ForcedCall(Grammar("json_schema", json.dumps(params[name])), name, single=True)


def _tool_schemas(req: ChatCompletionRequest) -> dict[str, dict]:
    """Each tool's parameters schema by name; a 400 for one that is not an object schema."""
    params = {}
    for t in req.tools:
        schema = t.function.parameters if t.function.parameters is not None else {"type": "object", "properties": {}}
        if schema.get("type") != "object":
            raise ApiError(
                400, f"the parameters of tool {t.function.name!r} must be a JSON schema of type object", param="tools"
            )
        if t.function.name in params:
            raise ApiError(400, f"two tools are named {t.function.name!r}", param="tools")
        params[t.function.name] = schema
    return params


def _one_call(params: dict[str, dict]) -> dict:
    """The schema of one {"name", "arguments"} call of any declared function."""
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": schema},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, schema in params.items()
        ]
    }


def _calls_array(params: dict[str, dict], single: bool) -> dict:
    return {"type": "array", "items": _one_call(params), "minItems": 1, **({"maxItems": 1} if single else {})}


def _required(params: dict[str, dict], single: bool) -> ForcedCall:
    schema = _one_call(params) if single else _calls_array(params, single=False)
    return ForcedCall(Grammar("json_schema", json.dumps(schema)), None, single)


def _object_with(key: str, schema: dict) -> dict:
    return {"type": "object", "properties": {key: schema}, "required": [key], "additionalProperties": False}


@dataclass(frozen=True)
class GenericReply:
    """tool_choice "auto" for a model without a tool-call format of its own: its output
    is one JSON object, the calls it chose or its answer."""

    grammar: Grammar
    text_answer: bool  # the answer is a string; else a response_format JSON value

    def read(self, text: str) -> tuple[Optional[str], list[dict]]:
        """(content, tool calls) of a complete output."""
        value = json.loads(text)
        if "tool_calls" in value:
            return None, [
                tool_call(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in value["tool_calls"]
            ]
        answer = value["response"]
        return (answer if self.text_answer else json.dumps(answer, ensure_ascii=False)), []

    def answer_so_far(self, text: str) -> Optional[str]:
        """The text answer an output (complete or not) has spelt so far, decoded as far as
        it is certain: each escape once whole, a surrogate pair once both halves are; None
        when the output is not (yet) a text answer."""
        start = _TEXT_ANSWER.match(text) if self.text_answer else None
        return None if start is None else _settled_string(text[start.end() :])


_TEXT_ANSWER = re.compile(r'\s*\{\s*"response"\s*:\s*"')


def _settled_string(body: str) -> str:
    """The decoded text of a JSON string's body up to its closing quote or an escape not yet whole."""
    i, n = 0, len(body)
    while i < n:
        ch = body[i]
        if ch == '"':
            break
        if ch != "\\":
            i += 1
            continue
        if i + 1 >= n:
            break
        if body[i + 1] != "u":
            i += 2
            continue
        if i + 6 > n:
            break
        high = 0xD800 <= int(body[i + 2 : i + 6], 16) < 0xDC00  # needs its low half
        if high and i + 12 > n:
            break
        i += 12 if high else 6
    return json.loads(f'"{body[:i]}"')


def generic_reply(req: ChatCompletionRequest, answer_schema: Optional[dict]) -> GenericReply:
    """The reply form of "auto" calls on a model without its own; answer_schema is the
    response_format's schema (None: the answer is text)."""
    calls = _calls_array(_tool_schemas(req), single=req.parallel_tool_calls is False)
    answer = {"type": "string"} if answer_schema is None else answer_schema
    schema = {"anyOf": [_object_with("tool_calls", calls), _object_with("response", answer)]}
    return GenericReply(Grammar("json_schema", json.dumps(schema)), answer_schema is None)


def tools_prompt(req: ChatCompletionRequest) -> str:
    """The system text that shows a model without a tool-call format the tools and the
    reply form GenericReply constrains it to."""
    tools = "\n".join(
        json.dumps(
            {"name": t.function.name, "description": t.function.description or "", "parameters": schema},
            ensure_ascii=False,
        )
        for t, schema in zip(req.tools, _tool_schemas(req).values())
    )
    return (
        "You can call these tools:\n"
        f"{tools}\n"
        'Reply with one JSON object. To call tools: {"tool_calls": [{"name": "<tool name>", "arguments": '
        '{<the arguments>}}]}. To answer without calling a tool: {"response": <your answer>}.'
    )


def generic_history(messages: list[dict]) -> list[dict]:
    """Earlier assistant turns' tool calls, written in the reply form the model is asked
    for (its template would drop them), so the model sees what it called."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and calls and not m.get("content"):
            m = dict(m, content=json.dumps({"tool_calls": [_call_value(c) for c in calls]}, ensure_ascii=False))
        out.append(m)
    return out


def _call_value(call: dict) -> dict:
    fn = call.get("function") or {}
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args)
    except (TypeError, json.JSONDecodeError):
        pass  # shown as the text it was
    return {"name": fn.get("name", ""), "arguments": args}
