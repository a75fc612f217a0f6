"""A Ray head started by `ray start --head` on free loopback ports, as an operator starts one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RayHeadPorts:
    gcs: int = field(default_factory=free_port)
    dashboard: int = field(default_factory=free_port)
    client: int = field(default_factory=free_port)
    agent: int = field(default_factory=free_port)


def start_ray_head(ports: RayHeadPorts, workdir: str, env: dict, *extra_args: str) -> subprocess.Popen:
    """`ray start --head --block` in its own session, logging to workdir/head.log.
    SIGTERM to its process group stops it at once: on SIGTERM Ray's --block process first
    drains its node, for up to 30 s by default, which nothing in a test needs."""
    env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    return subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={ports.gcs}",
            "--num-cpus=1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={ports.dashboard}",
            f"--ray-client-server-port={ports.client}",
            f"--dashboard-agent-listen-port={ports.agent}",
            f"--temp-dir={workdir}/ray",
            *extra_args,
            "--disable-usage-stats",
        ],
        env=env,
        stdout=open(os.path.join(workdir, "head.log"), "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for_head(head: subprocess.Popen, workdir: str, timeout: float = 90) -> str:
    """Until the head has written its address file (it is up), or fail the test.
    Returns the address (host:port) its file holds."""
    address_file = os.path.join(workdir, "ray", "ray_current_cluster")
    deadline = time.monotonic() + timeout
    while not os.path.exists(address_file):
        assert head.poll() is None and time.monotonic() < deadline, "ray start failed"
        time.sleep(0.5)
    with open(address_file) as f:
        return f.read().strip()


def stop_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session), then
    SIGKILL what is left of it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        # Other members of the group may outlive the leader briefly.
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
