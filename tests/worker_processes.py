"""Workers as separate processes behind real gRPC, for tests that need several."""

from __future__ import annotations

import os
import subprocess
import sys

from protos.security import SECRET_ENV, ClusterCredentials

# The secret every test worker process accepts: pass it to Replica(credentials=...).
CREDENTIALS = ClusterCredentials.generate()


class WorkerProcesses:
    """`count` `python -m worker.server` processes on loopback; killed on exit.

    with WorkerProcesses(2) as addresses: ...   # ["127.0.0.1:PORT", ...]

    They accept calls carrying credentials.secret (CREDENTIALS unless given)
    and serve TLS when credentials name a certificate.
    """

    def __init__(self, count: int, credentials: ClusterCredentials = CREDENTIALS):
        self.credentials = credentials
        # One torch thread each: the test machine's cores are shared by every process.
        env = dict(os.environ, OMP_NUM_THREADS="1", **{SECRET_ENV: credentials.secret})
        command = [sys.executable, "-m", "worker.server", "--address", "127.0.0.1:0"]
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
