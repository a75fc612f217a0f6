"""The Ray actor that hosts one worker: one per device.

Ray only places the process and keeps it alive. What crosses a Ray call is
the cluster credentials going in (the head's secret, and TLS file paths) and
the address of the gRPC server the actor starts coming out; the model is
loaded and every step runs over that gRPC connection (worker/server.py), so
nothing is pickled on the serving path.
"""

from __future__ import annotations

import asyncio
from typing import Optional

import ray

from folio.protos.security import ClusterCredentials
from folio.worker.parallel import free_port
from folio.worker.server import start_server


@ray.remote
class WorkerActor:
    """Async actor: its event loop runs the gRPC server."""

    def __init__(self) -> None:
        self._address: Optional[str] = None
        self._stopper: Optional[asyncio.Task] = None

    async def start(self, credentials: ClusterCredentials, host: Optional[str] = None, num_threads: int = 0) -> str:
        """Start the gRPC server (once) and return its "host:port".

        The server answers only calls that carry credentials.secret, over TLS
        when credentials name a certificate (read on this node). host defaults
        to this node's IP as Ray reports it (reachable from other nodes); a
        single-node deployment passes "127.0.0.1". num_threads sets torch's
        intra-op threads (CPU workers use every core they reserved).
        """
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        if self._address is None:
            host = host or ray.util.get_node_ip_address()
            server, servicer, self._address = await start_server(f"{host}:0", credentials)
            self._stopper = asyncio.create_task(_stop_on_shutdown(server, servicer))
        return self._address

    async def free_port(self, host: str) -> int:
        """A port free on this node: the rendezvous of a tensor-parallel replica whose rank 0 this is."""
        return free_port(host)


async def _stop_on_shutdown(server, servicer) -> None:
    """The Shutdown RPC stops the server; the process itself ends when Ray kills the actor."""
    await servicer.stopped.wait()
    await server.stop(grace=1.0)
