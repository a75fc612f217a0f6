"""Structured output through the HTTP API, with the openai SDK as the client: what
agent frameworks send (response_format with a Pydantic model, vLLM's guided_* fields),
streamed and not, and the 400s for constraints that cannot be honoured."""

from __future__ import annotations

import json
import re

import openai
import pydantic
import pytest

from tests.e2e.test_serving import client, model, server  # noqa: F401 - the serving fixtures

pytestmark = pytest.mark.slow


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    kind: str = pydantic.Field(json_schema_extra={"enum": ["cat", "dog", "fish"]})
    age: int = pydantic.Field(ge=0, le=30)


def test_sdk_parse_fills_a_pydantic_model(client, model):  # noqa: F811
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


def test_completions_take_vllm_guided_fields(client, model):  # noqa: F811
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


def test_a_streamed_constrained_reply_joins_into_valid_json(client, model):  # noqa: F811
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
    ({"function_call": "auto"}, "function_call", "not supported"),
]


@pytest.mark.parametrize("body, param, message", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_constraints_that_cannot_be_honoured_are_refused(client, model, body, param, message):  # noqa: F811
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
