"""Replica supervision and autoscaling: how many replicas the head runs, and that
they run.

It always runs, whatever the flags (with autoscaling off, min = max = --replicas).
It keeps `target` replicas: a replica that failed is released (its actors and
placement group) and replaced, and a launch that failed is tried again, with
exponential backoff after failures (backoff_base_s, doubling up to backoff_max_s,
back to the start after backoff_reset_s without one). When every replica is down
it keeps replacing them; the frontend answers NotReady meanwhile, with a
Retry-After from when the next replica is expected to serve.

Every `interval_s` the head reads its load: requests in the admission queue,
requests waiting or running in the replicas' schedulers, how long the oldest
queued request has waited, and the replicas' KV-cache usage. From that it
wants

    ceil(load / target_load) replicas,   one more if the queue wait or KV usage is too high,

clamped to [min_replicas, max_replicas]. A change of `target` is made only after
it has been wanted continuously for `upscale_delay_s` (more) or
`downscale_delay_s` (fewer), so a burst or a lull does not make replicas come
and go.

Adding a replica is placement.launch_replica: its placement group waits until
Ray has the devices, which is what makes Ray's autoscaler start a node when the
cluster has none free. Removing one drains it first (it finishes what it holds
and takes nothing new), then releases its workers and placement group; the
node it ran on becomes idle and Ray's autoscaler ends it. A replica whose
worker died is released and replaced the same way, at once (after the backoff),
not after the upscale delay: replacing one is keeping `target`, not scaling.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional

from folio.cluster.frontend import Frontend
from folio.cluster.metrics import RequestMetrics
from folio.cluster.placement import ReplicaHandle, ReplicaSpec, launch_replica, release_replica

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoscalerConfig:
    min_replicas: Optional[int] = field(
        default=None, metadata={"help": "autoscale: never fewer replicas (default: --replicas)"}
    )
    max_replicas: Optional[int] = field(
        default=None,
        metadata={"help": "autoscale: never more replicas; more than --min-replicas turns autoscaling on"},
    )
    target_load: int = 0  # requests per replica (running + waiting + queued); 0: max_num_seqs
    upscale_queue_wait_s: float = 5.0  # the oldest queued request waited longer: one more replica
    max_kv_usage: float = 0.9  # mean KV-cache usage above this: one more replica
    upscale_delay_s: float = field(
        default=10.0, metadata={"help": "seconds more replicas must be wanted before one is added"}
    )
    downscale_delay_s: float = field(
        default=60.0, metadata={"help": "seconds fewer replicas must be wanted before one is drained"}
    )
    interval_s: float = 1.0
    backoff_base_s: float = 1.0  # wait before the first relaunch after a failure
    backoff_max_s: float = 60.0  # the wait doubles per failure up to this
    backoff_reset_s: float = 300.0  # this long without a failure: back to backoff_base_s
    expected_launch_s: float = 30.0  # Retry-After's guess until a launch has been timed


@dataclass(frozen=True)
class Load:
    """One reading of the head's signals."""

    requests: int  # queued at the head + waiting and running in replicas
    queue_wait_s: float
    kv_usage: float  # mean over serving replicas


