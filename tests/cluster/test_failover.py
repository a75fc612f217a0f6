"""A replica that loses its worker mid-stream: its requests resume on another
replica and their streams continue with exactly the tokens an unbroken run
gives (greedy and seeded sampling with penalties). Two worker processes behind
real gRPC, one replica each, the real Frontend and Replica."""

from __future__ import annotations

import asyncio
import json
import time

import jsonschema
import pytest

from folio.cluster.frontend import Frontend
from folio.cluster.metrics import RequestMetrics
from folio.cluster.replica import Replica
from folio.protos import worker_pb2 as pb
from folio.protos.config import SchedulerConfig
from folio.protos.grammar import Grammar
from folio.protos.messages import EngineRequest, SamplingParams
from folio.router.engine_client import RequestFailed
from folio.worker.loader import load_tokenizer
from tests.model_fixtures import make_tiny_chat_model
from tests.worker_processes import CREDENTIALS, WorkerProcesses

pytestmark = pytest.mark.slow

MAX_TOKENS = 200
PARAMS = [
    SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1),
    SamplingParams(temperature=0.9, seed=3, frequency_penalty=0.4, max_tokens=MAX_TOKENS, ignore_eos=True),
]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42] * 7]


async def _collect(stream, kill_after: int = 0, kill=None) -> tuple[list[int], int]:
    tokens, logprobs = [], 0
    async for out in stream:
        tokens += out.new_token_ids
        logprobs += len(out.logprobs or [])
        if kill is not None and len(tokens) >= kill_after:
            kill()
            kill = None
    return tokens, logprobs


async def _scenario(addresses: list[str], model: str, kill_first, params: list[SamplingParams] = PARAMS) -> dict:
    metrics = RequestMetrics()
    replicas = [
        Replica(i, [a], SchedulerConfig(block_size=16, max_num_seqs=8), metrics, credentials=CREDENTIALS)
        for i, a in enumerate(addresses)
    ]
    for r in replicas:
        await r.start(
            pb.LoadModelRequest(model_path=model, block_size=16, num_blocks=128, dtype="float32", device="cpu")
        )
    first, second = replicas

    def prefer(name):
        def policy(live, request):
            want = first if request.request_id.startswith(name) else second
            return want if want in live else live[0]

        return policy

    try:
        fe = Frontend(replicas, metrics, policy=prefer("doomed"))
        # Reference: the same requests on the second replica, nothing failing.
        want = await asyncio.gather(
            *(_collect(fe.generate(EngineRequest(f"ref{i}", p, ps))) for i, (p, ps) in enumerate(zip(PROMPTS, params)))
        )
        doomed = [fe.generate(EngineRequest(f"doomed{i}", p, ps)) for i, (p, ps) in enumerate(zip(PROMPTS, params))]
        assert all(s.replica is first for s in doomed)
        got = await asyncio.gather(_collect(doomed[0], kill_after=10, kill=kill_first), _collect(doomed[1]))
        second.scheduler.check_integrity()
        return dict(
            want=want,
            got=got,
            first_alive=first.alive,
            resumed=metrics.resumed,
            moved=[s.replica is second for s in doomed],
            frontend=fe,
        )
    finally:
        for r in replicas:
            await r.close()


def test_requests_resume_on_another_replica_when_a_worker_dies(tiny_model):
    workers = WorkerProcesses(2)
    with workers as addresses:
        result = asyncio.run(_scenario(addresses, tiny_model("llama"), workers.procs[0].kill))
    assert not result["first_alive"], "the replica whose worker died must be marked dead"
    assert result["resumed"] == 2 and all(result["moved"])
    for (want_tokens, want_lps), (got_tokens, got_lps) in zip(result["want"], result["got"]):
        assert len(got_tokens) == MAX_TOKENS
        assert got_tokens == want_tokens
        assert got_lps == want_lps


def test_a_constrained_request_resumes_under_its_grammar(model_dir):
    """The other replica rebuilds the grammar's state from the tokens already streamed:
    the output goes on exactly as unbroken and still fits its schema."""
    model = make_tiny_chat_model(model_dir)  # random weights, SmolLM2's real vocabulary
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 24}
    schema["maxItems"] = 24
    constrained = SamplingParams(
        temperature=0, max_tokens=MAX_TOKENS, grammar=Grammar("json_schema", json.dumps(schema))
    )
    workers = WorkerProcesses(2)
    with workers as addresses:
        result = asyncio.run(_scenario(addresses, model, workers.procs[0].kill, [constrained, PARAMS[0]]))
    # The free request beside it may finish before the kill (the constrained one waits for
    # its grammar on the new worker meanwhile); the constrained one is always cut mid-way.
    assert not result["first_alive"] and result["resumed"] >= 1 and result["moved"][0]
    assert [tokens for tokens, _ in result["got"]] == [tokens for tokens, _ in result["want"]]
    tokens = result["got"][0][0]
    assert len(tokens) > 10  # it was cut mid-output
    jsonschema.validate(json.loads(load_tokenizer(model).decode(tokens, skip_special_tokens=True)), schema)


