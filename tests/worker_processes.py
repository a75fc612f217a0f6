"""Workers as separate processes behind real gRPC, for tests that need several."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from folio.protos.security import SECRET_ENV, ClusterCredentials

# The secret every test worker process accepts: pass it to Replica(credentials=...).
CREDENTIALS = ClusterCredentials.generate()


class WorkerProcesses:
    """`count` `python -m folio.worker.server` processes on loopback; killed on exit.

    with WorkerProcesses(2) as addresses: ...   # ["127.0.0.1:PORT", ...]

    They accept calls carrying credentials.secret (CREDENTIALS unless given)
    and serve TLS when credentials name a certificate.
    """

    def __init__(self, count: int, credentials: ClusterCredentials = CREDENTIALS):
        self.credentials = credentials
        # One torch thread each: the test machine's cores are shared by every process.
        env = dict(os.environ, OMP_NUM_THREADS="1", **{SECRET_ENV: credentials.secret})
        command = [sys.executable, "-m", "folio.worker.server", "--address", "127.0.0.1:0"]
        if credentials.tls:
            command += ["--tls-cert", credentials.tls_cert, "--tls-key", credentials.tls_key]
        self.procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) for _ in range(count)]
        self.addresses = [p.stdout.readline().split()[-1] for p in self.procs]

    def __enter__(self) -> list[str]:
        return self.addresses

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


async def replica_outputs(
    addresses: list[str], model_path: str, prompts: list[list[int]], params, speculate: int = 0
) -> tuple[list[list[int]], object]:
    """Each prompt's output tokens from one Replica over the workers at `addresses` (one
    replica: its ranks are tensor-parallel), and the replica's scheduler stats.
    params: one SamplingParams for all, or a list with one per prompt."""
    from folio.protos.config import SchedulerConfig
    from folio.protos.messages import EngineRequest

    config = SchedulerConfig(
        block_size=16, max_num_seqs=8, num_speculative_tokens=speculate, prompt_lookup_min=1, prompt_lookup_max=3
    )
    replica = await start_replica(addresses, model_path, config)
    loop = asyncio.get_running_loop()
    done = [loop.create_future() for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]

    def sink(i):
        def put(item):
            tokens[i].extend(getattr(item, "new_token_ids", []))
            if getattr(item, "finished", True) and not done[i].done():
                done[i].set_result(None)

        return put

    try:
        for i, p in enumerate(prompts):
            replica.add_request(EngineRequest(f"r{i}", p, params[i] if isinstance(params, list) else params), sink(i))
        await asyncio.wait_for(asyncio.gather(*done), 180)
        return tokens, replica.stats()
    finally:
        await replica.close()


async def start_replica(
    addresses: list[str],
    model_path: str,
    config,
    quantization: str = "auto",
    speculative_model: str = "",
    kernels: str = "auto",
):
    """A started Replica (cluster/replica.py) over the workers at `addresses`, rank i at
    addresses[i]: fp32 on CPU, 64 blocks of 16 tokens. Close it when done."""
    # Imported here: only the tests that run a replica need the head's modules.
    from folio.cluster.metrics import RequestMetrics
    from folio.cluster.replica import Replica
    from folio.protos import worker_pb2 as pb
    from folio.worker.parallel import free_port

    replica = Replica(0, addresses, config, RequestMetrics(), credentials=CREDENTIALS)
    await replica.start(
        pb.LoadModelRequest(
            model_path=model_path,
            block_size=16,
            num_blocks=64,
            dtype="float32",
            device="cpu",
            quantization=quantization,
            kernels=kernels,
            speculative_model=speculative_model,
            rendezvous=f"tcp://127.0.0.1:{free_port('127.0.0.1')}",
        )
    )
    return replica
