"""One replica as the head sees it: a scheduler and a step loop over gRPC.

The step loop keeps up to two steps in flight: while the workers compute step
N, the head has already scheduled, encoded and sent step N+1, so a worker
never waits for the head between steps. Each rank of the replica gets every
step on its own ExecuteSteps stream and answers in order; rank 0's result
drives the scheduler.

A reader task per rank waits on its stream even when the replica is idle, so a
worker that dies (process gone, connection reset, keepalive timeout, failed
step) is noticed at once: the replica is then marked dead and every request it
holds fails with RequestFailed. It never comes back; the frontend stops
routing to it and /health reports it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import grpc

from cluster.config import SchedulerConfig
from cluster.metrics import RequestMetrics
from cluster.scheduler import Scheduler, SchedulerStats
from protos import worker_pb2 as pb
from protos import worker_pb2_grpc
from protos.codec import decode_step_result, encode_step_request
from protos.messages import EngineRequest, RequestOutput, StepRequest, StepResult
from worker.server import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

MAX_STEPS_IN_FLIGHT = 2

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Ping an idle connection so a worker whose node vanished is noticed.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class WorkerLoadError(RuntimeError):
    """A worker of the replica could not load the model (bad path, out of memory, ...)."""


class RequestFailed(RuntimeError):
    """A request cannot finish: its replica lost a worker (or no replica can take it)."""


# What a request's consumer receives: outputs, then possibly the failure that ended it.
Sink = Callable[[Union[RequestOutput, RequestFailed]], None]


@dataclass
class _Tracked:
    sink: Sink
    arrival: float
    scheduled: bool = False
    last_token_time: Optional[float] = None


class Replica:
    """Call start() on the head's event loop; every method must run on that loop."""

    def __init__(self, index: int, addresses: list[str], config: SchedulerConfig,
                 metrics: RequestMetrics, on_finished: Callable[["Replica"], None] = lambda r: None):
        self.index = index
        self.addresses = addresses
        self.config = config              # max_model_len and eos ids are settled in start()
        self.metrics = metrics
        self.on_finished = on_finished    # a request finished here: room for queued work
        self.scheduler: Optional[Scheduler] = None
        self.vocab_size = 0
        self.alive = False
        self.error: Optional[str] = None
        self._requests: dict[str, _Tracked] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._calls: list = []
        self._results: list[asyncio.Queue] = []
        self._tasks: list[asyncio.Task] = []
        self._inflight: deque[StepRequest] = deque()
        self._wakeup = asyncio.Event()

    # ---------------------------------------------------------------- lifecycle
    async def start(self, load: pb.LoadModelRequest) -> None:
        """Load the model on every rank, build the scheduler, start the step loop.

        addresses[i] is rank i: with several addresses each worker gets `load`
        with its rank and world_size set (load.rendezvous must be set then).
        All ranks load concurrently; they meet in their process group.
        """
        self._channels = [grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS)
                          for a in self.addresses]
        stubs = [worker_pb2_grpc.WorkerStub(c) for c in self._channels]
        loads = []
        for rank in range(len(stubs)):
            m = pb.LoadModelRequest()
            m.CopyFrom(load)
            m.rank, m.world_size = rank, len(stubs)
            loads.append(m)
        try:
            infos = await asyncio.gather(*(s.LoadModel(m) for s, m in zip(stubs, loads)))
        except grpc.aio.AioRpcError as e:
            raise WorkerLoadError(f"replica {self.index}: a worker could not load the model: "
                                  f"{e.details()}") from None
        info = infos[0]
        # Ranks may size their pools differently; block ids below the smallest fit everywhere.
        num_blocks = min(i.num_blocks for i in infos)
        max_model_len = min(self.config.max_model_len or info.max_position_embeddings,
                            info.max_position_embeddings)
        self.config = replace(self.config, block_size=info.block_size, max_model_len=max_model_len,
                              eos_token_ids=tuple(info.eos_token_ids))
        self.scheduler = Scheduler(self.config, num_blocks)
        self.vocab_size = info.vocab_size
        self._calls = [s.ExecuteSteps() for s in stubs]
        self._results = [asyncio.Queue() for _ in stubs]
        self.alive = True
        self._tasks = [asyncio.create_task(self._read(rank)) for rank in range(len(stubs))]
        self._tasks.append(asyncio.create_task(self._loop()))
        log.info("replica %d ready: %s, %d KV blocks of %d tokens, device %s", self.index,
                 ", ".join(self.addresses), num_blocks, info.block_size, info.device)

    async def close(self) -> None:
        """Stop the loop, ask the workers to shut down, close the channels."""
        self._fail("replica shut down")
        for stub in (worker_pb2_grpc.WorkerStub(c) for c in self._channels):
            try:
                await stub.Shutdown(pb.ShutdownRequest(), timeout=5)
            except grpc.aio.AioRpcError:
                pass              # already gone
        for c in self._channels:
            await c.close()

    # ---------------------------------------------------------------- requests
    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    def add_request(self, request: EngineRequest, sink: Sink) -> None:
        """Queue a request; its outputs go to sink. ValueError when it can never fit here."""
        self.scheduler.add_request(request)
        t = _Tracked(sink, request.arrival_time or time.monotonic())
        if request.output_token_ids:       # resumed from a failed replica: its TTFT was measured there
            t.scheduled, t.last_token_time = True, time.monotonic()
        self._requests[request.request_id] = t
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        """Finish a request now (client gone, stop string seen); its sink gets the abort."""
        if request_id in self._requests:
            self._deliver(self.scheduler.abort_requests([request_id]))
            self._wakeup.set()      # its finished id should reach the workers soon

    def stats(self) -> Optional[SchedulerStats]:
        return self.scheduler.stats() if self.scheduler is not None else None

    # ---------------------------------------------------------------- step loop
    async def _loop(self) -> None:
        try:
            while True:
                await self._fill_pipeline()
                if not self._inflight:
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                step = self._inflight.popleft()
                results = [await q.get() for q in self._results]
                result = decode_step_result(results[0])
                if result.step_id != step.step_id:
                    raise RuntimeError(f"worker answered step {result.step_id}, expected {step.step_id}")
                self._deliver(self.scheduler.update_from_output(step, result))
        except asyncio.CancelledError:
            raise
        except Exception as e:         # noqa: BLE001 - any loop failure kills the replica
            log.exception("replica %d step loop failed", self.index)
            self._fail(f"step loop failed: {type(e).__name__}: {e}")

    async def _fill_pipeline(self) -> None:
        """Schedule and send steps until two are in flight or there is nothing to do."""
        while len(self._inflight) < MAX_STEPS_IN_FLIGHT:
            step = self.scheduler.schedule()
            if not (step.new_requests or step.cached_requests or step.finished_ids):
                # Nothing to run now; close the scheduler's record of the empty step.
                self.scheduler.update_from_output(step, StepResult(step.step_id))
                return
            self._note_scheduled(step)
            self._inflight.append(step)
            message = encode_step_request(step)
            for call in self._calls:
                await call.write(message)

    def _note_scheduled(self, step: StepRequest) -> None:
        now = time.monotonic()
        for r in step.new_requests:
            t = self._requests.get(r.request_id)
            if t is not None and not t.scheduled:
                t.scheduled = True
                self.metrics.queue_time.observe(now - t.arrival)

    async def _read(self, rank: int) -> None:
        call = self._calls[rank]
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    raise ConnectionError("the worker closed its step stream")
                self._results[rank].put_nowait(message)
        except asyncio.CancelledError:
            raise
        except Exception as e:         # noqa: BLE001 - any stream failure kills the replica
            detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
            log.error("replica %d lost worker %s: %s", self.index, self.addresses[rank], detail)
            self._fail(f"lost worker {self.addresses[rank]}: {detail}")

    # ---------------------------------------------------------------- outputs
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        m = self.metrics
        for out in outputs:
            t = self._requests.get(out.request_id)
            if t is None:
                continue
            if out.new_token_ids:
                m.generation_tokens += len(out.new_token_ids)
                if t.last_token_time is None:
                    m.ttft.observe(now - t.arrival)
                    m.prompt_tokens += out.num_prompt_tokens
                else:
                    m.itl.observe(now - t.last_token_time)
                t.last_token_time = now
            if out.finished:
                del self._requests[out.request_id]
                m.e2e.observe(now - t.arrival)
                m.finished[out.finish_reason] = m.finished.get(out.finish_reason, 0) + 1
            t.sink(out)
            if out.finished:
                self.on_finished(self)

    def _fail(self, reason: str) -> None:
        """Mark the replica dead and fail everything it holds. Idempotent."""
        if self.error is not None:
            return
        self.alive = False
        self.error = reason
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for call in self._calls:
            call.cancel()
        requests, self._requests = self._requests, {}
        for t in requests.values():
            t.sink(RequestFailed(f"replica {self.index} failed: {reason}"))
        self.on_finished(self)
