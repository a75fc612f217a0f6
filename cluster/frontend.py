"""The global scheduler on the head: admission, replica choice, output streams.

A request is admitted at once when some live replica has room (fewer than
`replica_capacity` unfinished requests); it is then bound to the replica the
routing policy picks. Otherwise it waits in a bounded admission queue, ordered
by (priority, arrival), and is bound only when a replica makes room: binding
late means the choice is made with the freshest load (and, later, cache)
information. When the queue is full the request is refused with QueueFull,
which the router turns into 429 with Retry-After.

When a replica fails, each request it held resumes on a live replica: it goes
back to the front of the admission queue carrying the tokens it already
streamed, and the new replica recomputes them as it would after a preemption,
so the client's stream just continues (greedy and seeded requests with the
very tokens an unbroken run gives). A request that was running on a worker of
the failed replica is a suspect (it may be what broke it) and resumes at most
`max_request_retries` times, so a poison request does not walk through the
cluster; one that only waited there resumes freely. Only with no live replica
left, or retries spent, does the stream end in RequestFailed; a request that
failed by its own fault (RequestFailed.retryable False) is never resumed.

A replica that is overdue (its current step has run far longer than usual,
see Replica.overdue) takes no new requests until its step returns.

Replica choice is one function, `RoutingPolicy(replicas, request) -> replica`;
least-loaded is the default here, and cluster/routing.py holds the policies
`folio serve --routing` picks from (prefix-cache affinity by default).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence, Union

from folio.cluster.metrics import RequestMetrics, render
from folio.cluster.replica import Replica
from folio.protos.messages import EngineRequest, RequestOutput
from folio.router.engine_client import NotReady, QueueFull, ReplicaState, RequestFailed

# Retry-After while no replica serves and none is known to be starting.
NOT_READY_RETRY_S = 5

RoutingPolicy = Callable[[Sequence[Replica], EngineRequest], Replica]


def least_loaded(replicas: Sequence[Replica], request: EngineRequest) -> Replica:
    """The replica with the fewest unfinished requests (first one on ties)."""
    return min(replicas, key=lambda r: r.num_unfinished)


class DrainRate:
    """Requests finished per second over the last `window` seconds (None until measured)."""

    def __init__(self, window: float = 30.0, min_samples: int = 4):
        self.window = window
        self.min_samples = min_samples
        self._times: deque[float] = deque()
        self._since: Optional[float] = None

    def note(self, now: float) -> None:
        self._since = now if self._since is None else self._since
        self._times.append(now)
        self._trim(now)

    def rate(self, now: float) -> Optional[float]:
        self._trim(now)
        if len(self._times) < self.min_samples:
            return None
        return len(self._times) / max(1.0, min(self.window, now - self._since))

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window:
            self._times.popleft()


class RequestStream:
    """Async iterator over one request's outputs; ends after the finished output.

    Raises RequestFailed if the replica serving it dies. cancel() (idempotent)
    aborts the request wherever it is; call it when the consumer goes away.
    """

    def __init__(self, frontend: "Frontend", request: EngineRequest, seq: int):
        self.request = request
        self.seq = seq  # admission order, kept when it resumes
        self.replica: Optional[Replica] = None
        self.finished = False
        self.output_token_ids: list[int] = []  # streamed so far: where a resume picks up
        self.retries = 0
        self._frontend = frontend
        self._queue: asyncio.Queue[Union[RequestOutput, RequestFailed]] = asyncio.Queue()

    def put(self, item: Union[RequestOutput, RequestFailed]) -> None:
        if isinstance(item, RequestFailed) or item.finished:
            self.finished = True
        if isinstance(item, RequestOutput):
            self.output_token_ids.extend(item.new_token_ids)
        self._queue.put_nowait(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, RequestFailed):
            raise item
        return item

    def cancel(self) -> None:
        if not self.finished:
            self._frontend.abort(self.request.request_id)


@dataclass(frozen=True)
class AdmissionConfig:
    """When the head queues, refuses (429) or resumes a request (folio serve flags)."""

    max_queued_requests: int = field(
        default=1024, metadata={"help": "admission queue bound; beyond it requests get 429"}
    )
    max_queue_wait_s: float = field(
        default=30.0,
        metadata={
            "help": "seconds a request may be expected to wait for a replica; beyond it, 429 "
            "with Retry-After (estimated from the measured drain rate)"
        },
    )
    # One resume, so a request that was on two replicas that died (a poison request) fails.
    max_request_retries: int = field(
        default=1,
        metadata={
            "help": "times a request that was running on a replica when it failed resumes on "
            "another (a request that only waited there always resumes)"
        },
    )


class Frontend:
    """Routes EngineRequests to replicas. Every method runs on the head's event loop."""

    def __init__(
        self,
        replicas: Sequence[Replica],
        metrics: RequestMetrics,
        admission: Optional[AdmissionConfig] = None,
        *,
        replica_capacity: Optional[int] = None,
        policy: RoutingPolicy = least_loaded,
    ):
        admission = admission or AdmissionConfig()
        self.replicas = list(replicas)
        self.metrics = metrics
        self.max_queued = admission.max_queued_requests
        self.max_request_retries = admission.max_request_retries
        # Enough to keep a scheduler's batch full with a waiting line behind it.
        self.replica_capacity = replica_capacity or 2 * max(r.config.max_num_seqs for r in replicas)
        self.policy = policy
        self._queued: list[tuple[int, int, RequestStream]] = []  # heap by (priority, seq)
        self._seq = itertools.count()
        self._streams: dict[str, RequestStream] = {}
        self._draining: list[Replica] = []  # take no new requests; removed once idle
        # Replicas being launched, by index: when each is expected to serve (time.monotonic()).
        # The supervisor (cluster/autoscaler.py) keeps it; NotReady's retry_after reads it.
        self.starting: dict[int, float] = {}
        self._max_model_len = min(r.config.max_model_len for r in self.replicas)
        self.max_queue_wait_s = admission.max_queue_wait_s
        self.drain_rate = DrainRate()  # requests finishing per second: admission's estimate
        for r in self.replicas:
            r.on_finished = self._on_replica_room

    # ---------------------------------------------------------------- state
    @property
    def live_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    @property
    def ready(self) -> bool:
        """Some replica can take requests."""
        return bool(self.live_replicas)

    @property
    def healthy(self) -> bool:
        """Every replica is alive."""
        return all(r.alive for r in self.replicas)

    @property
    def max_model_len(self) -> int:
        """The replicas' context limit; while none is up, the last ones' (all share a spec)."""
        if self.replicas:
            return min(r.config.max_model_len for r in self.replicas)
        return self._max_model_len

    def replica_states(self) -> list[ReplicaState]:
        """Every replica the head knows, starting ones included, by index."""
        states = [ReplicaState(i, "starting") for i in self.starting]
        for r in self.replicas:
            if not r.alive:
                state = "failed" if r.error is not None else "starting"
            elif r in self._draining:
                state = "draining"
            else:
                state = "overdue" if r.overdue else "ready"
            states.append(ReplicaState(r.index, state, r.num_unfinished, r.error))
        return sorted(states, key=lambda s: s.index)

    @property
    def max_request_tokens(self) -> int:
        """Prompt plus output one request may have: the context limit, or less where a
        replica's KV pool holds fewer tokens (every replica must be able to run it)."""
        caps = [
            min(r.config.max_model_len, r.scheduler.token_capacity) for r in self.replicas if r.scheduler is not None
        ]
        return min(caps) if caps else self.max_model_len

    @property
    def num_queued(self) -> int:
        return len(self._queued)

    def metrics_text(self) -> str:
        """Prometheus exposition: request histograms plus each replica's scheduler stats."""
        live = [(r.index, s) for r in self.replicas if r.alive and (s := r.stats()) is not None]
        down = [r.index for r in self.replicas if not r.alive]
        # Policies from cluster/routing.py count their decisions; a bare function has none.
        return render(self.metrics, live, down, self.num_queued, getattr(self.policy, "decisions", {}))

    @property
    def oldest_queued_age(self) -> float:
        """Seconds the longest-waiting request has been in the admission queue (0 if none)."""
        if not self._queued:
            return 0.0
        return time.monotonic() - min(s.request.arrival_time for _, _, s in self._queued)

    # ---------------------------------------------------------------- membership
    def add_replica(self, replica: Replica) -> None:
        """Route to a started replica from now on; queued requests may bind to it at once."""
        replica.on_finished = self._on_replica_room
        self.replicas.append(replica)
        self.starting.pop(replica.index, None)
        self._max_model_len = replica.config.max_model_len
        self._on_replica_room(replica)

    def drain_replica(self, replica: Replica) -> None:
        """Stop binding new requests to the replica; those it holds run to the end."""
        if replica not in self._draining:
            self._draining.append(replica)

    def is_drained(self, replica: Replica) -> bool:
        """Draining (or dead) and holding no request: safe to remove."""
        return (replica in self._draining or not replica.alive) and replica.num_unfinished == 0

    def remove_replica(self, replica: Replica) -> None:
        """Forget a drained or dead replica (the caller releases its workers)."""
        if not self.is_drained(replica):
            raise ValueError(f"replica {replica.index} still holds requests; drain it first")
        self.replicas.remove(replica)
        if replica in self._draining:
            self._draining.remove(replica)

    # ---------------------------------------------------------------- requests
    def generate(self, request: EngineRequest) -> RequestStream:
        """Admit a request and return the stream of its outputs.

        Raises at once, before anything is streamed: NotReady (no live replica),
        QueueFull (admission queue full), ValueError (it can never fit a replica).
        """
        if not self.ready:
            raise NotReady(retry_after=self.ready_in())
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.arrival_time = request.arrival_time or time.monotonic()
        stream = RequestStream(self, request, next(self._seq))
        room = self._replicas_with_room()
        # Queued requests came first: while any wait, there is no room (see _on_replica_room).
        if room and not self._queued:
            self._bind(stream, self.policy(room, request))
        else:
            refused = self._admission_refusal()
            if refused is not None:
                self.metrics.rejected += 1
                raise refused
            heapq.heappush(self._queued, (request.priority, stream.seq, stream))
        self._streams[request.request_id] = stream
        return stream

    def abort(self, request_id: str) -> None:
        """Finish a request wherever it is; a no-op for unknown or finished ids."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if stream.replica is not None:
            stream.replica.abort(request_id)  # its sink receives the abort output
        else:
            del self._streams[request_id]
            self._queued = [e for e in self._queued if e[2] is not stream]
            heapq.heapify(self._queued)
            stream.put(
                RequestOutput(
                    request_id, [], finish_reason="abort", num_prompt_tokens=len(stream.request.prompt_token_ids)
                )
            )

    def _bind(self, stream: RequestStream, replica: Replica) -> None:
        rid = stream.request.request_id

        def sink(item: Union[RequestOutput, RequestFailed]) -> None:
            if isinstance(item, RequestFailed) and self._resume(stream, item):
                return
            stream.put(item)
            if stream.finished:
                self._streams.pop(rid, None)
                self.drain_rate.note(time.monotonic())

        replica.add_request(stream.request, sink)  # ValueError propagates to generate()
        stream.replica = replica

    def _resume(self, stream: RequestStream, failure: RequestFailed) -> bool:
        """Requeue a request whose replica failed, ahead of later arrivals, to continue
        after the tokens it streamed. The failing replica calls _on_replica_room next.
        Not for a request's own failure, and a suspect only max_request_retries times."""
        if not failure.retryable or not self.live_replicas:
            return False
        if failure.suspect:
            if stream.retries >= self.max_request_retries:
                return False
            stream.retries += 1
        stream.replica = None
        stream.request = replace(stream.request, output_token_ids=list(stream.output_token_ids))
        heapq.heappush(self._queued, (stream.request.priority, stream.seq, stream))
        self.metrics.resumed += 1
        return True

    def _on_replica_room(self, replica: Replica) -> None:
        """A request finished (or a replica died): bind queued requests while there is room."""
        while self._queued:
            room = self._replicas_with_room()
            if not room:
                if not self.live_replicas:
                    self._fail_queued()
                return
            _, _, stream = heapq.heappop(self._queued)
            try:
                self._bind(stream, self.policy(room, stream.request))
            except ValueError as e:
                self._streams.pop(stream.request.request_id, None)
                stream.put(RequestFailed(str(e), retryable=False))  # it can never fit

    def _replicas_with_room(self) -> list[Replica]:
        return [
            r
            for r in self.live_replicas
            if r.num_unfinished < self.replica_capacity and r not in self._draining and not r.overdue
        ]

    def ready_in(self) -> int:
        """Retry-After while no replica serves: until the soonest starting one is expected."""
        eta = min(self.starting.values(), default=None)
        if eta is None:
            return NOT_READY_RETRY_S
        return max(1, min(60, math.ceil(eta - time.monotonic())))

    def _fail_queued(self) -> None:
        while self._queued:
            _, _, stream = heapq.heappop(self._queued)
            del self._streams[stream.request.request_id]
            stream.put(RequestFailed("no replica is left to serve this request"))

    def _admission_refusal(self) -> Optional[QueueFull]:
        """Why a request that must queue cannot, or None.

        Refused: a full queue, or (once the drain rate is measured) an estimated wait
        beyond max_queue_wait_s, since a client would rather retry elsewhere or later
        than wait that long for a first byte. Retry-After is when that wait is likely
        back under the bound.
        """
        now = time.monotonic()
        rate = self.drain_rate.rate(now)
        # Ahead of it: the queue, and requests bound to a replica but not yet in its batch.
        ahead = len(self._queued) + sum(max(0, r.num_unfinished - r.config.max_num_seqs) for r in self.live_replicas)
        wait = (ahead + 1) / rate if rate else None
        # The rate predicts a wait only while every replica is full: then requests finish
        # as fast as the replicas can finish them. A request queued behind a replica that
        # has room but is momentarily overdue (a long step) waits for that step alone,
        # and a rate measured while demand was low would refuse it for nothing.
        saturated = all(r.num_unfinished >= self.replica_capacity for r in self.live_replicas)
        if len(self._queued) < self.max_queued and (wait is None or wait <= self.max_queue_wait_s or not saturated):
            return None
        if wait is None:  # nothing finished recently: no basis for an estimate
            return QueueFull(retry_after=max(1, min(60, ahead // max(1, self.replica_capacity))))
        over = max(wait - self.max_queue_wait_s, (ahead + 1 - self.max_queued) / rate)
        return QueueFull(retry_after=max(1, min(600, math.ceil(over))))
