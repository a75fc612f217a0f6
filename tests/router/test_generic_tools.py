"""The generic tool-call form: tool_choice "auto" on a model whose chat template shows
no tool-call format. Its grammar admits exactly the two replies (calls, or an answer),
a finished reply reads back into calls or content, and a text answer streams out
decoded in any pieces without a broken escape."""

from __future__ import annotations

import json

import pytest
import xgrammar
from hypothesis import given, settings
from hypothesis import strategies as st

from folio.protos.grammar import GrammarCompiler
from folio.router.protocol import ChatCompletionRequest
from folio.router.tools import generic_history, generic_reply, tools_prompt
from folio.worker.loader import load_tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "now"}},
]
CAPITAL = {
    "type": "object",
    "properties": {"capital": {"type": "string"}},
    "required": ["capital"],
    "additionalProperties": False,
}


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, **fields)


@pytest.fixture(scope="module")
def compiler(smollm2):
    tok = load_tokenizer(smollm2)
    return GrammarCompiler(lambda: tok, 49152, [2])


def _admits(compiler, grammar, text: str) -> bool:
    matcher = xgrammar.GrammarMatcher(compiler.compile(grammar))
    return matcher.accept_string(text) and matcher.accept_token(2) and matcher.is_terminated()


CALLS = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": {}}]}'


def test_the_grammar_admits_calls_of_declared_tools_or_an_answer(compiler):
    reply = generic_reply(_request(), None)
    assert _admits(compiler, reply.grammar, CALLS)
    assert _admits(compiler, reply.grammar, '{"response": "It is \\"sunny\\"."}')
    assert not _admits(compiler, reply.grammar, '{"tool_calls": [{"name": "rm", "arguments": {}}]}')
    assert not _admits(compiler, reply.grammar, '{"tool_calls": []}')
    assert not _admits(compiler, reply.grammar, '{"response": 3}')
    single = generic_reply(_request(parallel_tool_calls=False), None)
    assert not _admits(compiler, single.grammar, CALLS)
    typed = generic_reply(_request(), CAPITAL)  # response_format's schema shapes the answer
    assert _admits(compiler, typed.grammar, '{"response": {"capital": "Paris"}}')
    assert not _admits(compiler, typed.grammar, '{"response": "Paris"}')


def test_a_finished_reply_reads_back_into_calls_or_content():
    content, calls = generic_reply(_request(), None).read(CALLS)
    assert content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("now", {}),
    ]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert generic_reply(_request(), None).read('{"response": "caf\\u00e9 \\ud83d\\ude00"}') == ("café 😀", [])
    typed = generic_reply(_request(), CAPITAL).read('{"response": {"capital": "Paris"}}')
    assert typed == ('{"capital": "Paris"}', [])


@settings(max_examples=200, deadline=None)
@given(answer=st.text(max_size=40), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_a_text_answer_streams_decoded_whatever_the_pieces(answer, cuts):
    reply = generic_reply(_request(), None)
    text = json.dumps({"response": answer}, ensure_ascii=True)  # escapes, surrogate pairs included
    sent = ""
    for cut in sorted(c % (len(text) + 1) for c in cuts) + [len(text)]:
        so_far = reply.answer_so_far(text[:cut])
        if so_far is None:
            assert not sent and cut < len('{"response": "')
            continue
        assert so_far.startswith(sent) and answer.startswith(so_far)  # never withdrawn, never broken
        sent = so_far
    assert sent == answer
    assert reply.answer_so_far('{"tool_calls": [') is None


def test_the_prompt_shows_the_tools_and_history_shows_earlier_calls():
    prompt = tools_prompt(_request())
    assert '"name": "get_weather"' in prompt and '"description": "The weather in a city"' in prompt
    assert '"tool_calls"' in prompt and '"response"' in prompt
    call = {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}
    history = generic_history(
        [
            {"role": "user", "content": "time?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "noon"},
        ]
    )
    assert json.loads(history[1]["content"]) == {"tool_calls": [{"name": "now", "arguments": {}}]}
    assert history[0]["content"] == "time?" and history[2]["content"] == "noon"
