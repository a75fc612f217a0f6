"""/openapi.json describes what the API answers: every endpoint that returns a body names its
schema for 200, and real responses hold exactly what those schemas require.

Real responses come from the real app (router/app.py over router/openai_serving.py) in
process, on a fake engine that streams tokens of a small real tokenizer: every text,
logprob and usage path runs, without Ray or a model. A key a response carries every time
must be required; a key it leaves out at times must not be; no key may be undocumented.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

import jsonschema
import pytest
from starlette.testclient import TestClient

from folio.protos.messages import RequestOutput, TokenLogprob
from folio.router.app import build_app
from folio.router.openai import chunks, responses
from folio.router.openai.sse import sse
from folio.router.openai_serving import OpenAIServing

MAX_MODEL_LEN = 128
EOS = 2
CHAT = [{"role": "user", "content": "the cat sat"}]
# Every body shape each endpoint answers with: with and without logprobs, echo, n > 1.
JSON_CASES = {
    ("POST", "/v1/completions"): [
        {"prompt": "the cat", "max_tokens": 3},
        {"prompt": ["a b", "c d"], "max_tokens": 2, "n": 2, "logprobs": 2, "echo": True},
        {"prompt": [5, 6, 7], "max_tokens": 2, "logprobs": 0},
    ],
    ("POST", "/v1/chat/completions"): [
        {"messages": CHAT, "max_tokens": 3},
        {"messages": CHAT, "max_tokens": 3, "n": 2, "logprobs": True, "top_logprobs": 2},
    ],
    ("GET", "/v1/models"): [None],
    ("POST", "/tokenize"): [{"prompt": "the cat"}, {"messages": CHAT}],
    ("POST", "/detokenize"): [{"tokens": [5, 6, 7]}],
}
STREAM_CASES = {
    "/v1/completions": [
        {"prompt": "the cat", "max_tokens": 4, "logprobs": 1, "echo": True},
        {"prompt": "the", "max_tokens": 3, "n": 2, "stream_options": {"include_usage": True}},
    ],
    "/v1/chat/completions": [
        {"messages": CHAT, "max_tokens": 4},
        {
            "messages": CHAT,
            "max_tokens": 3,
            "logprobs": True,
            "top_logprobs": 1,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    ],
}


class _Stream:
    """Outputs of one engine request, a token at a time; four tokens or more end with EOS,
    alone in the last output, as a model that stops does (a finish with no new text)."""

    def __init__(self, request, vocab_size: int):
        self.request, self.vocab_size = request, vocab_size

    def cancel(self) -> None:
        pass

    async def __aiter__(self):
        params, ids = self.request.sampling_params, self.request.prompt_token_ids
        tokens = [4 + (len(ids) + i) % (self.vocab_size - 4) for i in range(params.max_tokens)]
        finish = "length"
        if len(tokens) >= 4:
            tokens[-1], finish = EOS, "stop"
        prompt_lps = None
        if params.prompt_logprobs is not None:
            prompt_lps = [None] + [self._logprob(t, params.prompt_logprobs) for t in ids[1:]]
        for i, token in enumerate(tokens):
            lps = None if params.logprobs is None else [self._logprob(token, params.logprobs)]
            done = finish if i == len(tokens) - 1 else None
            yield RequestOutput(self.request.request_id, [token], lps, prompt_lps if i == 0 else None, done)

    def _logprob(self, token: int, top: int) -> TokenLogprob:
        # The last alternative is one the sampling settings ruled out: -inf, which JSON cannot carry.
        top_lps = [
            (4 + (token + k) % (self.vocab_size - 4), -1.0 - k if k < top - 1 else -math.inf) for k in range(top)
        ]
        return TokenLogprob(token, -0.5, 1, top_lps)


class _Engine:
    ready, max_model_len, max_request_tokens = True, MAX_MODEL_LEN, MAX_MODEL_LEN

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def generate(self, request) -> _Stream:
        return _Stream(request, self.vocab_size)


def _tokenizer():
    """Words of a few letters and a chat template: enough for every text path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *"abcdefghijklmnopqrstuvwxyz:", "the"])}
    vocab.update({w: len(vocab) + i for i, w in enumerate(["cat", "sat", "user", "assistant"])})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}assistant:",
    )


