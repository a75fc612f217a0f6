"""Admission by estimated wait: a request that would wait longer than max_queue_wait_s for
a replica is refused (429) with a Retry-After from the measured drain rate, against the
fake replicas of tests/cluster/fake_replicas.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from folio.cluster.frontend import DrainRate
from folio.router.engine_client import QueueFull
from tests.cluster.fake_replicas import make, req


def test_drain_rate_counts_finishes_over_its_window():
    d = DrainRate(window=10.0, min_samples=4)
    assert d.rate(100.0) is None
    for t in (100.0, 101.0, 102.0):
        d.note(t)
    assert d.rate(102.0) is None  # too few to estimate
    d.note(104.0)
    assert d.rate(104.0) == pytest.approx(4 / 4.0)  # 4 finishes in the 4 s since the first
    assert d.rate(115.0) is None  # all but none left the window


def test_refused_beyond_the_estimated_wait_with_retry_after_from_the_rate():
    async def main():
        _, cold = make(capacity=1, max_queued=1000)
        cold.max_queue_wait_s = 1.0
        [cold.generate(req(f"cold{i}")) for i in range(30)]
        assert cold.num_queued == 28  # nothing measured yet: only the queue bound

        _, fe = make(capacity=1, max_queued=1000)
        fe.max_queue_wait_s = 1.0
        now = time.monotonic()
        for _ in range(10):  # 10 requests finished just now: 10/s
            fe.drain_rate.note(now)
        fe.generate(req("a")), fe.generate(req("b"))  # bound to the two replicas
        queued = [fe.generate(req(f"q{i}")) for i in range(10)]  # waits up to 1 s: accepted
        assert fe.num_queued == 10 and all(s.replica is None for s in queued)
        with pytest.raises(QueueFull) as e:
            fe.generate(req("late"))  # 11 ahead at 10/s: 1.1 s
        assert e.value.retry_after == 1
        fe.max_queue_wait_s = 0.2
        with pytest.raises(QueueFull) as e:
            fe.generate(req("later"))  # 1.1 s against 0.2: retry in a second
        assert e.value.retry_after == 1
        for _ in range(990):  # a backlog of 1000: minutes, not one second
            fe._queued.append(fe._queued[0])
        with pytest.raises(QueueFull) as e:
            fe.generate(req("much-later"))
        assert e.value.retry_after == 100  # ceil(1001 / 10 - 0.2)
        assert fe.metrics.rejected == 3

    asyncio.run(main())


def test_a_replica_with_room_that_is_only_overdue_queues_without_refusing():
    """A long step (a burst of prompts, a noisy neighbour) makes an idle replica overdue
    for a moment. A drain rate measured while demand was low must not turn the burst
    away: the requests queue and bind when the step returns."""

    async def main():
        replicas, fe = make(capacity=4, max_queued=1000)
        fe.max_queue_wait_s = 1.0
        now = time.monotonic()
        for i in range(4):  # a trickle: 4 finishes over 30 s
            fe.drain_rate.note(now - 30 + 7 * i)
        for r in replicas:
            r.overdue = True
        burst = [fe.generate(req(f"b{i}")) for i in range(16)]  # 16 / (4/30 s) = 2 min "wait"
        assert fe.num_queued == 16 and fe.metrics.rejected == 0
        for r in replicas:
            r.overdue = False
        fe._on_replica_room(replicas[0])
        assert fe.num_queued == 16 - 2 * 4 and all(s.replica is not None for s in burst[:8])

    asyncio.run(main())
