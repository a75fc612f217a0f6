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
routing to it and the supervisor (cluster/autoscaler.py) replaces it.

A worker can also hang without dying: a stuck collective or a GPU hang blocks
its step thread while its gRPC core still answers pings. So every step has a
deadline (`step_timeout`): a step that has not returned in time fails the
replica. Well before that the replica counts as `overdue` and takes no new
requests (see Replica.overdue).

Faults are contained at the smallest unit that holds them: a request that
cannot be encoded for the wire, or that the worker refuses (StepResult.errors),
fails alone with a non-retryable RequestFailed; the step goes on without it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import grpc

from folio.cluster.metrics import RequestMetrics
from folio.cluster.scheduler import Scheduler, SchedulerStats
from folio.protos import worker_pb2 as pb
from folio.protos import worker_pb2_grpc
from folio.protos.codec import decode_step_result, encode_step_request
from folio.protos.config import SchedulerConfig
from folio.protos.messages import EngineRequest, NewRequest, RequestOutput, StepRequest, StepResult
from folio.protos.security import ClusterCredentials, channel
from folio.protos.transport import CHANNEL_OPTIONS
from folio.router.engine_client import RequestFailed

log = logging.getLogger(__name__)

MAX_STEPS_IN_FLIGHT = 2


# A step that has not come back after this long fails its replica (--step-timeout). The
# slowest step folio runs on purpose is a CPU prefill of a full max_num_batched_tokens
# step: the bundled SmolLM2's 512 tokens took 16-23 s on a shared 2-core machine (PyTorch
# reference path), so 300 s leaves over 10x for it and room for a ~1B model on such a
# CPU; GPU steps take well under a second.
# A hung step stops new routing much sooner: see Replica.overdue.
DEFAULT_STEP_TIMEOUT_S = 300.0
# Overdue: the current step has run longer than OVERDUE_FACTOR x what the last STEP_HISTORY
# steps predict for it: the slowest of them, or, for a step of more tokens than they had
# (a burst of prompts after a quiet spell of decodes), its tokens at their slowest
# seconds per token. At least OVERDUE_MIN_S, at most half the deadline.
OVERDUE_FACTOR = 4.0
OVERDUE_MIN_S = 1.0
STEP_HISTORY = 64


class WorkerLoadError(RuntimeError):
    """A worker of the replica could not load the model (bad path, out of memory, ...)."""


