"""The HTTP edge against hostile clients: API keys on every route, bounded bodies and
fields, errors as OpenAI error objects, templates under limits, fair use, capacity.

One real server (Ray on 127.0.0.1, a worker actor behind gRPC, uvicorn) serves a
tiny random-weight model with SmolLM2's real tokenizer and chat template, so every
request is cheap and the text paths are real. Each hostile request must fail alone:
a greedy stream running beside them finishes with the tokens it has when alone.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import replace

import httpx
import pytest

from tests.model_fixtures import make_tiny_chat_model

pytestmark = pytest.mark.slow

KEY, PRIORITY_KEY, SALTED_KEY = "sk-edge-plain", "sk-edge-priority", "sk-edge-salted"
AUTH = {"Authorization": f"Bearer {KEY}"}
NUM_KV_BLOCKS = 32  # 512 tokens of KV: below the model's 2048-token context
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray

    from folio.cluster.entrypoints.options import build_config
    from folio.cluster.entrypoints.serve import ServeConfig, serve_in_background

    model = make_tiny_chat_model(tmp_path_factory.getbasetemp() / "models")
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(
        json.dumps(
            [
                {"key": PRIORITY_KEY, "name": "ops", "allow_priority": True},
                {"key": SALTED_KEY, "name": "tenant", "cache_salt": "tenant-b"},
            ]
        )
    )
    if not ray.is_initialized():
        from folio.cluster.placement import start_local_ray

        start_local_ray()
    cfg = build_config(
        ServeConfig,
        model=model,
        port=0,
        num_kv_blocks=NUM_KV_BLOCKS,
        max_num_seqs=16,
        api_keys=(KEY,),
        api_key_file=str(keys),
        stream_keepalive_s=0.5,
        chat_template_timeout_s=1.0,
        max_body_bytes=1 << 20,
    )
    with serve_in_background(cfg) as bg:
        yield bg


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as h:
        yield h


def on_loop(server, fn):
    """fn() on the server's event loop, where all head state lives; its value."""

    async def run():
        return fn()

    return server.call(run())


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    if param is not None:
        assert err["param"] == param, err
    return err


def greedy(http, prompt="The capital of France is", max_tokens=24, **kw) -> list[str]:
    r = http.post(
        "/v1/completions",
        json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 0, **kw},
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


# ---------------------------------------------------------------- keys

ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [1]}),
    ("GET", "/metrics", None),
    ("GET", "/health/replicas", None),
    ("GET", "/openapi.json", None),
]


@pytest.mark.parametrize("method,path,body", ROUTES)
def test_every_route_but_health_needs_a_key(server, method, path, body):
    url = server.base_url + path
    for headers in (
        {},
        {"Authorization": "Bearer sk-wrong"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
    ):
        r = httpx.request(method, url, json=body, headers=headers, timeout=60)
        err = assert_error(r, 401)
        assert err["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    for key in (KEY, PRIORITY_KEY, SALTED_KEY):
        r = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200, r.text
    assert httpx.get(server.base_url + "/health").status_code == 200  # load balancers: no key


# ---------------------------------------------------------------- bodies and statuses


def test_bodies_bounded_and_every_status_an_openai_error(server, http):
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    assert_error(http.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)

    def chunked():  # no Content-Length: refused while it streams in
        for _ in range(64):
            yield b" " * (64 << 10)

    assert_error(http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}), 413)
    assert_error(
        http.post(
            "/v1/completions", content=b"prompt=hi", headers={"content-type": "application/x-www-form-urlencoded"}
        ),
        415,
    )
    assert_error(http.get("/v1/no-such-route"), 404)
    assert_error(http.get("/v1/completions"), 405)
    assert_error(http.delete("/health"), 405)
    for raw in (
        b'{"prompt": "hi"',
        b"",
        b"[" * 100_000,
        b'{"prompt": "\\ud800"}',
        b'{"prompt": "hi", "temperature": NaN}',
        b'{"prompt": "hi", "top_p": Infinity}',
        b'{"prompt": "\xff\xfe"}',
        b"null",
        b'"a string"',
    ):
        assert_error(http.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400)
    # No Content-Type at all is read as JSON (curl users), as FastAPI would.
    r = http.post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": 1}')
    assert r.status_code == 200, r.text
    assert_error(
        http.post("/v1/completions", json={"prompt": "hi"}, headers={"x-request-id": "x" * 300}),
        400,
        param="x-request-id",
    )


