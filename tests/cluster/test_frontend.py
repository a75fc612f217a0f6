"""Admission, routing and the admission queue of the frontend, against fake replicas."""

from __future__ import annotations

import asyncio
import time

import pytest

from folio.cluster.frontend import AdmissionConfig, Frontend
from folio.cluster.metrics import RequestMetrics
from folio.protos.messages import EngineRequest, SamplingParams
from folio.router.engine_client import NotReady, QueueFull, RequestFailed
from tests.cluster.fake_replicas import FakeReplica, drain, make, req
from tests.prometheus import sample


def test_least_loaded_then_queue_in_priority_order():
    async def main():
        (a, b), fe = make()
        s1, s2 = fe.generate(req("1")), fe.generate(req("2"))
        assert (s1.replica, s2.replica) == (a, b)  # spread over both
        low, high = fe.generate(req("low", priority=5)), fe.generate(req("high", priority=0))
        assert fe.num_queued == 2 and low.replica is None
        with pytest.raises(QueueFull) as e:
            fe.generate(req("3"))
        assert e.value.retry_after >= 1 and fe.metrics.rejected == 1
        b.finish("2")  # room: the better priority goes first
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
        with pytest.raises(ValueError):  # the id is free again, but this one never fits
            fe.generate(EngineRequest("r", [1] * 500, SamplingParams()))

    asyncio.run(main())


def test_dead_replica_requests_resume_elsewhere_first_in_line():
    async def main():
        (a, b), fe = make()
        on_a, on_b, queued = fe.generate(req("a")), fe.generate(req("b")), fe.generate(req("q"))
        a.emit("a", [5, 6])
        a.die()
        assert not fe.healthy and fe.ready and fe.metrics.resumed == 1
        assert on_a.replica is None and fe.num_queued == 2  # back in line, ahead of "q"
        b.finish("b")
        assert on_a.replica is b and queued.replica is None
        assert b.requests["a"].output_token_ids == [5, 6]  # it continues after what it streamed
        b.finish("a")
        assert [o.new_token_ids for o in await drain(on_a)] == [[5, 6], [7]]
        assert queued.replica is b
        last = fe.generate(req("last"))
        b.die()  # nothing left to resume on
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
        fe = Frontend(reps, RequestMetrics(), AdmissionConfig(max_request_retries=1), replica_capacity=1)
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


def test_a_request_that_only_waited_on_a_failed_replica_resumes_without_counting():
    async def main():
        reps = [FakeReplica(i) for i in range(3)]
        fe = Frontend(reps, RequestMetrics(), AdmissionConfig(max_request_retries=1), replica_capacity=1)
        stream = fe.generate(req("r"))
        stream.replica.die(running=False)  # it had not reached a worker: no suspect
        stream.replica.die(running=True)  # the first death that counts
        last = stream.replica
        assert last is not None and stream.retries == 1 and fe.metrics.resumed == 2
        last.finish("r")
        assert [o.finish_reason for o in await drain(stream)] == ["stop"]

    asyncio.run(main())


def test_a_request_that_fails_by_its_own_fault_is_not_resumed():
    async def main():
        (a, b), fe = make()
        bad, good = fe.generate(req("bad")), fe.generate(req("good"))
        bad_replica = bad.replica
        bad_replica.fail_alone("bad", "logit_bias key 999999 is outside the vocabulary")
        with pytest.raises(RequestFailed) as e:
            await drain(bad)
        assert not e.value.retryable and "vocabulary" in str(e.value)
        assert fe.metrics.resumed == 0 and bad_replica.alive and fe.num_queued == 0
        good.replica.finish("good")
        assert [o.finish_reason for o in await drain(good)] == ["stop"]

    asyncio.run(main())


def test_overdue_replica_gets_nothing_new_until_its_step_returns():
    async def main():
        (a, b), fe = make(capacity=2, max_queued=4)
        a.overdue = True
        s1, s2 = fe.generate(req("1")), fe.generate(req("2"))
        assert s1.replica is b and s2.replica is b
        queued = fe.generate(req("3"))  # b is full, a is overdue: it waits
        assert queued.replica is None and fe.ready
        assert [s.state for s in fe.replica_states()] == ["overdue", "ready"]
        a.overdue = False
        a.on_finished(a)  # the step came back
        assert queued.replica is a

    asyncio.run(main())


def test_states_metrics_and_not_ready_while_every_replica_is_down():
    async def main():
        (a, b), fe = make()
        s = fe.generate(req("r"))
        s.replica.emit("r", [4])
        assert sample(fe.metrics_text(), "folio_replica_up", replica="0") is None  # fakes have no stats
        a.die()
        text = fe.metrics_text()
        assert sample(text, "folio_replica_up", replica="0") == 0
        states = {st.index: st for st in fe.replica_states()}
        assert states[0].state == "failed" and states[0].error == "gone"
        assert states[1].state == "ready" and states[1].num_requests == 1
        b.die()
        fe.remove_replica(a)
        fe.remove_replica(b)
        assert not fe.ready and fe.max_model_len == 128  # still known with none up
        with pytest.raises(NotReady) as e:
            fe.generate(req("x"))
        assert e.value.retry_after == 5  # nothing known to be starting
        fe.starting[2] = time.monotonic() + 20.5
        assert [(st.index, st.state) for st in fe.replica_states()] == [(2, "starting")]
        with pytest.raises(NotReady) as e:
            fe.generate(req("x"))
        assert 20 <= e.value.retry_after <= 21
        c = FakeReplica(2)
        fe.add_replica(c)
        assert fe.ready and not fe.starting
        fe.generate(req("x"))

    asyncio.run(main())
