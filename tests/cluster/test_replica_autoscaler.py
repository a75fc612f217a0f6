"""The autoscaler's decisions and the frontend's drain/add/remove, against fake replicas
(no Ray): launch and release are replaced by recorders. tests/e2e/test_autoscaling.py runs
the same code on a real (fake multi-node) Ray cluster."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

import folio.cluster.autoscaler as autoscaler_mod
from folio.cluster.autoscaler import AutoscalerConfig, ReplicaAutoscaler
from folio.cluster.frontend import AdmissionConfig, Frontend
from folio.cluster.metrics import RequestMetrics
from folio.router.engine_client import NotReady
from tests.cluster.fake_replicas import FakeReplica, drain, req


class StatsReplica(FakeReplica):
    def __init__(self, index: int, kv_usage: float = 0.0):
        super().__init__(index)
        self.kv_usage = kv_usage

    def stats(self):
        return SimpleNamespace(kv_usage=self.kv_usage)


def _handle(replica) -> SimpleNamespace:
    return SimpleNamespace(replica=replica)


@pytest.fixture
def cloud(monkeypatch):
    """Launches succeed at once with a fresh replica; releases are recorded."""
    launched, released = [], []

    async def launch(index, spec, metrics):
        launched.append(index)
        return _handle(StatsReplica(index))

    async def release(handle):
        released.append(handle.replica.index)

    monkeypatch.setattr(autoscaler_mod, "launch_replica", launch)
    monkeypatch.setattr(autoscaler_mod, "release_replica", release)
    return SimpleNamespace(launched=launched, released=released)


def _scaler(replicas, **cfg):
    fe = Frontend(replicas, RequestMetrics(), AdmissionConfig(max_queued_requests=100))
    spec = SimpleNamespace(scheduler=SimpleNamespace(max_num_seqs=2))
    config = AutoscalerConfig(
        **{"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 5, "downscale_delay_s": 10, **cfg}
    )
    return fe, ReplicaAutoscaler(config, fe, [_handle(r) for r in replicas], spec, fe.metrics)


def test_drained_replica_takes_nothing_new_and_added_one_takes_the_queue():
    async def main():
        a, b = FakeReplica(0), FakeReplica(1)
        fe = Frontend([a, b], RequestMetrics(), AdmissionConfig(max_queued_requests=10))
        fe.drain_replica(b)
        streams = [fe.generate(req(f"r{i}")) for i in range(6)]
        assert len(a.sinks) == 4 and not b.sinks and fe.num_queued == 2  # capacity 2 * 2
        assert fe.oldest_queued_age > 0
        with pytest.raises(ValueError):
            fe.remove_replica(a)  # neither drained nor idle
        c = FakeReplica(2)
        fe.add_replica(c)  # the queue binds to it at once
        assert fe.num_queued == 0 and len(c.sinks) == 2 and not b.sinks
        assert fe.is_drained(b)
        fe.remove_replica(b)
        assert fe.replicas == [a, c]
        for r in (a, c):
            for rid in list(r.sinks):
                r.finish(rid)
        for s in streams:
            assert [o.finish_reason for o in await drain(s)] == ["stop"]
        assert fe.oldest_queued_age == 0.0

    asyncio.run(main())


def test_backlog_scales_up_after_the_delay_once(cloud):
    async def main():
        a = StatsReplica(0)
        fe, scaler = _scaler([a])
        for i in range(12):  # 4 bound to a, 8 queued: load 12 / 2 per replica
            fe.generate(req(f"r{i}"))
        assert scaler.desired(scaler.read_load()) == 3
        scaler._tick(100.0)
        scaler._tick(104.0)
        assert cloud.launched == []  # not wanted long enough yet
        scaler._tick(105.0)
        await asyncio.sleep(0)
        assert cloud.launched == [1, 2]
        scaler._tick(200.0)  # wants no more than max
        await asyncio.sleep(0)
        assert cloud.launched == [1, 2] and len(fe.replicas) == 3 and fe.num_queued == 0

    asyncio.run(main())


def test_queue_wait_or_kv_pressure_adds_one(cloud):
    async def main():
        a = StatsReplica(0, kv_usage=0.95)
        fe, scaler = _scaler([a], max_replicas=4)
        fe.generate(req("r0"))
        assert scaler.desired(scaler.read_load()) == 2
        a.kv_usage = 0.5
        assert scaler.desired(scaler.read_load()) == 1

    asyncio.run(main())


def test_idle_replica_is_drained_then_released_and_min_is_kept(cloud):
    async def main():
        a, b = StatsReplica(0), StatsReplica(1)
        fe, scaler = _scaler([a, b], downscale_delay_s=10)
        fe.generate(req("busy"))  # least loaded goes first: b is idle
        scaler._tick(0.0)
        scaler._tick(5.0)
        scaler._tick(9.0)
        assert scaler.serving == scaler.handles  # a flapping-proof wait: nothing yet
        scaler._tick(10.0)
        assert [h.replica for h in scaler.serving] == [a]
        scaler._tick(11.0)  # b held nothing: released at once
        await asyncio.sleep(0)
        assert cloud.released == [1] and fe.replicas == [a]
        for t in (20.0, 40.0, 60.0):
            scaler._tick(t)
        assert fe.replicas == [a] and cloud.released == [1]  # never below min_replicas

    asyncio.run(main())


def test_dead_replica_is_released_and_replaced_without_autoscaling(cloud):
    async def main():
        a = StatsReplica(0)
        fe, scaler = _scaler([a], min_replicas=1, max_replicas=1, backoff_base_s=0.05)
        a.die()
        scaler._tick(0.0)  # released at once, so its devices can go to the replacement
        await asyncio.sleep(0)
        assert cloud.released == [0] and fe.replicas == [] and cloud.launched == []
        assert [(s.index, s.state) for s in fe.replica_states()] == [(1, "starting")]
        with pytest.raises(NotReady) as e:
            fe.generate(req("early"))
        assert e.value.retry_after >= 1
        await asyncio.sleep(0.1)  # the backoff after one failure
        assert cloud.launched == [1] and [r.index for r in fe.replicas] == [1] and fe.ready
        assert not fe.starting
        scaler._tick(1.0)
        await asyncio.sleep(0)
        assert cloud.launched == [1]  # target kept: nothing more

    asyncio.run(main())


def test_failed_launches_are_retried_with_capped_exponential_backoff(cloud, monkeypatch):
    attempts = []

    async def flaky(index, spec, metrics):
        attempts.append(time.monotonic())
        if len(attempts) <= 4:
            raise RuntimeError("no devices")
        return _handle(StatsReplica(index))

    monkeypatch.setattr(autoscaler_mod, "launch_replica", flaky)

    async def main():
        a = StatsReplica(0)
        fe, scaler = _scaler(
            [a], min_replicas=1, max_replicas=1, backoff_base_s=0.1, backoff_max_s=0.3, interval_s=0.01
        )
        scaler.start()
        a.die()  # every replica down: the supervisor keeps trying
        try:
            async with asyncio.timeout(10):
                while not fe.ready:
                    await asyncio.sleep(0.01)
        finally:
            await scaler.stop()
        return fe

    fe = asyncio.run(main())
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    # One death then four failed launches: waits of 0.1 (death), 0.2, 0.3 (capped), 0.3, 0.3.
    assert len(attempts) == 5 and [r.index for r in fe.replicas] == [5]
    for gap, want in zip(gaps, (0.2, 0.3, 0.3, 0.3)):
        assert want - 0.02 <= gap <= want + 0.25, gaps
