"""The gRPC face of one worker (protos/worker.proto, service Worker).

Steps run on one dedicated thread, in the order they arrive on the
ExecuteSteps stream, so the event loop stays free: Health answers while a long
step computes, and the next step is received and decoded while the current one
runs. Results are encoded on the step thread as well.

Only the head may call it: every call must carry the cluster secret
(protos/security.py), checked before any handler runs; a peer without it gets
UNAUTHENTICATED. A loaded model has exactly one step session: the first
ExecuteSteps stream is the head's, and any other, while it runs or after it
ends, is refused (the head never reopens one: a replica whose stream breaks is
replaced, so a later session could only be someone else's).

Run standalone (tests, debugging) with:
    FOLIO_CLUSTER_SECRET=... python -m folio.worker.server --address 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import AsyncIterator, Optional

import grpc
import torch

from folio.protos import worker_pb2 as pb
from folio.protos import worker_pb2_grpc
from folio.protos.codec import decode_load_request, decode_sampling_params, decode_step_request, encode_step_result
from folio.protos.config import default_device
from folio.protos.messages import RequestError, StepRequest
from folio.protos.security import SECRET_ENV, ClusterCredentials, SecretCheck, server_credentials
from folio.protos.transport import SERVER_OPTIONS

log = logging.getLogger(__name__)

# A decoded step and the requests refused while decoding it.
_DecodedStep = tuple[StepRequest, list[RequestError]]


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Holds at most one Worker, built by LoadModel."""

    def __init__(self) -> None:
        self.worker = None
        self.steps_executed = 0
        self._load_called = False  # one LoadModel per worker, even when calls overlap
        self._session_opened = False  # one step session per loaded model, ever
        self.stopped = asyncio.Event()  # set by Shutdown; the server's owner stops it
        # Loading and every step run on this one thread. Beyond keeping steps in order, on
        # CPU it keeps torch's OpenMP pool to one team: once a parallel region has run on a
        # second thread, libgomp counts more threads than cores and stops spinning between
        # regions, and every later step (a thousand regions) waits on futex wake-ups. One
        # parallel op on another thread made the bundled model's one-stream step 1.9x slower.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="folio-step")

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        if self._load_called:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "LoadModel was already called")
        self._load_called = True
        try:
            self.worker = await asyncio.get_running_loop().run_in_executor(self._thread, _build_worker, request)
        except (ValueError, FileNotFoundError, OSError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot load the model: {e}")
        cfg = self.worker.model_config
        return pb.LoadModelResponse(
            num_blocks=self.worker.num_blocks,
            block_size=self.worker.block_size,
            max_position_embeddings=cfg.max_position_embeddings,
            vocab_size=cfg.vocab_size,
            eos_token_ids=cfg.eos_token_ids,
            device=str(self.worker.device),
            draft_model=self.worker.speculative_model,
        )

    async def ExecuteSteps(self, request_iterator, context) -> AsyncIterator[pb.StepResult]:
        if self.worker is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "LoadModel first")
        if self._session_opened:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker's step session was already opened")
        self._session_opened = True
        steps: asyncio.Queue[Optional[_DecodedStep] | BaseException] = asyncio.Queue()

        async def receive() -> None:
            try:
                async for m in request_iterator:
                    steps.put_nowait(_decode_step(m))
                steps.put_nowait(None)
            except Exception as e:  # noqa: BLE001 - handed to the step loop below
                steps.put_nowait(e)

        receiver = asyncio.create_task(receive())
        loop = asyncio.get_running_loop()
        try:
            while True:
                item = await steps.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                step, refused = item
                try:
                    result = await loop.run_in_executor(self._thread, self._run_step, step, refused)
                except Exception as e:
                    log.exception("step %d failed", step.step_id)
                    await context.abort(
                        grpc.StatusCode.INTERNAL, f"step {step.step_id} failed: {type(e).__name__}: {e}"
                    )
                yield result
        finally:
            receiver.cancel()

    def _run_step(self, step: StepRequest, refused: list[RequestError]) -> pb.StepResult:
        result = self.worker.execute_step(step)
        result.errors[:0] = refused
        self.steps_executed += 1
        return encode_step_result(result)

    async def Health(self, request, context) -> pb.HealthResponse:
        return pb.HealthResponse(model_loaded=self.worker is not None, steps_executed=self.steps_executed)

    async def Shutdown(self, request, context) -> pb.ShutdownResponse:
        self.stopped.set()
        return pb.ShutdownResponse()