class ReplicaAutoscaler:
    """The replicas' supervisor (and, with min < max, their autoscaler). Runs beside
    the frontend on the head's event loop; start() once, stop() at shutdown.

    `handles` is the deployment's list of running replicas; the autoscaler adds
    to it and removes from it, so whoever shuts the deployment down releases
    whatever is running then. Replicas it is launching are in frontend.starting.
    """

    def __init__(
        self,
        config: AutoscalerConfig,
        frontend: Frontend,
        handles: list[ReplicaHandle],
        spec: ReplicaSpec,
        metrics: RequestMetrics,
    ):
        if config.min_replicas is None or config.max_replicas is None:
            raise ValueError("the autoscaler needs min_replicas and max_replicas (serve sets them from --replicas)")
        if not 1 <= config.min_replicas <= config.max_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")
        self.config = config
        self.frontend = frontend
        self.handles = handles
        self.spec = spec
        self.metrics = metrics
        self.target_load = config.target_load or spec.scheduler.max_num_seqs
        self.target = len(handles)  # replicas to keep running (serving + launching)
        self._next_index = max((h.replica.index for h in handles), default=-1) + 1
        self._launching = 0
        self._failures = 0  # replica deaths and failed launches in a row
        self._last_failure = -math.inf
        self._launch_s = config.expected_launch_s  # how long the last launch took
        self._draining: list[ReplicaHandle] = []
        self._want_since: Optional[tuple[int, float]] = None  # (direction, since when)
        self._launches: set[asyncio.Task] = set()
        self._releases: set[asyncio.Task] = set()
        self._loop_task: Optional[asyncio.Task] = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop deciding. Launches in progress are cancelled (launch_replica then
        releases what it reserved); releases in progress finish; draining replicas
        stay in `handles` for the deployment's shutdown."""
        cancelled = [t for t in (self._loop_task, *self._launches) if t is not None]
        for t in cancelled:
            t.cancel()
        await asyncio.gather(*cancelled, *self._releases, return_exceptions=True)

    @property
    def serving(self) -> list[ReplicaHandle]:
        """Replicas that take new requests."""
        return [h for h in self.handles if h.replica.alive and h not in self._draining]

    # ---------------------------------------------------------------- decisions
    def read_load(self) -> Load:
        serving = self.serving
        usage = [h.replica.stats().kv_usage for h in serving]
        requests = self.frontend.num_queued + sum(h.replica.num_unfinished for h in serving)
        return Load(requests, self.frontend.oldest_queued_age, sum(usage) / len(usage) if usage else 0.0)

    def desired(self, load: Load) -> int:
        """Replicas this load calls for, before the delays (pressure asks for one more than
        serve or start now, so a replica being replaced already counts)."""
        want = math.ceil(load.requests / self.target_load)
        current = len(self.serving) + self._launching
        if load.queue_wait_s > self.config.upscale_queue_wait_s or load.kv_usage > self.config.max_kv_usage:
            want = max(want, current + 1)
        return min(self.config.max_replicas, max(self.config.min_replicas, want))

    async def _run(self) -> None:
        while True:
            try:
                self._tick(time.monotonic())
            except Exception:  # noqa: BLE001 - a bad tick must not end autoscaling
                log.exception("autoscaler tick failed")
            await asyncio.sleep(self.config.interval_s)

    def _tick(self, now: float) -> None:
        self._reap()
        self._scale(now)
        self._keep_target()

    def _scale(self, now: float) -> None:
        """Move `target` toward what the load wants, once it has been wanted long enough."""
        want = self.desired(self.read_load())
        direction = (want > self.target) - (want < self.target)
        if direction == 0:
            self._want_since = None
            return
        if self._want_since is None or self._want_since[0] != direction:
            self._want_since = (direction, now)
        delay = self.config.upscale_delay_s if direction > 0 else self.config.downscale_delay_s
        if now - self._want_since[1] < delay:
            return
        self._want_since = None
        if direction > 0:
            self.target = want
        else:
            self.target -= 1
            if len(self.serving) + self._launching > self.target:
                self._drain_one()

    def _keep_target(self) -> None:
        """Launch what `target` lacks: replacements for failed replicas, or scale-ups."""
        for _ in range(self.target - len(self.serving) - self._launching):
            self._spawn(self._launches, self._add(self._backoff()))

    def _backoff(self) -> float:
        """Seconds to wait before a launch: none unless replicas have been failing."""
        if not self._failures:
            return 0.0
        return min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (self._failures - 1))

    def _note_failure(self) -> None:
        now = time.monotonic()
        if now - self._last_failure > self.config.backoff_reset_s:
            self._failures = 0
        self._failures += 1
        self._last_failure = now

    # ---------------------------------------------------------------- actions
    @staticmethod
    def _spawn(tasks: set[asyncio.Task], coro) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _add(self, delay: float = 0.0) -> None:
        index, self._next_index = self._next_index, self._next_index + 1
        self._launching += 1
        self.frontend.starting[index] = time.monotonic() + delay + self._launch_s
        try:
            if delay:
                log.info("autoscaler: starting replica %d in %.0f s (backoff)", index, delay)
                await asyncio.sleep(delay)
            log.info("autoscaler: adding replica %d", index)
            started = time.monotonic()
            handle = await launch_replica(index, self.spec, self.metrics)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the next tick tries again, after a backoff
            log.exception("autoscaler: replica %d failed to start", index)
            self._note_failure()
            return
        finally:
            self._launching -= 1
            self.frontend.starting.pop(index, None)
        self._launch_s = time.monotonic() - started
        self.handles.append(handle)
        self.frontend.add_replica(handle.replica)
        log.info("autoscaler: replica %d serving after %.1f s", index, self._launch_s)

    def _drain_one(self) -> None:
        """Drain the serving replica with the least work (the newest on ties), never below min."""
        serving = self.serving
        if len(serving) <= self.config.min_replicas:
            return
        victim = min(reversed(serving), key=lambda h: h.replica.num_unfinished)
        log.info(
            "autoscaler: draining replica %d (%d requests left)", victim.replica.index, victim.replica.num_unfinished
        )
        self._draining.append(victim)
        self.frontend.drain_replica(victim.replica)

    def _reap(self) -> None:
        """Release drained replicas and dead ones (a dead one's devices go back to Ray at
        once, so its replacement can have them)."""
        for h in list(self.handles):
            done = h in self._draining or not h.replica.alive
            if not done or not self.frontend.is_drained(h.replica):
                continue
            if not h.replica.alive and h not in self._draining:
                log.warning("autoscaler: replica %d failed (%s); replacing it", h.replica.index, h.replica.error)
                self._note_failure()
            self.frontend.remove_replica(h.replica)
            self.handles.remove(h)
            if h in self._draining:
                self._draining.remove(h)
            log.info("autoscaler: released replica %d", h.replica.index)
            self._spawn(self._releases, release_replica(h))