def test_without_a_live_replica_the_stream_fails(tiny_model):
    workers = WorkerProcesses(1)
    with workers as addresses:

        async def main():
            metrics = RequestMetrics()
            replica = Replica(0, addresses, SchedulerConfig(), metrics, credentials=CREDENTIALS)
            await replica.start(pb.LoadModelRequest(model_path=tiny_model("llama"), num_blocks=64))
            try:
                fe = Frontend([replica], metrics)
                stream = fe.generate(EngineRequest("r", PROMPTS[0], PARAMS[0]))
                with pytest.raises(RequestFailed):
                    await _collect(stream, kill_after=5, kill=workers.procs[0].kill)
                return metrics.resumed
            finally:
                await replica.close()

        assert asyncio.run(main()) == 0


def test_a_request_on_two_replicas_that_died_is_not_resumed_again(tiny_model):
    """A poison request must not walk the cluster: running when its first replica died,
    it resumes once (max_request_retries 1, the default); running when the second died
    too, it fails instead of reaching the third, which stays alive and untouched."""
    workers = WorkerProcesses(3)
    with workers as addresses:

        async def main():
            metrics = RequestMetrics()
            replicas = [
                Replica(i, [a], SchedulerConfig(block_size=16, max_num_seqs=8), metrics, credentials=CREDENTIALS)
                for i, a in enumerate(addresses)
            ]
            load = pb.LoadModelRequest(
                model_path=tiny_model("llama"), block_size=16, num_blocks=64, dtype="float32", device="cpu"
            )
            await asyncio.gather(*(r.start(load) for r in replicas))
            try:
                fe = Frontend(replicas, metrics, policy=lambda live, request: live[0])
                stream = fe.generate(EngineRequest("poison", PROMPTS[0], PARAMS[0]))
                tokens, kills = 0, [workers.procs[0], workers.procs[1]]
                with pytest.raises(RequestFailed) as failed:
                    async for out in stream:
                        tokens += len(out.new_token_ids)
                        if kills and tokens >= 10 * (3 - len(kills)):
                            kills.pop(0).kill()
                return dict(
                    tokens=tokens,
                    resumed=metrics.resumed,
                    error=failed.value,
                    alive=[r.alive for r in replicas],
                    third=replicas[2].scheduler.stats(),
                )
            finally:
                for r in replicas:
                    await r.close()

        r = asyncio.run(main())
    assert r["alive"] == [False, False, True]
    assert r["resumed"] == 1 and 20 <= r["tokens"] < MAX_TOKENS
    assert r["error"].retryable and r["error"].suspect
    assert r["third"].num_running == r["third"].num_waiting == 0 and r["third"].prefix_query_tokens == 0


def test_a_big_step_after_small_ones_is_not_overdue():
    """A burst of prompts after a quiet spell of single decodes makes one long step;
    judged by the decodes' step times alone it would be 'hung' and the frontend would
    turn the burst away (429). Its expected time scales with its tokens instead."""
    from folio.protos.messages import CachedRequest, StepRequest
    from tests.worker_processes import CREDENTIALS

    replica = Replica(0, [], SchedulerConfig(), RequestMetrics(), credentials=CREDENTIALS)
    replica.alive = True
    replica._step_times.extend([0.06] * 8)  # single-token decodes
    replica._token_times.extend([0.06] * 8)

    def in_flight(tokens: int, seconds: float) -> None:
        step = StepRequest(1, cached_requests=[CachedRequest("r", [], 0, tokens)])
        replica._inflight.clear()
        replica._inflight.append((step, time.monotonic() - seconds))

    in_flight(512, 3.0)  # 512 prompt tokens: expected up to 0.06 s each
    assert not replica.overdue
    in_flight(1, 3.0)  # one decode token, 50x slower than any before: something is wrong
    assert replica.overdue
    in_flight(512, replica.step_timeout / 2 + 1)  # never later than half the deadline
    assert replica.overdue
