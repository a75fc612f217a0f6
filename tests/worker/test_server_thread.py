"""A worker runs all of its torch work on one thread.

On CPU, torch's OpenMP pool keeps one team per thread that has run a parallel
region; with more pool threads than cores libgomp stops spinning between regions,
and the bundled model's one-stream step became 1.9x slower after a single parallel
op on a second thread (worker/server.py). So LoadModel and every step must run on
the same thread: checked here over real gRPC, in process.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from folio.protos.codec import decode_step_result, encode_step_request
from folio.protos.messages import CachedRequest, StepRequest
from folio.protos.security import channel
from folio.protos.worker_pb2_grpc import WorkerStub
from folio.worker import server
from folio.worker.worker import Worker
from tests.worker.test_worker_security import PROMPT, _good_steps, _load, _steps
from tests.worker_processes import CREDENTIALS


async def _in_a_session(model_path: str, body):
    """A worker server in this process with model_path loaded: body(ExecuteSteps call,
    servicer), then the server stops."""
    grpc_server, servicer, address = await server.start_server("127.0.0.1:0", CREDENTIALS)
    try:
        async with channel(address, CREDENTIALS) as ch:
            stub = WorkerStub(ch)
            await _load(stub, model_path)
            return await body(stub.ExecuteSteps(), servicer)
    finally:
        await grpc_server.stop(grace=None)


def test_loading_and_every_step_run_on_one_thread(tiny_model, monkeypatch):
    threads: dict[str, set[int]] = {"load": set(), "step": set()}
    build, execute = server._build_worker, Worker.execute_step

    def build_here(request):
        threads["load"].add(threading.get_ident())
        return build(request)

    def execute_here(self, step):
        threads["step"].add(threading.get_ident())
        return execute(self, step)

    monkeypatch.setattr(server, "_build_worker", build_here)
    monkeypatch.setattr(Worker, "execute_step", execute_here)

    async def run(call, servicer) -> list:
        (results,) = await _steps([call], _good_steps())
        await call.done_writing()
        return results

    results = asyncio.run(_in_a_session(tiny_model("llama"), run))
    assert len(results) == 2 and not any(r.errors for r in results)
    assert len(threads["load"]) == 1 and threads["step"] == threads["load"]
    assert threading.get_ident() not in threads["load"]  # not the event loop's thread either


def test_a_step_that_raises_ends_the_session_with_internal_after_the_results_before_it(tiny_model, monkeypatch):
    """Three steps sent before any result is read, the second raising: the stream gives
    step 1's result, then ends with INTERNAL naming step 2, and step 3 never runs (the
    head fails the replica; a step after a failed one would run on a broken state)."""
    ran: list[int] = []
    execute = Worker.execute_step

    def execute_or_fail(self, step):
        ran.append(step.step_id)
        if step.step_id == 2:
            raise RuntimeError("boom")
        return execute(self, step)

    monkeypatch.setattr(Worker, "execute_step", execute_or_fail)
    after = StepRequest(3, cached_requests=[CachedRequest("good", [], len(PROMPT) + 1, 1)])

    async def run(call, servicer):
        for step in (*_good_steps(), after):  # all three sent before any result is read
            await call.write(encode_step_request(step))
        first = decode_step_result(await asyncio.wait_for(call.read(), 120))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(call.read(), 120)
        return first, e.value, servicer.steps_executed

    first, error, executed = asyncio.run(_in_a_session(tiny_model("llama"), run))
    assert first.step_id == 1 and not first.errors
    assert error.code() == grpc.StatusCode.INTERNAL and "step 2 failed: RuntimeError: boom" in error.details()
    assert ran == [1, 2] and executed == 1  # step 3 was sent, and never run
