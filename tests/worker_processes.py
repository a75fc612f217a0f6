"""Workers as separate processes behind real gRPC, for tests that need several."""
from __future__ import annotations

import os
import subprocess
import sys


class WorkerProcesses:
    """`count` `python -m worker.server` processes on loopback; killed on exit.

    with WorkerProcesses(2) as addresses: ...   # ["127.0.0.1:PORT", ...]
    """

    def __init__(self, count: int):
        # One torch thread each: the test machine's cores are shared by every process.
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.procs = [subprocess.Popen([sys.executable, "-m", "worker.server", "--address", "127.0.0.1:0"],
                                       stdout=subprocess.PIPE, text=True, env=env) for _ in range(count)]
        self.addresses = [p.stdout.readline().split()[-1] for p in self.procs]

    def __enter__(self) -> list[str]:
        return self.addresses

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