# ---------------------------------------------------------------- hostile fields fail alone

BIG = 2**31
HOSTILE = [
    ("/v1/completions", {"prompt": "hi", "seed": 2**64, "max_tokens": 1}, "seed"),
    ("/v1/completions", {"prompt": "hi", "seed": -(2**63) - 1, "max_tokens": 1}, "seed"),
    ("/v1/completions", {"prompt": "hi", "top_k": BIG}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "top_k": 49153}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [BIG]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [49152]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 17}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": "y" * 1025}, "stop"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"49152": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "n": 129}, "n"),
    ("/v1/completions", {"prompt": ["hi"] * 257}, "prompt"),
    ("/v1/completions", {"prompt": ["hi"] * 3, "n": 100}, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "temperature": 1e308}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": -3}, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "priority": 2**40}, "priority"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2**63}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 5, "max_tokens": 2}, None),
    ("/v1/completions", {"prompt": [[1, 2], [BIG]]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "user": "u" * 257}, "user"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT * 4097}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "r" * 300, "content": "x"}]}, "messages"),
    ("/detokenize", {"tokens": [1] * 5000}, "tokens"),
]


def test_hostile_fields_get_400s_and_fail_alone(server, http):
    want = greedy(http)
    box = {}
    thread = threading.Thread(target=lambda: box.update(got=greedy(http)))
    thread.start()
    for path, body, param in HOSTILE:
        assert_error(http.post(path, json=body), 400, param=param)
    thread.join(60)
    assert box["got"] == want
    assert http.get("/health").status_code == 200 and greedy(http) == want


def test_any_64_bit_seed_with_any_n(http):
    """Child seeds wrap around 2**64 (seed + i), so what crashed the replica now works, and
    seeds equal modulo 2**64 sample alike."""
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "n": 3}
    texts = {}
    for seed in (2**63 - 1, 2**64 - 1, -1, -(2**63)):
        r = http.post("/v1/completions", json={**body, "seed": seed})
        assert r.status_code == 200, r.text
        texts[seed] = [c["text"] for c in r.json()["choices"]]
    assert texts[2**64 - 1] == texts[-1]
    assert texts[2**63 - 1] != texts[-(2**63)]
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "seed": 2**63 - 1, "n": 2, "max_tokens": 3})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- templates


def test_chat_templates_and_kwargs_refused_unless_allowed(server, http):
    evil = "{{ 'a' * 10**10 }}"
    assert_error(
        http.post("/v1/chat/completions", json={"messages": CHAT, "chat_template": evil}), 400, param="chat_template"
    )
    assert_error(
        http.post("/v1/chat/completions", json={"messages": CHAT, "chat_template_kwargs": {"chat_template": evil}}), 400
    )
    assert_error(
        http.post("/v1/chat/completions", json={"messages": CHAT, "chat_template_kwargs": {"tokenizer": "x"}}),
        400,
        param="chat_template_kwargs",
    )
    assert_error(
        http.post(
            "/v1/chat/completions", json={"messages": CHAT, "chat_template_kwargs": {"enable_thinking": {"a": 1}}}
        ),
        400,
    )
    r = http.post(
        "/v1/chat/completions",
        json={"messages": CHAT, "max_tokens": 2, "chat_template_kwargs": {"enable_thinking": False}},
    )
    assert r.status_code == 200, r.text