@pytest.fixture(scope="module")
def client():
    tokenizer = _tokenizer()
    engine = _Engine(len(tokenizer))
    with TestClient(build_app(OpenAIServing(engine, tokenizer, "tiny", len(tokenizer)), engine)) as c:
        yield c


@pytest.fixture(scope="module")
def doc(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200, r.text
    return r.json()


def _ok_schema(doc: dict, method: str, path: str, media_type: str) -> dict:
    return doc["paths"][path][method.lower()]["responses"]["200"]["content"][media_type]["schema"]


def _schema_named(doc: dict, name: str) -> dict:
    """The component `name`, with the components its references lead to."""
    assert name in doc["components"]["schemas"], f"{name} is not in the document"
    return {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}


def _json_schema_name(doc: dict, method: str, path: str) -> str:
    ref = _ok_schema(doc, method, path, "application/json").get("$ref", "")
    assert ref.startswith("#/components/schemas/"), f"{method} {path}: 200 names no response schema"
    return ref.rsplit("/", 1)[-1]


def _chunk_schema_name(doc: dict, path: str) -> str:
    described = _ok_schema(doc, "POST", path, "text/event-stream")["description"]
    names = [n for n in doc["components"]["schemas"] if n.endswith("Chunk") and f"/{n})" in described]
    assert len(names) == 1, f"POST {path}: the event stream names no chunk schema: {described}"
    return names[0]


def _keys_by_schema(doc: dict, schema: dict, value, seen: dict) -> None:
    """For every object in `value` that a schema with properties describes: the key sets
    it had, under that schema's name."""
    schemas = doc["components"]["schemas"]
    name = None
    while True:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            schema = schemas[name]
        elif "anyOf" in schema and value is not None:
            schema = next(s for s in schema["anyOf"] if s.get("type") != "null")
        else:
            break
    if isinstance(value, dict) and "properties" in schema:
        seen[name].append((schema, set(value)))
        for k, v in value.items():
            if k in schema["properties"]:
                _keys_by_schema(doc, schema["properties"][k], v, seen)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _keys_by_schema(doc, schema["items"], item, seen)


def _check_required_is_always_present(seen: dict) -> None:
    for name, samples in seen.items():
        schema = samples[0][0]
        always = set.intersection(*(keys for _, keys in samples))
        ever = set.union(*(keys for _, keys in samples))
        assert ever <= set(schema["properties"]), f"{name}: undocumented keys {ever - set(schema['properties'])}"
        assert set(schema.get("required", [])) == always, (
            f"{name}: required {sorted(schema.get('required', []))}, always present {sorted(always)}"
        )


def _sse_events(body: str) -> list[tuple[str, dict]]:
    """Every `data:` event before [DONE]: as sent, and parsed."""
    events = [e + "\n\n" for e in body.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]\n\n", events
    return [(e, json.loads(e[len("data: ") :])) for e in events[:-1]]


@pytest.mark.parametrize("method,path", list(JSON_CASES), ids=lambda x: x)
def test_json_responses_match_their_documented_schema(client, doc, method, path):
    name = _json_schema_name(doc, method, path)
    seen: dict = defaultdict(list)
    for body in JSON_CASES[(method, path)]:
        r = client.request(method, path, json=body)
        assert r.status_code == 200, r.text
        jsonschema.validate(r.json(), _schema_named(doc, name))
        _keys_by_schema(doc, {"$ref": f"#/components/schemas/{name}"}, r.json(), seen)
    _check_required_is_always_present(seen)


@pytest.mark.parametrize("path", list(STREAM_CASES))
def test_stream_chunks_match_their_documented_schema(client, doc, path):
    name = _chunk_schema_name(doc, path)
    model = getattr(responses, name)
    seen: dict = defaultdict(list)
    for body in STREAM_CASES[path]:
        r = client.post(path, json={**body, "stream": True})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
        for event, chunk in _sse_events(r.text):
            jsonschema.validate(chunk, _schema_named(doc, name))
            # Streams build chunks as dicts (router/openai/chunks.py): each must be, byte for
            # byte, what its model dumps to (key order, keys left out, nothing extra).
            assert event == sse(model.model_validate(chunk).model_dump()), f"{name} drifts from its model"
            _keys_by_schema(doc, {"$ref": f"#/components/schemas/{name}"}, chunk, seen)
    _check_required_is_always_present(seen)


def test_the_checks_catch_a_schema_that_drifts(client, doc):
    """A key the body sends but the schema lacks, and a required key it does not send, fail."""
    r = client.post("/v1/completions", json={"prompt": "the", "max_tokens": 1})
    schemas = json.loads(json.dumps(doc["components"]["schemas"]))
    del schemas["Usage"]["properties"]["total_tokens"]
    seen: dict = defaultdict(list)
    _keys_by_schema({"components": {"schemas": schemas}}, {"$ref": "#/components/schemas/Completion"}, r.json(), seen)
    with pytest.raises(AssertionError, match="undocumented keys"):
        _check_required_is_always_present(seen)
    schemas["Usage"]["properties"]["total_tokens"] = {"type": "integer"}
    schemas["Usage"]["required"].append("cached_tokens")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(r.json(), {"$ref": "#/components/schemas/Completion", "components": {"schemas": schemas}})


def test_the_checks_catch_a_chunk_that_drifts_from_its_model():
    """A streamed chunk with a key its model lacks, without a key the model sends, or
    with keys out of the model's order is not what the model dumps to."""
    envelope = {"id": "chatcmpl-1", "created": 1, "model": "tiny"}
    good = chunks.chat_chunk(
        envelope, chunks.chat_chunk_choice(0, chunks.chat_delta(content="a"), None, None, None), None
    )
    extra = {**good, "system_fingerprint": None}
    missing = {k: v for k, v in good.items() if k != "object"}
    reordered = dict(reversed(list(good.items())))
    model = responses.ChatCompletionChunk
    assert sse(good) == sse(model.model_validate(good).model_dump())
    for drifted in (extra, missing, reordered):
        assert sse(drifted) != sse(model.model_validate(drifted).model_dump())


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("stream", [False, True])
def test_a_logprob_of_minus_infinity_is_sent_as_the_floor(client, stream):
    """A -inf logprob (a ruled-out alternative) is sent as -9999.0: valid JSON for strict
    clients, in whole bodies (a 500 before) and streams (bare -Infinity before)."""
    body = {"messages": CHAT, "max_tokens": 2, "logprobs": True, "top_logprobs": 2, "stream": stream}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
        items = [c["logprobs"]["content"] for e in events for c in _strict_json(e)["choices"] if c.get("logprobs")]
    else:
        items = [c["logprobs"]["content"] for c in _strict_json(r.text)["choices"]]
    tops = [t["logprob"] for content in items for entry in content for t in entry["top_logprobs"]]
    assert chunks.LOGPROB_FLOOR in tops and all(math.isfinite(x) for x in tops)
    r = client.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 2, "logprobs": 2, "stream": stream})
    assert r.status_code == 200, r.text
    texts = [line[6:] for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    for doc in [_strict_json(t) for t in texts] if stream else [_strict_json(r.text)]:
        for choice in doc["choices"]:
            assert all(v >= chunks.LOGPROB_FLOOR for top in choice["logprobs"]["top_logprobs"] for v in top.values())
