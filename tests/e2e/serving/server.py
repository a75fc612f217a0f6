"""The `folio serve` the tests of this folder share (tests/e2e/serving/conftest.py), and its settings."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import httpx

MAX_MODEL_LEN = 1024
NUM_KV_BLOCKS = 256
# The head (uvicorn, the scheduler, the clients: this process) works while the worker
# computes. A worker with a torch thread per core stalls at every op whenever the head
# takes one of them: on 2 cores replies came 4x faster from a worker on one thread.
WORKER_THREADS = 1


@dataclass
class Server:
    base_url: str
    deployment: object
    loop: asyncio.AbstractEventLoop

    def call(self, fn, timeout: float = 30):
        """Run fn() on the server's event loop (where all head state lives) and return its value."""

        async def run():
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def metric(self, name: str, labels: str = "") -> float:
        """A sample from /metrics; without labels, the first sample of that name."""
        text = httpx.get(self.base_url + "/metrics").text
        label_re = re.escape(labels) if labels else r"(?:\{[^}]*\})?"
        m = re.search(rf"^{re.escape(name)}{label_re} (\S+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))
