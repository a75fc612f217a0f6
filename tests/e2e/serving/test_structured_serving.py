"""Structured output and forced tool calls through the HTTP API, with the openai SDK as
the client: what agent frameworks send (response_format with a Pydantic model, vLLM's
guided_* fields, tools with tool_choice "required" or a named function, the tool's
result sent back), streamed and not, and the 400s for what cannot be honoured."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import jsonschema
import openai
import pydantic
import pytest

pytestmark = pytest.mark.slow


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    kind: str = pydantic.Field(json_schema_extra={"enum": ["cat", "dog", "fish"]})
    age: int = pydantic.Field(ge=0, le=30)


def test_sdk_parse_fills_a_pydantic_model(client, model):
    done = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Describe a pet as JSON."}],
        response_format=Pet,
        max_tokens=80,
        temperature=0,
    )
    choice = done.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Pet)
    assert choice.message.parsed.kind in ("cat", "dog", "fish")


def test_completions_take_vllm_guided_fields(client, model):
    def complete(**extra) -> str:
        r = client.completions.create(
            model=model, prompt="Answer:", max_tokens=16, temperature=0.8, seed=3, extra_body=extra
        )
        assert r.choices[0].finish_reason == "stop"
        return r.choices[0].text

    assert complete(guided_choice=["alpha", "beta"]) in ("alpha", "beta")
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", complete(guided_regex=r"[0-9]{3}-[0-9]{4}"))
    flag = {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}
    assert isinstance(json.loads(complete(structured_outputs={"json": flag}))["on"], bool)
    assert complete(response_format={"type": "json_schema", "json_schema": {"name": "f", "schema": flag}})


def test_a_streamed_constrained_reply_joins_into_valid_json(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "A pet, as JSON."}],
        max_tokens=80,
        temperature=0,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "Pet", "schema": Pet.model_json_schema()}},
    )
    chunks = [c for c in stream if c.choices]
    assert chunks[-1].choices[0].finish_reason == "stop"
    Pet.model_validate_json("".join(c.choices[0].delta.content or "" for c in chunks))


BAD = [
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nosuch"}}}},
        "response_format",
        "nosuch",
    ),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"guided_json": {"type": "string", "minLength": 5, "maxLength": 1}}, "guided_json", "minLength"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "(a"}, "guided_regex", "parenthesis"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar", "not defined"),
    ({"guided_choice": []}, "guided_choice", "at least 1"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex", "one output constraint"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs", "jsn"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "not supported"),
    ({"guided_json": {"type": "object"}, "ignore_eos": True}, None, "ignore_eos"),
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions", "not supported"),
    (
        {
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            "tool_choice": "required",
        },
        "tools",
        "type object",
    ),
    (
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        "tool_choice",
        "not among the tools",
    ),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "guided_regex": "a"}, "tool_choice", "not a regex"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    (
        {
            "tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}],
            "tool_choice": "required",
        },
        "tools",
        "two tools",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required", "guided_regex": "a"},
        "tool_choice",
        "no other output constraint",
    ),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "none"}, "tools", "pattern"),
    ({"function_call": "auto"}, "function_call", "not supported"),
]


@pytest.mark.parametrize("body, param, message", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_constraints_that_cannot_be_honoured_are_refused(client, model, body, param, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body=body
        )
    assert e.value.status_code == 400
    assert message in e.value.body["message"]
    if param is not None:
        assert e.value.body["param"] == param
    # ...and the server goes on serving
    ok = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 0, "maximum": 99},
                    "b": {"type": "integer", "minimum": 0, "maximum": 99},
                },
                "required": ["a", "b"],
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _check_call(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("parallel", [None, False])
def test_required_tool_choice_returns_valid_calls(client, model, parallel):
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    r = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0, **extra
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    if parallel is False:
        assert len(choice.message.tool_calls) == 1
    for call in choice.message.tool_calls:
        _check_call(call)


def test_a_named_tool_is_called_and_its_result_goes_back(client, model):
    r = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=80, temperature=0
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    _check_call(call)
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18})},
    ]
    answer = client.chat.completions.create(
        model=model, messages=history, tools=TOOLS, tool_choice="none", max_tokens=16
    )
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_streamed_tool_calls_open_with_id_and_name_then_arguments(client, model):
    whole = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=80, temperature=0
    )
    stream = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=80, temperature=0, stream=True
    )
    pieces = [p for c in stream if c.choices for p in (c.choices[0].delta.tool_calls or [])]
    first, rest = pieces[0], pieces[1:]
    assert first.id and first.function.name == "get_weather" and first.type == "function"
    assert all(p.id is None and p.function.name is None and p.index == 0 for p in rest)
    assert (
        "".join(p.function.arguments or "" for p in pieces) == whole.choices[0].message.tool_calls[0].function.arguments
    )
    # "required": the calls come whole, once the array is complete
    stream = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0, stream=True
    )
    chunks = [c for c in stream if c.choices]
    calls = [p for c in chunks for p in (c.choices[0].delta.tool_calls or [])]
    assert calls and all(p.id and p.function.name in SCHEMAS for p in calls)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def _reply(message) -> tuple:
    """A chat reply as (content, [(tool name, arguments)]), each call checked."""
    for call in message.tool_calls or []:
        _check_call(call)
    return message.content, [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def _streamed_reply(chunks) -> tuple:
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    pieces = [p for c in chunks for p in (c.choices[0].delta.tool_calls or [])]
    assert all(p.id and p.function.name in SCHEMAS for p in pieces)  # each call whole
    return content or None, [(p.function.name, json.loads(p.function.arguments)) for p in pieces]


@pytest.mark.parametrize(
    "messages",
    [
        ASK,
        [{"role": "user", "content": "Write one short sentence about the sea."}],
        ASK
        + [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
        ],
    ],
    ids=["weather", "no-tool", "tool-result"],
)
def test_auto_tool_choice_without_a_template_format_replies_in_the_generic_form(client, model, messages):
    """SmolLM2's template shows its model no tool-call format: folio shows it the tools and
    constrains its reply to calls or an answer, streamed or not, the same either way."""
    ask = dict(model=model, messages=messages, tools=TOOLS, max_tokens=60, temperature=0)
    r = client.chat.completions.create(**ask)
    choice = r.choices[0]
    content, calls = _reply(choice.message)
    assert (choice.finish_reason == "tool_calls") == bool(calls)
    assert bool(calls) != bool(content)  # a call or an answer, and an answer is text, not JSON
    assert calls or not content.lstrip().startswith('{"response"')
    chunks = [c for c in client.chat.completions.create(stream=True, **ask) if c.choices]
    assert _streamed_reply(chunks) == (content, calls)
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    # with response_format, an answer is JSON of its schema
    capital = {
        "type": "object",
        "properties": {"capital": {"type": "string", "maxLength": 20}},
        "required": ["capital"],
    }
    rf = {"type": "json_schema", "json_schema": {"name": "capital", "schema": capital}}
    r = client.chat.completions.create(response_format=rf, **ask)
    content, calls = _reply(r.choices[0].message)
    if not calls:
        jsonschema.validate(json.loads(content), capital)


def test_auto_tool_choice_reads_the_models_own_calls(server, client, model):
    serving = server.deployment.serving
    before = serving.limits
    server.call(lambda: setattr(serving, "limits", replace(before, tool_call_parser="hermes")))
    try:
        # The regex makes SmolLM2 write a Hermes call, as a model trained on the format would.
        text = 'Adding. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
        # Room for the text a character a token, and the end of text: never cut short.
        ask = dict(
            model=model,
            messages=ASK,
            tools=TOOLS,
            max_tokens=len(text) + 1,
            temperature=0,  # the likeliest pieces of the text: few tokens
            extra_body={"guided_regex": re.escape(text)},
        )
        r = client.chat.completions.create(**ask)
        assert r.choices[0].finish_reason == "tool_calls"
        assert r.choices[0].message.content == "Adding."
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 1, "b": 2}
        chunks = [c for c in client.chat.completions.create(stream=True, **ask) if c.choices]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        pieces = [p for c in chunks for p in (c.choices[0].delta.tool_calls or [])]
        assert content.strip() == "Adding." and "<tool_call>" not in content
        assert [(p.function.name, json.loads(p.function.arguments)) for p in pieces] == [("add", {"a": 1, "b": 2})]
        assert pieces[0].id and chunks[-1].choices[0].finish_reason == "tool_calls"
    finally:
        server.call(lambda: setattr(serving, "limits", before))


def test_langchain_structured_output_and_bound_tools(server, model):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.base_url + "/v1", api_key="unused", model=model, temperature=0, max_tokens=80)
    pet = llm.with_structured_output(Pet).invoke("Describe a pet.")
    assert isinstance(pet, Pet)

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    for choice in ("add", "required"):
        calls = llm.bind_tools([add], tool_choice=choice).invoke("What is 2 plus 3?").tool_calls
        assert calls and all(c["name"] == "add" and set(c["args"]) == {"a", "b"} for c in calls)
