"""Workers accept only their head, and check everything it sends.

- Every RPC without the cluster secret, or with a wrong one, is refused
  (UNAUTHENTICATED) and the worker goes on serving its head.
- One step session per loaded model: a second ExecuteSteps stream is refused
  while the first runs and after it ends.
- A step naming a block outside the pool, a token outside the vocabulary, a
  request the worker does not hold, or counts that do not add up fails that
  request alone (StepResult.errors, its state freed); the other requests in
  the step get exactly the tokens they get without it. In process, over real
  gRPC, and on a two-rank tensor-parallel replica (every rank drops the same).
- TLS end to end with a CA generated here; a head that does not trust the CA
  cannot connect.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import subprocess
import sys
from dataclasses import replace

import grpc
import pytest

from folio.cluster.frontend import Frontend
from folio.cluster.metrics import RequestMetrics
from folio.cluster.replica import Replica
from folio.protos import worker_pb2 as pb
from folio.protos.codec import decode_step_result, encode_step_request
from folio.protos.config import SchedulerConfig, WorkerConfig
from folio.protos.messages import CachedRequest, EngineRequest, NewRequest, SamplingParams, StepRequest, StepResult
from folio.protos.security import SECRET_ENV, ClusterCredentials, channel
from folio.protos.worker_pb2_grpc import WorkerStub
from folio.worker.parallel import free_port
from tests.model_fixtures import TINY_VOCAB
from tests.worker_processes import CREDENTIALS, WorkerProcesses

BS, NUM_BLOCKS, MAX_POSITIONS = 16, 32, 256  # the tiny model has 256 positions
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPT = [1, 17, 42, 99, 5, 250, 31, 8, 77, 120, 64, 3, 200, 11, 9, 150, 44, 302, 18, 6]  # 20 tokens


def _new(rid: str, tokens=PROMPT, blocks=(0, 1), params=GREEDY, computed=0, scheduled=None, prompt=None) -> NewRequest:
    return NewRequest(
        rid,
        list(tokens),
        len(tokens) if prompt is None else prompt,
        params,
        list(blocks),
        computed,
        len(tokens) - computed if scheduled is None else scheduled,
    )


def _good_steps() -> list[StepRequest]:
    """'good' prefills, then decodes one token: two sampled tokens."""
    return [
        StepRequest(1, new_requests=[_new("good")]),
        StepRequest(2, cached_requests=[CachedRequest("good", [], len(PROMPT), 1)]),
    ]


VICTIM = _new("victim", blocks=(4, 5), params=SamplingParams(temperature=0.0, frequency_penalty=0.5))

# name -> (extra new requests in step 1, extra cached requests in step 2, refused id, message).
# Step 1 also admits VICTIM, which the step-2 cases then send something wrong about.
_BIAS = SamplingParams(temperature=0.0, logit_bias={TINY_VOCAB + 1: 5.0}, presence_penalty=0.3)
_STOP = SamplingParams(temperature=0.0, stop_token_ids=[7, 1 << 20])
BAD = {
    "block id past the pool": ([_new("bad", blocks=(NUM_BLOCKS, 3))], [], "bad", "block id 32 is outside the pool"),
    "negative block id": ([_new("bad", blocks=(-1, 3))], [], "bad", "block id -1 is outside"),
    "token id past the vocabulary": (
        [_new("bad", tokens=PROMPT[:5] + [TINY_VOCAB] + PROMPT[6:], blocks=(2, 3))],
        [],
        "bad",
        f"token id {TINY_VOCAB} is outside the vocabulary",
    ),
    "negative token id": ([_new("bad", tokens=[-5] + PROMPT[1:], blocks=(2, 3))], [], "bad", "token id -5"),
    "stop token past the vocabulary": ([_new("bad", blocks=(2, 3), params=_STOP)], [], "bad", "stop token id 1048576"),
    "logit_bias key past the vocabulary (the sampler's own check)": (
        [_new("bad", blocks=(2, 3), params=_BIAS)],
        [],
        "bad",
        "logit_bias",
    ),
    "more tokens scheduled than it has": (
        [_new("bad", blocks=(2, 3), scheduled=len(PROMPT) + 1)],
        [],
        "bad",
        "cannot compute tokens 0 to 21 of its 20",
    ),
    "too few blocks": ([_new("bad", blocks=(2,))], [], "bad", "1 blocks of 16 cannot hold 20 tokens"),
    "prompt count beyond its tokens": (
        [_new("bad", blocks=(2, 3), prompt=len(PROMPT) + 1)],
        [],
        "bad",
        "do not make up",
    ),
    "past the model's positions": (
        [_new("bad", tokens=[3] * (MAX_POSITIONS + 1), blocks=range(6, 23))],
        [],
        "bad",
        "exceed the model's 256 positions",
    ),
    "more blocks than the pool": (
        [_new("bad", blocks=list(range(NUM_BLOCKS)) + [0])],
        [],
        "bad",
        "exceed the pool's 32",
    ),
    "the same id twice in a step": (
        [_new("bad", blocks=(2, 3)), _new("bad", blocks=(6, 7))],
        [],
        "bad",
        "appears twice",
    ),
    "a cached request it does not hold": ([], [CachedRequest("ghost", [], 20, 1)], "ghost", "not on this worker"),
    "computed count disagrees": ([], [CachedRequest("victim", [], 19, 1)], "victim", "head says 19"),
    "draft token past the vocabulary": (
        [],
        [CachedRequest("victim", [], 20, 2, [TINY_VOCAB])],
        "victim",
        f"draft token id {TINY_VOCAB}",
    ),
    "model drafts without a draft model": (
        [],
        [CachedRequest("victim", [], 20, 3, num_model_drafts=2)],
        "victim",
        "without a draft model",
    ),
    "new block past the pool": (
        [],
        [CachedRequest("victim", [NUM_BLOCKS + 7], 20, 1)],
        "victim",
        "block id 39 is outside",
    ),
    "new request for an id it holds": ([], [], "victim", "already on this worker"),  # see _bad_steps
}


def _bad_steps(case: str) -> list[StepRequest]:
    new, cached, _, _ = BAD[case]
    first, second = _good_steps()
    first.new_requests += [VICTIM] + new
    second.cached_requests += cached
    if case == "new request for an id it holds":
        second.new_requests.append(_new("victim", blocks=(8, 9)))
    return [first, second]


def _tokens(results: list[StepResult], rid: str) -> list[int]:
    return [t for r in results for o in r.outputs if o.request_id == rid for t in o.token_ids]


def _errors(results: list[StepResult]) -> list[tuple[str, str]]:
    return [(e.request_id, e.message) for r in results for e in r.errors]


# ---------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama")


def _worker(path):
    from folio.worker.worker import Worker

    return Worker(WorkerConfig(model=path, num_kv_blocks=NUM_BLOCKS), SchedulerConfig(block_size=BS))


@pytest.fixture(scope="module")
def reference(llama) -> list[int]:
    """'good' alone: the tokens every step with a refused neighbour must still give it."""
    worker = _worker(llama)
    results = [worker.execute_step(s) for s in _good_steps()]
    assert not _errors(results) and len(_tokens(results, "good")) == 2
    return _tokens(results, "good")


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_fails_alone(case, llama, reference):
    worker = _worker(llama)
    runner, sampler = worker.runner, worker.sampler
    results = [worker.execute_step(s) for s in _bad_steps(case)]
    *_, refused, message = BAD[case]
    errors = _errors(results)
    assert {rid for rid, _ in errors} == {refused}, errors
    assert any(message in m for _, m in errors), errors
    assert _tokens(results, "good") == reference
    sampled_before = 1 if refused == "victim" else 0  # the victim's prefill ran in step 1
    assert len(_tokens(results, refused)) == sampled_before
    # Dropped: its state, its block-table row and its sampler slot are free again.
    assert refused not in runner.states and refused not in sampler._requests
    assert len(runner._free_rows) + len(runner.states) == runner.block_table.shape[0]
    held_slots = sum(r.slot >= 0 for r in sampler._requests.values())
    assert len(sampler._free_slots) + held_slots == sampler._seen.shape[0]


def test_a_step_of_refused_requests_only(llama):
    """No request runs: the step still answers, with the errors, and the worker goes on."""
    worker = _worker(llama)
    result = worker.execute_step(StepRequest(7, cached_requests=[CachedRequest("ghost", [], 3, 1)]))
    assert result.step_id == 7 and not result.outputs and result.errors[0].request_id == "ghost"
    assert len(_tokens([worker.execute_step(_good_steps()[0])], "good")) == 1


# ---------------------------------------------------------------- over gRPC


async def _load(stub, path, **fields) -> pb.LoadModelResponse:
    return await stub.LoadModel(
        pb.LoadModelRequest(
            model_path=path, block_size=BS, num_blocks=NUM_BLOCKS, dtype="float32", device="cpu", **fields
        ),
        timeout=120,
    )


async def _steps(calls, steps: list[StepRequest | pb.StepRequest]) -> list[list[StepResult]]:
    """Send every step on every call (one per rank); -> per rank, its results."""
    out = [[] for _ in calls]
    for step in steps:
        m = step if isinstance(step, pb.StepRequest) else encode_step_request(step)
        for call in calls:
            await call.write(m)
        for rank, call in enumerate(calls):
            out[rank].append(decode_step_result(await asyncio.wait_for(call.read(), 120)))
    return out


def _code(e: pytest.ExceptionInfo) -> grpc.StatusCode:
    return e.value.code()


async def _refused_everything(address: str, creds: ClusterCredentials | None, path: str) -> None:
    """Every RPC of the Worker service, each refused with UNAUTHENTICATED."""
    ch = channel(address, creds) if creds else grpc.aio.insecure_channel(address)
    async with ch:
        stub = WorkerStub(ch)
        for call in (
            lambda: stub.Health(pb.HealthRequest(), timeout=10),
            lambda: _load(stub, path),
            lambda: stub.Shutdown(pb.ShutdownRequest(), timeout=10),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call()
            assert _code(e) == grpc.StatusCode.UNAUTHENTICATED
        # Refused at once: reading, not writing (a write can race the refusal and fail otherwise).
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ExecuteSteps(timeout=10).read()
        assert _code(e) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.slow
def test_calls_without_the_secret_are_refused_and_the_head_goes_on(llama, reference):
    assert CREDENTIALS.secret not in repr(CREDENTIALS)
    with WorkerProcesses(1) as (address,):

        async def main():
            metrics = RequestMetrics()
            replica = Replica(0, [address], SchedulerConfig(block_size=BS), metrics, credentials=CREDENTIALS)
            await replica.start(
                pb.LoadModelRequest(
                    model_path=llama, block_size=BS, num_blocks=NUM_BLOCKS, dtype="float32", device="cpu"
                )
            )
            try:
                await _refused_everything(address, None, llama)
                await _refused_everything(address, ClusterCredentials.generate(), llama)
                almost = replace(CREDENTIALS, secret=CREDENTIALS.secret[:-1] + "#")
                await _refused_everything(address, almost, llama)
                tokens = []
                async for out in Frontend([replica], metrics).generate(
                    EngineRequest("after", PROMPT, replace(GREEDY, max_tokens=2))
                ):
                    tokens += out.new_token_ids
                assert replica.alive
                return tokens
            finally:
                await replica.close()

        assert asyncio.run(asyncio.wait_for(main(), 240)) == reference


@pytest.mark.slow
def test_one_step_session_per_loaded_model(llama, reference):
    with WorkerProcesses(1) as (address,):

        async def main():
            async with channel(address, CREDENTIALS) as ch:
                stub = WorkerStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as e:  # no model yet
                    await stub.ExecuteSteps(timeout=10).read()
                assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
                await _load(stub, llama)
                head = stub.ExecuteSteps()
                (results,) = await _steps([head], _good_steps()[:1])
                for _ in range(2):  # while the head's session runs, and after it ended
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stub.ExecuteSteps(timeout=10).read()
                    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
                    assert "session" in e.value.details()
                    if head is not None:
                        (more,) = await _steps([head], _good_steps()[1:])  # the head's still works
                        await head.done_writing()
                        assert await head.read() == grpc.aio.EOF
                        head = None
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await _load(stub, llama)
                assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
                await stub.Shutdown(pb.ShutdownRequest(), timeout=10)
                return _tokens(results + more, "good")

        assert asyncio.run(asyncio.wait_for(main(), 240)) == reference


def _with_bad_params(step: StepRequest) -> pb.StepRequest:
    """The step on the wire plus a request whose sampling parameters do not decode."""
    m = encode_step_request(step)
    bad = encode_step_request(StepRequest(0, new_requests=[_new("bad-params", blocks=(10, 11))]))
    bad.new_requests[0].sampling_params.temperature = -1.0
    m.new_requests.extend(bad.new_requests)
    return m


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_bad_requests_fail_alone_over_grpc(world_size, llama, reference):
    """Over real gRPC, on one worker and on two tensor-parallel ranks (which must drop
    the same requests, or their collectives would no longer line up)."""
    cases = [
        "block id past the pool",
        "token id past the vocabulary",
        "more tokens scheduled than it has",
        "a cached request it does not hold",
        "computed count disagrees",
    ]
    first, second = _good_steps()
    first.new_requests.append(VICTIM)
    for case in cases:
        new, cached, _, _ = BAD[case]
        first.new_requests += [replace(r, request_id=f"{case}: {r.request_id}") for r in new]
        second.cached_requests += cached
    steps = [_with_bad_params(first), second]
    want = {f"{c}: bad" for c in cases[:3]} | {"ghost", "victim", "bad-params"}

    with WorkerProcesses(world_size) as addresses:

        async def main():
            channels = [channel(a, CREDENTIALS) for a in addresses]
            stubs = [WorkerStub(c) for c in channels]
            rendezvous = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
            await asyncio.gather(
                *(_load(s, llama, rank=i, world_size=world_size, rendezvous=rendezvous) for i, s in enumerate(stubs))
            )
            calls = [s.ExecuteSteps() for s in stubs]
            try:
                return await _steps(calls, steps)
            finally:
                for c in channels:
                    await c.close()

        per_rank = asyncio.run(asyncio.wait_for(main(), 240))
    for results in per_rank:
        assert {rid for rid, _ in _errors(results)} == want
        assert _tokens(results, "good") == reference
    assert all(_errors(r) == _errors(per_rank[0]) for r in per_rank)
    assert "temperature" in dict(_errors(per_rank[0]))["bad-params"]


def test_the_standalone_worker_needs_a_secret():
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "folio.worker.server", "--address", "127.0.0.1:0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and SECRET_ENV in done.stderr


# ---------------------------------------------------------------- TLS


def _signed(name: str, issuer=None, issuer_key=None, names=()):
    """(certificate, key) for CN=name: a self-signed CA without an issuer, else a
    leaf for the given IP addresses and DNS names, signed by the issuer."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        sans = [x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n) for n in names]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256()), key