def test_trusted_request_template_is_interrupted_at_its_deadline(server, http):
    """With the operator's trust a client template runs, but a runaway one is stopped at the
    time limit, and the event loop answers /health all the while."""
    serving = server.deployment.serving
    limits = serving.templater.limits
    serving.templater.limits = replace(limits, trust_request_chat_template=True)
    try:
        ok = http.post(
            "/v1/chat/completions",
            json={
                "messages": CHAT,
                "max_tokens": 2,
                "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            },
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["prompt_tokens"] < 12  # the request's template, not the model's
        forever = (
            "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
            "{% endfor %}{% endfor %}{% endfor %}"
        )
        latencies = []
        start = time.monotonic()
        with _health_probe(server, latencies):
            err = assert_error(
                http.post("/v1/chat/completions", json={"messages": CHAT, "chat_template": forever}), 400
            )
        assert "did not finish" in err["message"] and time.monotonic() - start < 10
        assert max(latencies) < 1.0, latencies
        # The render thread is free again.
        assert http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1}).status_code == 200
    finally:
        serving.templater.limits = limits


# ---------------------------------------------------------------- the event loop stays free


class _health_probe:
    """GET /health every 20 ms on a thread while the block runs; latencies in seconds."""

    def __init__(self, server, out: list):
        self.url, self.out, self.stop = server.base_url + "/health", out, threading.Event()

    def __enter__(self):
        def run():
            with httpx.Client(timeout=30) as c:
                while not self.stop.is_set():
                    t = time.monotonic()
                    c.get(self.url)
                    self.out.append(time.monotonic() - t)
                    time.sleep(0.02)

        self.thread = threading.Thread(target=run)
        self.thread.start()
        time.sleep(0.1)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


