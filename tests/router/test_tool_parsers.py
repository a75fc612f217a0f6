"""Reading models' own tool-call text back into calls, whole and streamed in any pieces."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from folio.router.tool_parsers import ParsedCall, StreamingToolParser, detect_parser, parse

WEATHER = ParsedCall("get_weather", json.dumps({"city": "Paris", "unit": "c"}))
ADD = ParsedCall("add", json.dumps({"a": 1, "b": 2}))


def _hermes(call: ParsedCall) -> str:
    return f'<tool_call>\n{{"name": "{call.name}", "arguments": {call.arguments}}}\n</tool_call>'


CASES = [
    # (parser, text, content, calls)
    ("hermes", "Let me check.\n" + _hermes(WEATHER) + "\n" + _hermes(ADD), "Let me check.", [WEATHER, ADD]),
    ("hermes", "No tools needed: 2 + 2 = 4.", "No tools needed: 2 + 2 = 4.", []),
    ("hermes", "<tool_call>{not json}</tool_call> text", "<tool_call>{not json}</tool_call> text", []),
    ("hermes", "a < b and <tool_", "a < b and <tool_", []),
    ("hermes", _hermes(WEATHER).replace("</tool_call>", ""), _hermes(WEATHER).replace("</tool_call>", ""), []),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', "", [ADD]),
    (
        "mistral",
        'Sure. [TOOL_CALLS] [{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"unit\\": \\"c\\"}"}]',
        "Sure.",
        [WEATHER],
    ),
    ("mistral", "[TOOL_CALLS] [{broken", "[TOOL_CALLS] [{broken", []),
    ("llama3_json", '{"name": "add", "parameters": {"a": 1, "b": 2}}', "", [ADD]),
    (
        "llama3_json",
        '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}',
        "",
        [ADD, WEATHER],
    ),
    ("llama3_json", "The answer is 3.", "The answer is 3.", []),
    ("llama3_json", '{"no": "name here"}', '{"no": "name here"}', []),
]


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_a_whole_reply_parses_into_content_and_calls(parser, text, content, calls):
    parsed = parse(parser, text)
    assert parsed.calls == calls
    assert parsed.content == content


def _stream(parser: str, pieces: list[str]) -> tuple[list[str], list[ParsedCall]]:
    reader = StreamingToolParser(parser)
    contents, calls = [], []
    for p in pieces:
        c, k = reader.feed(p)
        contents.append(c)
        calls += k
    c, k = reader.finish()
    return contents + [c], calls + k


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_streamed_in_any_pieces_it_reads_the_same(case, cuts):
    parser, text, content, calls = case
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    contents, streamed_calls = _stream(parser, pieces)
    assert streamed_calls == calls
    assert "".join(contents).strip() == content.strip()
    joined = "".join(contents)
    assert all(f'"name": "{c.name}"' not in joined for c in calls)  # a call's own text is never content


def test_content_before_a_call_streams_at_once_and_a_possible_opener_waits():
    reader = StreamingToolParser("hermes")
    assert reader.feed("Checking the weather <tool") == ("Checking the weather ", [])
    assert reader.feed("_call>") == ("", [])
    assert reader.feed('{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> done') == (" done", [ADD])


@pytest.mark.parametrize(
    "template, parser",
    [
        ("{% for t in tools %}<tool_call>{{ t }}</tool_call>{% endfor %}", "hermes"),
        ("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% if x %}[TOOL_CALLS]{% endif %}", "mistral"),
        ("{{ '<|python_tag|>' }}{% if role == 'ipython' %}{% endif %}", "llama3_json"),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", None),
        (None, None),
    ],
)
def test_the_parser_is_detected_from_the_chat_template(template, parser):
    assert detect_parser(template) == parser
