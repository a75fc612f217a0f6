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
back into calls (router/tool_parsers.py); a model whose format folio cannot tell
gets a 400, never an answer as if no tools were declared.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Optional

from protos.grammar import Grammar
from router.errors import ApiError
from router.protocol import ChatCompletionRequest


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


def _required(params: dict[str, dict], single: bool) -> ForcedCall:
    one_call = {
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
    schema = one_call if single else {"type": "array", "items": one_call, "minItems": 1}
    return ForcedCall(Grammar("json_schema", json.dumps(schema)), None, single)