def _write_pem(path, cert=None, key=None) -> str:
    from cryptography.hazmat.primitives import serialization

    data = (
        cert.public_bytes(serialization.Encoding.PEM)
        if cert is not None
        else key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.write_bytes(data)
    return str(path)


@pytest.mark.slow
def test_tls_end_to_end_and_only_with_the_ca(tmp_path, llama, reference):
    ca, ca_key = _signed("folio test CA")
    cert, key = _signed("folio-worker", ca, ca_key, names=["127.0.0.1", "folio-worker"])
    stranger, _ = _signed("some other CA")
    creds = ClusterCredentials.generate(
        tls_cert=_write_pem(tmp_path / "worker.pem", cert=cert),
        tls_key=_write_pem(tmp_path / "worker.key", key=key),
        tls_ca=_write_pem(tmp_path / "ca.pem", cert=ca),
    )
    untrusting = replace(creds, tls_ca=_write_pem(tmp_path / "other-ca.pem", cert=stranger))

    with WorkerProcesses(1, creds) as (address,):

        async def refusal(how: str, creds_or_none) -> tuple[str, grpc.StatusCode]:
            ch = channel(address, creds_or_none) if creds_or_none else grpc.aio.insecure_channel(address)
            async with ch:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await WorkerStub(ch).Health(pb.HealthRequest(), timeout=10)
                return how, _code(e)

        async def main():
            refusals = [
                await refusal("a CA that did not sign it", untrusting),
                await refusal("another name", replace(creds, tls_server_name="not-the-worker")),
                await refusal("plain TCP", None),
            ]
            async with channel(address, replace(creds, tls_server_name="folio-worker")) as ch:
                assert (await WorkerStub(ch).Health(pb.HealthRequest(), timeout=10)).model_loaded is False
            metrics = RequestMetrics()
            replica = Replica(0, [address], SchedulerConfig(block_size=BS), metrics, credentials=creds)
            await replica.start(
                pb.LoadModelRequest(
                    model_path=llama, block_size=BS, num_blocks=NUM_BLOCKS, dtype="float32", device="cpu"
                )
            )
            try:
                tokens = []
                async for out in Frontend([replica], metrics).generate(
                    EngineRequest("tls", PROMPT, replace(GREEDY, max_tokens=2))
                ):
                    tokens += out.new_token_ids
                return refusals, tokens
            finally:
                await replica.close()

        refusals, tokens = asyncio.run(asyncio.wait_for(main(), 240))
    assert tokens == reference
    for how, code in refusals:
        assert code == grpc.StatusCode.UNAVAILABLE, how
