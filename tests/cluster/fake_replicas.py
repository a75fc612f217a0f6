"""A replica that holds requests until the test finishes them, for frontend tests."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from folio.cluster.frontend import AdmissionConfig, Frontend
from folio.cluster.metrics import RequestMetrics
from folio.protos.messages import EngineRequest, RequestOutput, SamplingParams
from folio.router.engine_client import RequestFailed


class FakeReplica:
    """Holds requests until the test finishes them; same surface the frontend uses."""

    def __init__(self, index: int):
        self.index = index
        self.alive = True
        self.error = None
        self.overdue = False
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

    def die(self, running: bool = True) -> None:
        """Fail the replica; its requests count as running on it (suspects) unless not running."""
        self.alive = False
        self.error = "gone"
        for sink in self.sinks.values():
            sink(RequestFailed("gone", suspect=running))
        self.sinks.clear()
        self.on_finished(self)

    def fail_alone(self, rid: str, message: str) -> None:
        """The request's own fault: fails it alone, the replica goes on."""
        self.sinks.pop(rid)(RequestFailed(message, retryable=False))
        self.on_finished(self)

    def stats(self):
        return None


def req(rid: str, priority: int = 0) -> EngineRequest:
    return EngineRequest(rid, [1, 2, 3], SamplingParams(), priority)


async def drain(stream) -> list[RequestOutput]:
    """Every output of a stream; a stream that never ends fails the test instead of hanging it."""

    async def outputs():
        return [out async for out in stream]

    return await asyncio.wait_for(outputs(), 5)


def make(n_replicas: int = 2, capacity: int = 1, max_queued: int = 2):
    reps = [FakeReplica(i) for i in range(n_replicas)]
    return reps, Frontend(
        reps, RequestMetrics(), AdmissionConfig(max_queued_requests=max_queued), replica_capacity=capacity
    )
