"""`folio serve` exits when its Ray cluster goes away, and frees its port.

The head is an operator's `ray start --head --block`; stopping it (its process group:
GCS, raylet, folio's worker actors) is what `ray stop` does to a cluster. The server
must log why, exit non-zero, and leave the port to the server a new cluster starts,
instead of answering 503 forever (issue: `ray up --restart-only`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from tests import REPO_ROOT
from tests.e2e.ray_head import RayHeadPorts, free_port, start_ray_head, wait_for_head
from tests.e2e.test_autoscaling import _env, _stop_group, _up

pytestmark = pytest.mark.slow


def test_serve_exits_when_its_cluster_stops():
    workdir = tempfile.mkdtemp(prefix="folio-cl-")  # short: Ray's socket paths live under it
    ports, port = RayHeadPorts(), free_port()
    head = start_ray_head(ports, workdir, _env())
    serve = None
    log_path = os.path.join(workdir, "serve.log")
    try:
        address = wait_for_head(head, workdir)
        serve = subprocess.Popen(
            [sys.executable, "-m", "cluster.entrypoints.cli", "serve", "--ray-address"]
            + [address, "--port", str(port), "--device", "cpu"]
            + ["--worker-host", "127.0.0.1", "--cpus-per-worker", "1", "--max-num-seqs", "2"]
            + ["--max-model-len", "256", "--num-kv-blocks", "32"],
            cwd=str(REPO_ROOT),
            env=_env(),
            stdout=open(log_path, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 240
        while not _up(f"http://127.0.0.1:{port}/health"):
            assert serve.poll() is None and time.monotonic() < deadline, open(log_path).read()[-3000:]
            time.sleep(0.5)

        _stop_group(head)  # the cluster goes: GCS, raylet and the worker actors
        stopped = time.monotonic()
        try:
            code = serve.wait(90)
        except subprocess.TimeoutExpired:
            pytest.fail("folio serve kept running without its cluster:\n" + open(log_path).read()[-3000:])
        took = time.monotonic() - stopped
        log = open(log_path).read()
        assert code != 0, log[-3000:]
        assert "lost its Ray cluster" in log, log[-3000:]
        with socket.socket() as s:  # the port is free for the next server
            s.bind(("127.0.0.1", port))
        print(f"folio serve exited {code} {took:.1f} s after its cluster stopped")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        if serve is not None:
            _stop_group(serve)
        _stop_group(head)
        shutil.rmtree(workdir, ignore_errors=True)
