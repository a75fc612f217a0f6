"""Replica choice: the real Frontend over two replicas, each a worker process behind gRPC.

Requests sharing a long prefix go to the replica that holds it (and hit its
prefix cache there); a burst beyond what affinity is worth spills over; unrelated
requests spread over both replicas.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from folio.cluster.frontend import Frontend
from folio.cluster.metrics import RequestMetrics
from folio.cluster.replica import Replica
from folio.cluster.routing import AffinityRouter, RoundRobinRouter, make_router
from folio.protos import worker_pb2 as pb
from folio.protos.config import SchedulerConfig
from folio.protos.messages import EngineRequest, SamplingParams
from tests.prometheus import sample, samples
from tests.worker_processes import CREDENTIALS, WorkerProcesses

BLOCK = 16
PREFIX = [1] + [random.Random(0).randrange(3, 380) for _ in range(8 * BLOCK - 1)]  # 8 full blocks
PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

pytestmark = pytest.mark.slow


async def _frontend(addresses: list[str], model: str, policy) -> Frontend:
    metrics = RequestMetrics()
    replicas = [
        Replica(i, [a], SchedulerConfig(block_size=BLOCK, max_num_seqs=8), metrics, credentials=CREDENTIALS)
        for i, a in enumerate(addresses)
    ]
    load = pb.LoadModelRequest(model_path=model, block_size=BLOCK, num_blocks=128, dtype="float32", device="cpu")
    await asyncio.gather(*(r.start(load) for r in replicas))
    return Frontend(replicas, metrics, policy=policy)


async def _run(frontend: Frontend, prompts: dict[str, list[int]]) -> dict[str, int]:
    """Send all prompts at once; -> request id: index of the replica that served it."""
    streams = {rid: frontend.generate(EngineRequest(rid, p, PARAMS)) for rid, p in prompts.items()}

    async def drain(s):
        async for _ in s:
            pass

    await asyncio.gather(*(drain(s) for s in streams.values()))
    return {rid: s.replica.index for rid, s in streams.items()}


def _hit_tokens(frontend: Frontend) -> list[int]:
    return [r.scheduler.prefix_hit_tokens for r in frontend.replicas]


def _unrelated(n: int, seed: int) -> dict[str, list[int]]:
    rng = random.Random(seed)
    return {f"u{seed}-{i}": [1] + [rng.randrange(3, 380) for _ in range(40)] for i in range(n)}


async def _scenario(addresses: list[str], model: str) -> None:
    router = AffinityRouter(BLOCK)
    frontend = await _frontend(addresses, model, router)
    try:
        # Warm one replica with the prefix.
        first = (await _run(frontend, {"warm": PREFIX + [5, 6, 7]}))["warm"]
        other = 1 - first
        before = _hit_tokens(frontend)

        # A few more sharing it, all at once: all go where the prefix is, and hit there.
        placed = await _run(frontend, {f"p{i}": PREFIX + [10 + i, 11, 12] for i in range(3)})
        assert set(placed.values()) == {first}
        hits = _hit_tokens(frontend)
        assert hits[first] - before[first] == 3 * len(PREFIX)
        assert hits[other] == before[other] == 0
        assert router.decisions[(first, "affinity")] == 3

        # A burst far beyond what one cached prefix is worth: the first few still follow
        # the prefix, then load sends one to the other replica; from then on the prefix is
        # queued there as well, both hit, and load alone splits the rest.
        placed = await _run(frontend, {f"b{i}": PREFIX + [20 + i, 11, 12] for i in range(12)})
        assert [placed[f"b{i}"] for i in range(3)] == [first] * 3
        counts = [list(placed.values()).count(i) for i in range(2)]
        assert counts[other] >= 3, counts
        assert _hit_tokens(frontend)[other] >= (counts[other] - 1) * len(PREFIX)

        # Unrelated prompts share nothing: load alone decides, and it spreads them.
        placed = await _run(frontend, _unrelated(8, seed=1))
        counts = [list(placed.values()).count(i) for i in range(2)]
        assert min(counts) >= 2, counts
        text = frontend.metrics_text()
        assert sample(text, "folio_routing_decisions_total", replica=str(first), reason="affinity") >= 1
        assert any(
            name == "folio_routing_decisions_total" and ("reason", "load") in labels for name, labels in samples(text)
        )
    finally:
        for r in frontend.replicas:
            await r.close()


def test_affinity_routing(tiny_model):
    with WorkerProcesses(2) as addresses:
        asyncio.run(_scenario(addresses, tiny_model("llama")))


def test_round_robin_alternates():
    class Fake:
        def __init__(self, index):
            self.index = index

    replicas = [Fake(0), Fake(1)]
    router = RoundRobinRouter()
    picks = [router(replicas, EngineRequest(str(i), [1], PARAMS)).index for i in range(4)]
    assert picks == [0, 1, 0, 1]
    assert router.decisions == {(0, "load"): 2, (1, "load"): 2}
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_router("random", BLOCK)