# What protobuf raises for a value that does not fit its field (UnicodeError is a ValueError).
_ENCODE_ERRORS = (ValueError, TypeError, OverflowError)

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

    def __init__(
        self,
        index: int,
        addresses: list[str],
        config: SchedulerConfig,
        metrics: RequestMetrics,
        on_finished: Callable[["Replica"], None] = lambda r: None,
        *,
        credentials: ClusterCredentials,
        step_timeout: float = DEFAULT_STEP_TIMEOUT_S,
    ):
        self.index = index
        self.addresses = addresses
        self.config = config  # max_model_len and eos ids are settled in start();
        # max_model_len 0: the model's, or what the pool holds
        self.metrics = metrics
        self.on_finished = on_finished  # a request finished here: room for queued work
        self.credentials = credentials  # every call to the workers carries its secret
        self.step_timeout = step_timeout  # seconds a step may take before the replica fails
        self.scheduler: Optional[Scheduler] = None
        self.vocab_size = 0
        self.alive = False
        self.error: Optional[str] = None
        self._requests: dict[str, _Tracked] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._calls: list = []
        self._results: list[asyncio.Queue] = []
        self._tasks: list[asyncio.Task] = []
        self._inflight: deque[tuple[StepRequest, float]] = deque()  # (step, when sent)
        self._last_result_at = 0.0
        self._step_times: deque[float] = deque(maxlen=STEP_HISTORY)
        self._token_times: deque[float] = deque(maxlen=STEP_HISTORY)  # seconds per scheduled token
        self._wakeup = asyncio.Event()

    # ---------------------------------------------------------------- lifecycle
    async def start(self, load: pb.LoadModelRequest) -> None:
        """Load the model on every rank, build the scheduler, start the step loop.

        addresses[i] is rank i: with several addresses each worker gets `load`
        with its rank and world_size set (load.rendezvous must be set then).
        All ranks load concurrently; they meet in their process group.
        """
        self._channels = [channel(a, self.credentials, CHANNEL_OPTIONS) for a in self.addresses]
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
            raise WorkerLoadError(f"replica {self.index}: a worker could not load the model: {e.details()}") from None
        info = infos[0]
        # Ranks may size their pools differently; block ids below the smallest fit everywhere.
        num_blocks = min(i.num_blocks for i in infos)
        max_model_len = min(self.config.max_model_len or info.max_position_embeddings, info.max_position_embeddings)
        # One request of max_model_len tokens must fit the pool: a limit the operator set
        # (config.max_model_len > 0) that cannot is refused; the model's own is lowered.
        pool_tokens = num_blocks * info.block_size
        if max_model_len > pool_tokens:
            if self.config.max_model_len:
                raise WorkerLoadError(
                    f"replica {self.index}: max_model_len {max_model_len} does not fit the KV cache "
                    f"of {pool_tokens} tokens ({num_blocks} blocks of {info.block_size}); lower "
                    f"--max-model-len or give the KV cache more memory"
                )
            log.warning(
                "replica %d: max_model_len lowered from the model's %d to %d tokens, all "
                "its KV cache holds (%d blocks of %d)",
                self.index,
                max_model_len,
                pool_tokens,
                num_blocks,
                info.block_size,
            )
            max_model_len = pool_tokens
        self.config = replace(
            self.config,
            block_size=info.block_size,
            max_model_len=max_model_len,
            eos_token_ids=tuple(info.eos_token_ids),
            draft_model=info.draft_model,
        )
        self.scheduler = Scheduler(self.config, num_blocks)
        self.vocab_size = info.vocab_size
        self._calls = [s.ExecuteSteps() for s in stubs]
        self._results = [asyncio.Queue() for _ in stubs]
        self.alive = True
        self._tasks = [asyncio.create_task(self._read(rank)) for rank in range(len(stubs))]
        self._tasks.append(asyncio.create_task(self._loop()))
        self._tasks.append(asyncio.create_task(self._watch()))
        log.info(
            "replica %d ready: %s, %d KV blocks of %d tokens, device %s",
            self.index,
            ", ".join(self.addresses),
            num_blocks,
            info.block_size,
            info.device,
        )

    async def close(self) -> None:
        """Stop the loop, ask the workers to shut down (unless the replica already failed:
        a frozen worker would not answer, and whoever owns the processes ends them),
        close the channels."""
        was_alive = self.alive
        self._fail("replica shut down")
        for stub in (worker_pb2_grpc.WorkerStub(c) for c in self._channels if was_alive):
            try:
                await stub.Shutdown(pb.ShutdownRequest(), timeout=5)
            except grpc.aio.AioRpcError:
                pass  # already gone
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
        if request.output_token_ids:  # resumed from a failed replica: its TTFT was measured there
            t.scheduled, t.last_token_time = True, time.monotonic()
        self._requests[request.request_id] = t
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        """Finish a request now (client gone, stop string seen); its sink gets the abort."""
        if request_id in self._requests:
            self._deliver(self.scheduler.abort_requests([request_id]))
            self._wakeup.set()  # its finished id should reach the workers soon

    def stats(self) -> Optional[SchedulerStats]:
        return self.scheduler.stats() if self.scheduler is not None else None

    def step_elapsed(self) -> float:
        """Seconds the workers have been on the oldest in-flight step (0 when none is).

        Its clock starts when it was sent or when the step before it returned,
        whichever is later: a pipelined step does not wait on the clock."""
        if not self._inflight:
            return 0.0
        return time.monotonic() - max(self._inflight[0][1], self._last_result_at)

    @property
    def overdue(self) -> bool:
        """Alive, but its current step has run far longer than its recent steps did:
        it may be hung, so the frontend binds nothing new to it until the step returns
        (or the deadline fails the replica)."""
        return self.alive and self.step_elapsed() > self._overdue_after()

    def _overdue_after(self) -> float:
        slowest = max(self._step_times, default=self.step_timeout)
        if self._inflight:
            slowest = max(slowest, max(self._token_times, default=0.0) * self._inflight[0][0].num_scheduled_tokens)
        return min(self.step_timeout / 2, max(OVERDUE_MIN_S, OVERDUE_FACTOR * slowest))

    # ---------------------------------------------------------------- step loop
    async def _loop(self) -> None:
        try:
            while True:
                await self._fill_pipeline()
                if not self._inflight:
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                step = self._inflight[0][0]
                results = [await q.get() for q in self._results]
                self._note_step_done()
                result = decode_step_result(results[0])
                if result.step_id != step.step_id:
                    raise RuntimeError(f"worker answered step {result.step_id}, expected {step.step_id}")
                if result.errors:
                    self._fail_requests(
                        {e.request_id: f"the worker refused the request: {e.message}" for e in result.errors}
                    )
                self._deliver(self.scheduler.update_from_output(step, result))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any loop failure kills the replica
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
            message = self._encode(step)
            self._note_scheduled(step)
            self._inflight.append((step, time.monotonic()))
            for call in self._calls:
                await call.write(message)

    def _encode(self, step: StepRequest) -> pb.StepRequest:
        """The step on the wire. A request that does not fit its fields (a value out
        of range, a string that is not UTF-8) is taken out of the step and fails
        alone; finding it costs a second pass only over a step that failed."""
        try:
            return encode_step_request(step)
        except _ENCODE_ERRORS:
            pass
        bad = {}
        for r in (*step.new_requests, *step.cached_requests):
            alone = (
                StepRequest(step.step_id, new_requests=[r])
                if isinstance(r, NewRequest)
                else StepRequest(step.step_id, cached_requests=[r])
            )
            try:
                encode_step_request(alone)
            except _ENCODE_ERRORS as e:
                bad[r.request_id] = f"the request cannot be sent to a worker: {type(e).__name__}: {e}"
        step.new_requests = [r for r in step.new_requests if r.request_id not in bad]
        step.cached_requests = [r for r in step.cached_requests if r.request_id not in bad]
        self._fail_requests(bad)
        return encode_step_request(step)  # anything still wrong is the head's bug: fail the replica

    def _note_step_done(self) -> None:
        """The oldest in-flight step returned: record how long it took; if it was overdue,
        the replica takes requests again, so the frontend may bind queued ones to it."""
        took = self.step_elapsed()
        was_overdue = took > self._overdue_after()
        step, _ = self._inflight.popleft()
        self._last_result_at = time.monotonic()
        self._step_times.append(took)
        self._token_times.append(took / max(1, step.num_scheduled_tokens))
        if was_overdue:
            self.on_finished(self)

    async def _watch(self) -> None:
        """Fail the replica when a step outlives its deadline. A hung step thread keeps
        answering gRPC pings, so nothing else would notice; a frozen worker is caught
        here as well, whatever gRPC's own ping timeout is."""
        period = min(1.0, self.step_timeout / 8)
        while True:
            await asyncio.sleep(period)
            if self.step_elapsed() > self.step_timeout:
                step_id = self._inflight[0][0].step_id
                log.error("replica %d: step %d did not return within %g s", self.index, step_id, self.step_timeout)
                self._fail(f"step {step_id} did not return within the {self.step_timeout:g} s step deadline")
                return

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
        except Exception as e:  # noqa: BLE001 - any stream failure kills the replica
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
        for rid, t in requests.items():
            on_worker = self.scheduler is not None and self.scheduler.is_on_worker(rid)
            t.sink(RequestFailed(f"replica {self.index} failed: {reason}", suspect=on_worker))
        self.on_finished(self)

    def _fail_requests(self, messages: dict[str, str]) -> None:
        """Fail these requests alone, not retryable (request id -> why): the scheduler
        frees them, the steps go on. Ids no longer held here are skipped."""
        if not messages:
            return
        for rid in self.scheduler.fail_requests(messages):
            t = self._requests.pop(rid, None)
            if t is not None:
                log.warning("replica %d: request %s failed alone: %s", self.index, rid, messages[rid])
                t.sink(RequestFailed(messages[rid], retryable=False))
        self.on_finished(self)
