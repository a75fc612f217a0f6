"""A Ray head started by `ray start --head` on free loopback ports, as an operator starts one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
    """`ray start --head --block` in its own session, logging to workdir/head.log."""
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
