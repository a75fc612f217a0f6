"""The serving path end to end: Ray on 127.0.0.1, a worker actor behind gRPC, uvicorn
on a free port (the server of conftest.py), the openai SDK as the client, the bundled SmolLM2."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests import REPO_ROOT
from tests.e2e.reference import reference_llm
from tests.e2e.serving.server import MAX_MODEL_LEN, NUM_KV_BLOCKS

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


# ---------------------------------------------------------------- basics


def test_chat_answers_and_completions_work(client, model):
    r = client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=20, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    r2 = client.chat.completions.create(model=model, messages=parts, max_tokens=20, temperature=0)
    assert r2.choices[0].message.content == r.choices[0].message.content

    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 5


def test_prompt_forms(client, model, server):
    ids = httpx.post(server.base_url + "/tokenize", json={"prompt": "Hello there"}).json()["tokens"]
    kw = dict(model=model, max_tokens=3, temperature=0)
    text = client.completions.create(prompt="Hello there", **kw).choices[0].text
    assert client.completions.create(prompt=ids, **kw).choices[0].text == text
    r = client.completions.create(prompt=[ids, ids[:1]], **kw)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == text
    assert r.usage.prompt_tokens == len(ids) + 1
    r = client.completions.create(prompt=["Hello there", "Hi"], n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == text  # greedy: n copies agree
    assert r.usage.completion_tokens == 12


def test_models_tokenize_health_request_id(server, model):
    h = httpx.Client(base_url=server.base_url)
    models = h.get("/v1/models").json()
    assert models["data"][0]["id"] == model and models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    tok = h.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    assert h.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "Hello world"
    chat_tok = h.post("/tokenize", json={"messages": CHAT}).json()
    assert chat_tok["count"] > tok["count"]
    assert h.get("/health").status_code == 200
    rid = "trace-42/ä ;=".encode()  # any header bytes, not only ASCII
    r = h.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers={"x-request-id": rid})
    assert r.status_code == 200 and dict(r.headers.raw)[b"x-request-id"] == rid
    assert "trace-42" in r.json()["id"]


# ---------------------------------------------------------------- sampling features


def _stream_completion(client, **kw):
    text, finish, usage = {}, {}, None
    for ch in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        for c in ch.choices:
            text[c.index] = text.get(c.index, "") + c.text
            finish[c.index] = c.finish_reason or finish.get(c.index)
        usage = ch.usage or usage
    return text, finish, usage


def _stream_chat(client, **kw):
    text, finish, usage = {}, {}, None
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        for c in ch.choices:
            text[c.index] = text.get(c.index, "") + (c.delta.content or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
        usage = ch.usage or usage
    return text, finish, usage


def test_streaming_matches_non_streaming(client, model):
    for params in ({"temperature": 0}, {"temperature": 1.0, "top_p": 0.9, "seed": 1234}):
        kw = dict(model=model, prompt="Write a short poem about the sea.", max_tokens=12, n=2, **params)
        full = client.completions.create(**kw)
        text, finish, usage = _stream_completion(client, **kw)
        assert text == {c.index: c.text for c in full.choices}
        assert finish == {c.index: c.finish_reason for c in full.choices}
        assert usage.completion_tokens == full.usage.completion_tokens

        ckw = dict(model=model, messages=CHAT, max_completion_tokens=12, n=2, **params)
        full = client.chat.completions.create(**ckw)
        text, finish, usage = _stream_chat(client, **ckw)
        assert text == {c.index: c.message.content for c in full.choices}
        assert finish == {c.index: c.finish_reason for c in full.choices}
        assert usage.prompt_tokens == full.usage.prompt_tokens


def test_seeds_reproduce_and_differ(client, model):
    kw = dict(model=model, prompt="Once upon a time", max_tokens=10, temperature=1.0)
    a = client.completions.create(seed=7, n=3, **kw)
    b = client.completions.create(seed=7, n=3, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice has its own seed


def test_stop_strings(client, model):
    kw = dict(model=model, prompt="Count: 1, 2, 3, 4, 5, 6, 7, 8, 9,", max_tokens=20, temperature=0)
    free = client.completions.create(**kw).choices[0].text
    assert " 11" in free, free
    r = client.completions.create(stop=[" 11"], **kw).choices[0]
    assert r.finish_reason == "stop" and r.text == free[: free.index(" 11")]
    text, finish, _ = _stream_completion(client, stop=" 11", **kw)
    assert text[0] == r.text and finish[0] == "stop"
    r = client.completions.create(stop=[" 11"], extra_body={"include_stop_str_in_output": True}, **kw)
    assert r.choices[0].text.endswith(" 11")


def test_logprobs_and_echo(client, model, server):
    ids = httpx.post(server.base_url + "/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    # What evaluation harnesses send to score a continuation.
    r = client.completions.create(model=model, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs[1:])
    assert r.choices[0].text.startswith("The capital of France is")
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    c = client.chat.completions.create(
        model=model, messages=CHAT, max_completion_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.logprob - 1e-6  # greedy takes the best
    assert "".join(e.token for e in content) == c.choices[0].message.content


def test_greedy_matches_in_process_engine(client, model):
    from folio.protos.messages import SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "List three colors:"]
    params = SamplingParams(max_tokens=16, temperature=0)
    expected = [r.outputs[0].text for r in reference_llm().generate(prompts, params)]
    served = client.completions.create(model=model, prompt=prompts, max_tokens=16, temperature=0)
    assert [c.text for c in served.choices] == expected


# ---------------------------------------------------------------- load, disconnects, errors


def test_64_concurrent_streams(server, model):
    n, max_tokens = 64, 8

    async def one(aclient, i):
        chunks, usage = 0, None
        stream = await aclient.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Say a number bigger than {i}."}],
            max_completion_tokens=max_tokens,
            temperature=0.7,
            seed=i,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body={"ignore_eos": True},
        )
        async for ch in stream:
            chunks += bool(ch.choices)
            usage = ch.usage or usage
        return usage

    async def main():
        async with openai.AsyncOpenAI(
            base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300
        ) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(n)))

    usages = asyncio.run(main())
    assert all(u.completion_tokens == max_tokens for u in usages)
    assert all(u.total_tokens == u.prompt_tokens + max_tokens for u in usages)
    _assert_idle_and_intact(server)
    assert server.metric("folio_time_to_first_token_seconds_count") >= n
    assert server.metric("folio_inter_token_latency_seconds_count") >= n * (max_tokens - 1)


def test_side_by_side_bench_counts_every_token_and_refuses_a_short_run(server):
    """`folio bench llamacpp`'s comparison (here folio against itself): each round's tokens
    are all the workload asked for, every round and warm-up draws a workload of its own
    (no server answers a prompt it saw in an earlier round), and a server that answers
    less fails the run instead of looking fast."""
    from folio.cluster.entrypoints.bench.llamacpp import compare
    from folio.cluster.entrypoints.bench.workload import SyntheticRequest

    url = server.base_url + "/v1"
    drawn: list[int] = []

    def workload(k: int) -> list:
        drawn.append(k)
        return [SyntheticRequest([100 + i + 10 * k, 200 + i, 300 + i], 4 + i) for i in range(4)]

    rows = compare({"a": url, "b": url}, workload, [2, 1], rounds=2, seed=0)
    assert [r["concurrency"] for r in rows] == [2, 1]
    assert all(len(r["rounds"]["a"]) == len(r["rounds"]["b"]) == 2 for r in rows)
    assert all(r["a_tok_s"] > 0 and r["b_tok_s"] > 0 for r in rows)
    assert sorted(drawn) == list(range(6))  # a warm-up and two rounds at each concurrency, none repeated
    too_long = workload(0) + [SyntheticRequest([7] * 8, MAX_MODEL_LEN)]  # refused: cannot fit the context
    with pytest.raises(RuntimeError, match="1 failed"):
        compare({"a": url}, lambda k: too_long, [2], rounds=1, seed=0)


def test_greedy_agreement_compares_texts_token_by_token(server):
    """`folio bench llamacpp`'s greedy check (here folio against itself): every prompt's
    continuation is identical on both, all its tokens shared."""
    from folio.cluster.entrypoints.bench.llamacpp import GREEDY_PROMPTS, greedy_agreement, shared_prefix

    url = server.base_url + "/v1"
    rows = greedy_agreement({"folio": url, "again": url}, server.deployment.serving.tokenizer, max_tokens=6)
    assert [r["prompt"] for r in rows] == list(GREEDY_PROMPTS)
    for r in rows:
        assert len(set(r["texts"].values())) == 1 and r["texts"]["folio"]
        assert r["shared_tokens"] == r["tokens"][0] == r["tokens"][1] and "folio_margin" not in r
    assert shared_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2 and shared_prefix([[5], [6]]) == 0


def _assert_idle_and_intact(server, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while server.metric("folio_kv_cache_free_blocks") != NUM_KV_BLOCKS:
        assert time.monotonic() < deadline, "blocks were not freed"
        time.sleep(0.1)
    assert server.metric("folio_num_requests_running") == 0
    for r in server.deployment.frontend.replicas:
        server.call(r.scheduler.check_integrity)


def test_disconnect_mid_stream_frees_blocks(server, model):
    body = {"model": model, "prompt": "Tell me a long story.", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=60) as h:
        with h.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            assert server.metric("folio_kv_cache_free_blocks") < NUM_KV_BLOCKS
    _assert_idle_and_intact(server)
    assert server.metric("folio_request_success_total", '{finished_reason="abort"}') >= 1

    # Non-streaming: the client gives up while the request still runs.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.base_url + "/v1/completions",
            timeout=2,
            json={"model": model, "prompt": "Hi", "max_tokens": 500, "ignore_eos": True},
        )
    _assert_idle_and_intact(server)


BAD_REQUESTS = [
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 5', 400),  # malformed JSON
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, 400),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, 400),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999999": 1}}, 400),
    ("/v1/completions", {"prompt": ""}, 400),
    ("/v1/completions", {"prompt": []}, 400),
    ("/v1/completions", {"prompt": [1, "a"]}, 400),
    ("/v1/completions", {"prompt": [10**7]}, 400),
    ("/v1/completions", {"prompt": [-1]}, 400),
    ("/v1/completions", {"max_tokens": 5}, 400),  # no prompt
    ("/v1/completions", {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400),  # over the context
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, 400),
    ("/v1/completions", {"prompt": "hi", "model": "no-such-model"}, 404),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {}, 400),
    ("/v1/chat/completions", {"messages": "hello"}, 400),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": -1}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": " x" * MAX_MODEL_LEN}]}, 400),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}
            ]
        },
        400,
    ),
    ("/v1/chat/completions", {"messages": CHAT, "model": "gpt-4"}, 404),
    ("/tokenize", {}, 400),
    ("/detokenize", {"tokens": [10**7]}, 400),
]


@pytest.mark.parametrize("path,body,status", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, model, path, body, status):
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": {"model": model, **body} if "model" not in body and path.startswith("/v1") else body}
    )
    r = httpx.post(server.base_url + path, timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err


@pytest.mark.parametrize(
    "part,says",
    [
        ({"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}, "type 'image_url' are not supported"),
        ({"type": "text"}, "needs its 'text' string"),
    ],
)
def test_a_content_part_folio_cannot_serve_is_named(server, model, part, says):
    body = {"model": model, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]}
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json=body)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"]


def test_serves_after_bad_requests_and_ignores_unknown_fields(server, model):
    r = httpx.post(
        server.base_url + "/v1/completions",
        timeout=60,
        json={
            "model": model,
            "prompt": "Hi",
            "max_tokens": 2,
            "seed": None,
            "logprobs": None,
            "some_future_field": {"x": 1},
            "guided_json": None,
            "top_k": -1,
            "min_p": 0.0,
            "repetition_penalty": 1.1,
            "min_tokens": 1,
            "ignore_eos": True,
        },
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    _assert_idle_and_intact(server)


def test_full_queue_is_429_with_retry_after(server, client, model):
    fe = server.deployment.frontend
    saved = (fe.max_queued, fe.replica_capacity)
    server.call(lambda: (setattr(fe, "max_queued", 0), setattr(fe, "replica_capacity", 0)))
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=model, prompt="Hi", max_tokens=1)
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert server.metric("folio_request_rejected_total") >= 1
    finally:
        server.call(lambda: (setattr(fe, "max_queued", saved[0]), setattr(fe, "replica_capacity", saved[1])))
    assert client.completions.create(model=model, prompt="Hi", max_tokens=1).usage.completion_tokens == 1


# ---------------------------------------------------------------- worker failure


def test_replica_dies_with_its_worker():
    """A worker process that dies fails its requests at once and marks the replica dead."""
    from folio.cluster.frontend import Frontend
    from folio.cluster.metrics import RequestMetrics
    from folio.cluster.replica import Replica
    from folio.protos import worker_pb2 as pb
    from folio.protos.config import SchedulerConfig
    from folio.protos.messages import EngineRequest, SamplingParams
    from folio.protos.security import SECRET_ENV, channel
    from folio.protos.worker_pb2_grpc import WorkerStub
    from folio.router.engine_client import RequestFailed
    from tests.worker_processes import CREDENTIALS

    proc = subprocess.Popen(
        [sys.executable, "-m", "folio.worker.server", "--address", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, **{SECRET_ENV: CREDENTIALS.secret}),
        cwd=REPO_ROOT,
    )
    try:
        address = proc.stdout.readline().split()[-1]

        async def main():
            metrics = RequestMetrics()
            replica = Replica(0, [address], SchedulerConfig(max_model_len=256), metrics, credentials=CREDENTIALS)
            await replica.start(pb.LoadModelRequest(num_blocks=64))
            fe = Frontend([replica], metrics)
            stream = fe.generate(EngineRequest("r", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True)))
            await stream.__anext__()
            # Steps run on their own thread: Health answers while they keep coming.
            async with channel(address, CREDENTIALS) as ch:
                health = await WorkerStub(ch).Health(pb.HealthRequest(), timeout=5)
            assert health.model_loaded and health.steps_executed >= 1
            proc.send_signal(signal.SIGKILL)
            with pytest.raises(RequestFailed):
                async for _ in stream:
                    pass
            assert not replica.alive and not fe.healthy and not fe.ready
            await replica.close()

        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        proc.kill()
        proc.wait()


def test_models_retrieve_and_an_unknown_id(client, model):
    assert client.models.retrieve(model).id == model
    for other in ("nope", "org/some-model"):
        with pytest.raises(openai.NotFoundError) as e:
            client.models.retrieve(other)
        assert e.value.body["code"] == "model_not_found"


def test_tokenizer_info_names_the_special_tokens_and_template(server):
    from folio.worker.loader import default_model_path, load_tokenizer

    tok = load_tokenizer(default_model_path())
    info = httpx.get(server.base_url + "/tokenizer_info").json()
    assert (info["eos_token"], info["eos_token_id"]) == (tok.eos_token, tok.eos_token_id)
    assert info["chat_template"] == tok.chat_template and info["model_max_length"] == MAX_MODEL_LEN
    assert info["vocab_size"] >= len(tok)


def test_head_probes_answer_without_a_body(server):
    for path in ("/health", "/metrics"):
        r = httpx.head(server.base_url + path)
        assert r.status_code == 200 and r.content == b"", path


def test_usage_counts_prompt_tokens_from_the_prefix_cache(client, model):
    prompt = "A unique opening for the cache test: " + " ".join(f"w{i}" for i in range(120))
    first = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    # every full block but the last, which must run for its logits
    assert 0 < cached < again.usage.prompt_tokens and cached % 16 == 0


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_scores_the_prompt(client, model, stream):
    prompt = "The quick brown fox jumps over the lazy dog"
    kw = dict(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    if stream:
        parts = [c for c in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)]
        text = "".join(c.choices[0].text for c in parts if c.choices)
        tokens = [t for c in parts if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        finish = [c.choices[0].finish_reason for c in parts if c.choices and c.choices[0].finish_reason]
        usage = parts[-1].usage
    else:
        r = client.completions.create(**kw)
        text, tokens, finish, usage = (
            r.choices[0].text,
            r.choices[0].logprobs.tokens,
            [r.choices[0].finish_reason],
            r.usage,
        )
        lps = r.choices[0].logprobs.token_logprobs
        assert lps[0] is None and all(lp is not None and lp <= 0 for lp in lps[1:])
    assert text == prompt and "".join(tokens) == prompt
    assert finish == ["length"] and usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt=prompt, max_tokens=0)


def test_worker_processes_run_at_the_niceness_folio_gives_them(server):
    """Ray would start them at 15, where any busy process on the node stalls the
    torch threads' barriers (cluster/placement.py, WORKER_NICENESS)."""
    from folio.cluster.placement import WORKER_NICENESS

    workers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::WorkerActor"):
                    workers.append(int(pid))
        except OSError:
            continue
    assert workers, "no worker actor process found"
    assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in workers} == {WORKER_NICENESS}
