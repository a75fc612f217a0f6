"""Watching the Ray cluster `folio serve` runs on, so that it exits when that cluster goes.

Without it a server whose cluster was stopped (`ray stop`, `ray up --restart-only`,
`ray down`) keeps its HTTP port with no replica left: it answers 503 forever and
a new `folio serve` on the new cluster cannot bind. Ray's driver does not exit by
itself when the GCS or its node's raylet goes away (it keeps trying to reconnect),
so the server asks the GCS, on a timer, whether this process's node is alive.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import ray

log = logging.getLogger(__name__)

ALIVE = 0  # GcsNodeInfo.GcsNodeState.ALIVE


def node_alive(timeout_s: float) -> Optional[str]:
    """None while the GCS answers and lists this process's node as alive, else why not.
    A GCS restarted in the meantime (a new cluster on the same port) does not know
    the old node, so a server that reconnected to it counts as having lost its cluster."""
    worker = ray._private.worker.global_worker
    node_id = ray.get_runtime_context().get_node_id()
    try:
        nodes = worker.gcs_client.get_all_node_info(timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - any failure to answer is the question's answer
        return f"the GCS did not answer ({type(e).__name__}: {e})"
    for nid, info in nodes.items():
        if nid.hex() == node_id:
            return None if info.state == ALIVE else "this node is marked dead"
    return "this node is not part of the cluster (a new cluster took its place)"


@dataclass(frozen=True)
class WatchConfig:
    interval_s: float = 2.0  # between probes
    probe_timeout_s: float = 3.0  # one GCS call
    grace_s: float = 10.0  # failed probes this long in a row: the cluster is gone


DEFAULT_WATCH = WatchConfig()


class ClusterWatch:
    """Calls on_lost(reason) once, from its own thread, after the cluster has failed
    every probe for grace_s. A thread, not a task: while the cluster is gone, Ray calls
    made on the server's event loop (replacing a replica) can block that loop."""

    def __init__(
        self,
        on_lost: Callable[[str], None],
        config: WatchConfig = DEFAULT_WATCH,
        probe: Callable[[float], Optional[str]] = node_alive,
    ) -> None:
        self.config, self._on_lost, self._probe = config, on_lost, probe
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="folio-ray-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        first_failure = None
        while not self._stop.wait(self.config.interval_s):
            reason = self._probe(self.config.probe_timeout_s)
            if reason is None:
                first_failure = None
                continue
            now = time.monotonic()
            first_failure = first_failure or now
            log.warning("Ray cluster probe failed: %s", reason)
            if now - first_failure >= self.config.grace_s and not self._stop.is_set():
                self.lost = reason
                self._on_lost(reason)
                return
