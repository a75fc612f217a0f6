"""The engine core of one replica: schedule, execute, update.

An executor is anything that runs a StepRequest on every rank of the replica
and returns rank 0's StepResult: the in-process worker here, gRPC stubs when
serving (cluster/replica.py).
"""

from __future__ import annotations

import logging
from typing import Iterable, Protocol

from folio.cluster.scheduler import Scheduler
from folio.protos.messages import EngineRequest, RequestOutput, StepRequest, StepResult

log = logging.getLogger(__name__)


class Executor(Protocol):
    num_blocks: int

    def execute(self, step: StepRequest) -> StepResult: ...


class InProcessExecutor:
    """Calls a Worker directly: no network, same step messages."""

    def __init__(self, worker):
        self.worker = worker
        self.num_blocks = worker.num_blocks

    def execute(self, step: StepRequest) -> StepResult:
        return self.worker.execute_step(step)


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor):
        self.scheduler = scheduler
        self.executor = executor

    def add_request(self, request: EngineRequest) -> None:
        self.scheduler.add_request(request)

    def abort(self, request_ids: Iterable[str]) -> list[RequestOutput]:
        return self.scheduler.abort_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        step = self.scheduler.schedule()
        result = self.executor.execute(step)
        return self._refused(result) + self.scheduler.update_from_output(step, result)

    def _refused(self, result: StepResult) -> list[RequestOutput]:
        """Requests the worker refused (StepResult.errors) end alone, as aborted."""
        failed = self.scheduler.fail_requests(e.request_id for e in result.errors)
        for e in result.errors:
            if e.request_id in failed:
                log.warning("request %s refused by the worker: %s", e.request_id, e.message)
        return [RequestOutput(rid, [], finish_reason="abort") for rid in failed]