def test_event_loop_answers_while_big_bodies_and_long_texts_are_handled(server, http):
    serving = server.deployment.serving
    latencies: list[float] = []
    with _health_probe(server, latencies):
        # Refused by size, as it streams in.
        def chunked():
            for _ in range(320):
                yield b" " * (64 << 10)

        assert_error(http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}), 413)
        # Text that cannot fit is refused before it is tokenized.
        too_long = "word " * (serving.max_chars // 5 + 1)
        err = assert_error(http.post("/v1/completions", json={"prompt": too_long}), 400, param="prompt")
        assert "characters" in err["message"]
        # Text that might fit is tokenized off the loop; then it is over the context.
        assert_error(
            http.post("/v1/completions", json={"prompt": "hello world " * (serving.max_chars // 12)}),
            400,
            param="max_tokens",
        )
        # The largest body the server takes, a long token-id list, is parsed and refused.
        ids = b"[" + b",".join([b"1234"] * 200_000) + b"]"
        assert_error(
            http.post(
                "/v1/completions", content=b'{"prompt": ' + ids + b"}", headers={"content-type": "application/json"}
            ),
            400,
            param="max_tokens",
        )
    assert len(latencies) > 5 and max(latencies) < 1.0, latencies


# ---------------------------------------------------------------- fair use


def _queued_order(server) -> list[str]:
    fe = server.deployment.frontend
    return [s.request.request_id for _, _, s in sorted(fe._queued)]


def test_priority_is_honoured_only_when_allowed(server):
    fe = server.deployment.frontend
    capacity = fe.replica_capacity
    on_loop(server, lambda: setattr(fe, "replica_capacity", 0))  # everything queues

    async def send(client, key, priority):
        return await client.post(
            "/v1/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"prompt": "hi", "max_tokens": 1, "priority": priority},
        )

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            first = asyncio.create_task(send(client, KEY, 0))
            await asyncio.sleep(0.5)
            pushy = asyncio.create_task(send(client, KEY, -1_000_000))  # ignored
            await asyncio.sleep(0.5)
            allowed = asyncio.create_task(send(client, PRIORITY_KEY, -5))  # honoured
            await asyncio.sleep(0.5)
            order = on_loop(server, lambda: [s.request.priority for _, _, s in sorted(fe._queued)])
            on_loop(server, lambda: (setattr(fe, "replica_capacity", capacity), fe._on_replica_room(fe.replicas[0])))
            results = await asyncio.gather(first, pushy, allowed)
            return order, results

    try:
        order, results = asyncio.run(main())
    finally:
        on_loop(server, lambda: setattr(fe, "replica_capacity", capacity))
    assert order == [-5, 0, 0]
    assert all(r.status_code == 200 for r in results)


def test_cache_salt_keeps_prefix_caches_apart(server, http):
    sched = server.deployment.frontend.replicas[0].scheduler
    prompt = list(range(1000, 1100))  # six full blocks of 16

    def hit_tokens(headers=None, **body) -> int:
        before = on_loop(server, lambda: sched.prefix_hit_tokens)
        r = http.post("/v1/completions", headers=headers or AUTH, json={"prompt": prompt, "max_tokens": 1, **body})
        assert r.status_code == 200, r.text
        return on_loop(server, lambda: sched.prefix_hit_tokens) - before

    hit_tokens(cache_salt="a")
    assert hit_tokens(cache_salt="a") == 96
    assert hit_tokens(cache_salt="b") == 0
    assert hit_tokens() == 0  # no salt: another cache
    salted = {"Authorization": f"Bearer {SALTED_KEY}"}
    assert hit_tokens(salted, cache_salt="a") == 0  # the key's salt comes first
    assert hit_tokens(salted, cache_salt="a") == 96


# ---------------------------------------------------------------- capacity and waiting


def test_chat_without_max_tokens_gets_the_room_left(server, http):
    """The pool (512 tokens) is smaller than the model's context (2048): folio lowers its
    limit at start, and a chat without max_tokens gets what is left and is admissible."""
    fe = server.deployment.frontend
    room = on_loop(server, lambda: fe.max_request_tokens)
    assert room <= NUM_KV_BLOCKS * 16
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] <= room
    too_big = {"prompt": [5] * 100, "max_tokens": room}
    err = assert_error(http.post("/v1/completions", json=too_big), 400, param="max_tokens")
    assert str(room) in err["message"]


def test_waiting_stream_gets_keepalives_then_its_tokens(server):
    fe = server.deployment.frontend
    capacity = fe.replica_capacity
    on_loop(server, lambda: setattr(fe, "replica_capacity", 0))
    lines = []
    try:
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as h:
            with h.stream(
                "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True, "ignore_eos": True}
            ) as r:
                assert r.status_code == 200
                it = r.iter_lines()
                while len([ln for ln in lines if ln.startswith(":")]) < 2:
                    lines.append(next(it))
                on_loop(
                    server, lambda: (setattr(fe, "replica_capacity", capacity), fe._on_replica_room(fe.replicas[0]))
                )
                lines.extend(it)
    finally:
        on_loop(server, lambda: setattr(fe, "replica_capacity", capacity))
    lines = [ln for ln in lines if ln]
    assert lines[0] == ": keep-alive" and lines[-1] == "data: [DONE]"
    assert sum(ln.startswith("data: {") for ln in lines) == 3


def test_a_request_the_worker_refuses_fails_alone_streaming_or_not(server, http):
    """Past the router's checks (made blind here to the top of the vocabulary), the worker
    refuses a token id outside its vocabulary: that request alone gets an OpenAI error, a
    stream ends with an error event and [DONE], the replica and a stream beside it go on."""
    serving = server.deployment.serving
    vocab = serving.vocab_size
    want = greedy(http)
    box = {}
    thread = threading.Thread(target=lambda: box.update(got=greedy(http, max_tokens=24)))
    on_loop(server, lambda: setattr(serving, "vocab_size", vocab + 100))
    try:
        thread.start()
        bad = {"prompt": [5, 6, vocab + 7], "max_tokens": 4}
        err = assert_error(http.post("/v1/completions", json=bad), 400)
        assert "vocabulary" in err["message"] and "127.0.0.1" not in err["message"]
        with http.stream("POST", "/v1/completions", json={**bad, "stream": True}) as r:
            assert r.status_code == 200
            events = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and '"error"' in events[-2], events
    finally:
        on_loop(server, lambda: setattr(serving, "vocab_size", vocab))
        thread.join(60)
    assert box["got"] == want
    assert all(r.alive for r in server.deployment.frontend.replicas)