def _decode_step(m: pb.StepRequest) -> _DecodedStep:
    """Decode a step. A new request whose sampling parameters are out of range is
    taken out and refused alone, and anything held under its id is dropped (its id
    joins finished_ids), so the rest of the step still runs. Deterministic: every
    tensor-parallel rank decodes the same bytes and refuses the same requests."""
    try:
        return decode_step_request(m), []
    except ValueError:
        pass
    refused, kept = [], []
    for r in m.new_requests:
        try:
            decode_sampling_params(r.sampling_params)
            kept.append(r)
        except ValueError as e:
            refused.append(RequestError(r.request_id, f"sampling parameters: {e}"))
    fixed = pb.StepRequest()
    fixed.CopyFrom(m)
    del fixed.new_requests[:]
    fixed.new_requests.extend(kept)
    fixed.finished_ids.extend(e.request_id for e in refused)
    return decode_step_request(fixed), refused  # raises if something else was wrong


def _build_worker(request: pb.LoadModelRequest):
    from folio.worker.parallel import TPGroup
    from folio.worker.worker import Worker  # model code loads only when asked to

    config, scheduler = decode_load_request(request)
    device = config.device if config.device != "auto" else default_device(torch.cuda.is_available())
    world = max(1, request.world_size)
    if world > 1 and not request.rendezvous:
        raise ValueError("a tensor-parallel load (world_size > 1) needs a rendezvous address")
    if not 0 <= request.rank < world:
        raise ValueError(f"rank {request.rank} is outside world_size {world}")
    tp = TPGroup.init(request.rank, world, request.rendezvous, torch.device(device))
    return Worker(replace(config, device=device), scheduler, tp=tp)


async def start_server(address: str, credentials: ClusterCredentials) -> tuple[grpc.aio.Server, WorkerServicer, str]:
    """Serve a fresh WorkerServicer on address ("host:0" picks a free port), to
    callers holding credentials.secret only, over TLS when credentials has it.

    Returns the server, its servicer and the "host:port" it listens on.
    """
    servicer = WorkerServicer()
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[SecretCheck(credentials.secret)])
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    host = address.rsplit(":", 1)[0]
    tls = server_credentials(credentials)
    port = server.add_secure_port(address, tls) if tls else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    log.info("worker gRPC server on %s:%d (%s)", host, port, "TLS" if tls else "plain TCP")
    return server, servicer, f"{host}:{port}"


async def serve_until_shutdown(address: str, credentials: ClusterCredentials) -> None:
    server, servicer, bound = await start_server(address, credentials)
    print(f"listening on {bound}", flush=True)
    await servicer.stopped.wait()
    await server.stop(grace=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run one folio worker behind gRPC.")
    parser.add_argument("--address", default="127.0.0.1:0", help="host:port to listen on")
    parser.add_argument("--tls-cert", default=None, help="serve TLS with this PEM certificate chain")
    parser.add_argument("--tls-key", default=None, help="the certificate's PEM private key")
    args = parser.parse_args()
    # Taken out of the environment, so nothing this process starts inherits it.
    secret = os.environ.pop(SECRET_ENV, "")
    if not secret:
        parser.error(f"set {SECRET_ENV} to the cluster secret: every call must carry it")
    try:
        credentials = ClusterCredentials(secret, tls_cert=args.tls_cert, tls_key=args.tls_key)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO)
    asyncio.run(serve_until_shutdown(args.address, credentials))


if __name__ == "__main__":
    main()
