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

from folio.protos.security import channel
from folio.protos.worker_pb2_grpc import WorkerStub
from folio.worker import server
from folio.worker.worker import Worker
from tests.worker.test_worker_security import _good_steps, _load, _steps
from tests.worker_processes import CREDENTIALS


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

    async def run() -> list:
        grpc_server, _, address = await server.start_server("127.0.0.1:0", CREDENTIALS)
        try:
            async with channel(address, CREDENTIALS) as ch:
                stub = WorkerStub(ch)
                await _load(stub, tiny_model("llama"))
                call = stub.ExecuteSteps()
                (results,) = await _steps([call], _good_steps())
                await call.done_writing()
                return results
        finally:
            await grpc_server.stop(grace=None)

    results = asyncio.run(run())
    assert len(results) == 2 and not any(r.errors for r in results)
    assert len(threads["load"]) == 1 and threads["step"] == threads["load"]
    assert threading.get_ident() not in threads["load"]  # not the event loop's thread either
