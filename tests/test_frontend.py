"""Admission, routing and the admission queue of the frontend, against fake replicas."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from cluster.frontend import Frontend, NotReady, QueueFull
from cluster.metrics import RequestMetrics
from cluster.replica import RequestFailed
from protos.messages import EngineRequest, RequestOutput, SamplingParams


class FakeReplica:
    """Holds requests until the test finishes them; same surface the frontend uses."""

    def __init__(self, index: int):
        self.index = index
        self.alive = True
        self.error = None
        self.config = SimpleNamespace(max_num_seqs=2, max_model_len=128)
        self.sinks: dict = {}
        self.requests: dict = {}
        self.on_finished = lambda r: None

    @property
    def num_unfinished(self) -> int:
        return len(self.sinks)

    def add_request(self, request: EngineRequest, sink) -> None:
        if len(request.prompt_token_ids) > self.config.max_model_len:
            raise ValueError("too long")
        self.sinks[request.request_id] = sink
        self.requests[request.request_id] = request

    def emit(self, rid: str, tokens: list[int]) -> None:
        self.sinks[rid](RequestOutput(rid, tokens))

    def finish(self, rid: str, reason: str = "stop") -> None:
        self.sinks.pop(rid)(RequestOutput(rid, [7], finish_reason=reason))
        self.on_finished(self)

    def abort(self, rid: str) -> None:
        self.finish(rid, "abort")

    def die(self) -> None:
        self.alive = False
        for sink in self.sinks.values():
            sink(RequestFailed("gone"))
        self.sinks.clear()
        self.on_finished(self)

    def stats(self):
        return None


def req(rid: str, priority: int = 0) -> EngineRequest:
    return EngineRequest(rid, [1, 2, 3], SamplingParams(), priority)


async def drain(stream) -> list[RequestOutput]:
    return [out async for out in stream]


def make(n_replicas: int = 2, capacity: int = 1, max_queued: int = 2):
    reps = [FakeReplica(i) for i in range(n_replicas)]
    return reps, Frontend(reps, RequestMetrics(), max_queued=max_queued, replica_capacity=capacity)


def test_least_loaded_then_queue_in_priority_order():
    async def main():
        (a, b), fe = make()
        s1, s2 = fe.generate(req("1")), fe.generate(req("2"))
        assert (s1.replica, s2.replica) == (a, b)           # spread over both
        low, high = fe.generate(req("low", priority=5)), fe.generate(req("high", priority=0))
        assert fe.num_queued == 2 and low.replica is None
        with pytest.raises(QueueFull) as e:
            fe.generate(req("3"))
        assert e.value.retry_after >= 1 and fe.metrics.rejected == 1
        b.finish("2")                                        # room: the better priority goes first
        assert high.replica is b and low.replica is None
        a.finish("1")
        assert low.replica is a and fe.num_queued == 0
        assert [o.finish_reason for o in await drain(s1)] == ["stop"]
    asyncio.run(main())


def test_abort_while_queued_and_while_running():
    async def main():
        (a,), fe = make(1)
        running, queued = fe.generate(req("r")), fe.generate(req("q"))
        queued.cancel()
        assert [o.finish_reason for o in await drain(queued)] == ["abort"] and fe.num_queued == 0
        running.cancel()
        assert [o.finish_reason for o in await drain(running)] == ["abort"]
        assert a.num_unfinished == 0
        with pytest.raises(ValueError):               # the id is free again, but this one never fits
            fe.generate(EngineRequest("r", [1] * 500, SamplingParams()))
    asyncio.run(main())


def test_dead_replica_requests_resume_elsewhere_first_in_line():
    async def main():
        (a, b), fe = make()
        on_a, on_b, queued = fe.generate(req("a")), fe.generate(req("b")), fe.generate(req("q"))
        a.emit("a", [5, 6])
        a.die()
        assert not fe.healthy and fe.ready and fe.metrics.resumed == 1
        assert on_a.replica is None and fe.num_queued == 2      # back in line, ahead of "q"
        b.finish("b")
        assert on_a.replica is b and queued.replica is None
        assert b.requests["a"].output_token_ids == [5, 6]     # it continues after what it streamed
        b.finish("a")
        assert [o.new_token_ids for o in await drain(on_a)] == [[5, 6], [7]]
        assert queued.replica is b
        last = fe.generate(req("last"))
        b.die()                                               # nothing left to resume on
        for s in (queued, last):
            with pytest.raises(RequestFailed):
                await drain(s)
        assert [o.finish_reason for o in await drain(on_b)] == ["stop"]
        with pytest.raises(NotReady):
            fe.generate(req("x"))
    asyncio.run(main())


def test_a_request_resumes_at_most_max_request_retries_times():
    async def main():
        reps = [FakeReplica(i) for i in range(3)]
        fe = Frontend(reps, RequestMetrics(), replica_capacity=1, max_request_retries=1)
        stream = fe.generate(req("r"))
        first = stream.replica
        first.die()
        second = stream.replica
        assert second is not None and second is not first
        second.die()
        with pytest.raises(RequestFailed):
            await drain(stream)
        assert fe.metrics.resumed == 1 and fe.ready
    asyncio.run(main())
