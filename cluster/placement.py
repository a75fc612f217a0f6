"""Starting and releasing one replica on the Ray cluster.

A replica is a placement group (one bundle per device of the replica, packed
together) with one WorkerActor per bundle. Ray only places the processes; the
head then reaches each worker over gRPC. Autoscaling and tensor parallelism
both go through launch_replica / release_replica.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from folio.cluster.metrics import RequestMetrics
from folio.cluster.replica import DEFAULT_STEP_TIMEOUT_S, Replica
from folio.protos import worker_pb2 as pb
from folio.protos.config import SchedulerConfig
from folio.protos.security import ClusterCredentials
from folio.worker.actor import WorkerActor

log = logging.getLogger(__name__)

# Ray starts worker processes at niceness 15. A CPU worker's torch threads meet
# at a barrier after every op, so any busy process at niceness 0 on the node (a
# client, a tokenizer) starves one of them and stalls them all: an aiperf client
# taking one of two cores cut the served throughput 4.5x. Workers run at 0.
WORKER_NICENESS = 0


def start_local_ray() -> None:
    """A one-node Ray cluster on 127.0.0.1 for this process, workers at WORKER_NICENESS."""
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, _system_config={"worker_niceness": WORKER_NICENESS})


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica of a deployment is made of."""

    load: pb.LoadModelRequest  # what each worker loads
    scheduler: SchedulerConfig
    use_gpu: bool
    cpus_per_worker: int  # torch threads on CPU workers
    worker_host: str | None  # None: the node's IP (multi-node); else e.g. 127.0.0.1
    # Extra Ray resources per worker (e.g. {"accelerator_type:A100": 0.001} or a custom
    # label a node type advertises), so replicas land only on nodes that have them.
    resources: dict[str, float] = field(default_factory=dict)
    tensor_parallel_size: int = 1  # workers (devices) per replica, one TP rank each
    step_timeout: float = DEFAULT_STEP_TIMEOUT_S  # seconds; a slower step fails its replica
    # The deployment's secret (and worker TLS files): every worker is handed it through
    # Ray and accepts only calls that carry it. The default is a fresh random secret.
    credentials: ClusterCredentials = field(default_factory=ClusterCredentials.generate)
    # Ray's placement-group names are global to the cluster's namespace: two deployments
    # on one cluster (or a server started while an old one still shuts down) must not
    # claim the same name, so each deployment's replicas carry its own random tag.
    deployment: str = field(default_factory=lambda: f"folio-{secrets.token_hex(4)}")

    def placement_group_name(self, index: int) -> str:
        return f"{self.deployment}-replica-{index}"


# How often launch_replica says what it still waits for while Ray cannot place a replica.
PLACEMENT_REPORT_S = 30.0


@dataclass
class ReplicaHandle:
    replica: Replica
    placement_group: PlacementGroup
    actors: list = field(default_factory=list)


async def launch_replica(index: int, spec: ReplicaSpec, metrics: RequestMetrics) -> ReplicaHandle:
    """Reserve devices, start the workers, load the model; returns when it can serve.

    Waiting on the placement group is what asks Ray's autoscaler for a node
    when the cluster has no free device.
    """
    bundle = {"CPU": 1, "GPU": 1} if spec.use_gpu else {"CPU": spec.cpus_per_worker}
    bundle.update(spec.resources)
    tp = spec.tensor_parallel_size
    name = spec.placement_group_name(index)
    pg = placement_group([bundle] * tp, strategy=_pack_strategy(bundle, tp), name=name)
    handle = ReplicaHandle(replica=None, placement_group=pg)  # type: ignore[arg-type]
    try:
        await _placed(pg, name, [bundle] * tp)
        handle.actors = [
            WorkerActor.options(
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                resources=spec.resources,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote()
            for rank in range(tp)
        ]
        addresses = await asyncio.gather(
            *(a.start.remote(spec.credentials, spec.worker_host, bundle["CPU"]) for a in handle.actors)
        )
        load = pb.LoadModelRequest()
        load.CopyFrom(spec.load)
        if tp > 1:
            # The ranks meet on rank 0's node, at a port free there.
            host = addresses[0].rsplit(":", 1)[0]
            load.rendezvous = f"tcp://{host}:{await handle.actors[0].free_port.remote(host)}"
        handle.replica = Replica(
            index, addresses, spec.scheduler, metrics, credentials=spec.credentials, step_timeout=spec.step_timeout
        )
        await handle.replica.start(load)
    except BaseException:
        await release_replica(handle)
        raise
    return handle


async def _placed(pg: PlacementGroup, name: str, bundles: list[dict]) -> None:
    """Wait until Ray has placed pg, saying every PLACEMENT_REPORT_S what it waits for
    (an autoscaler may be adding a node, or another server may hold the devices), so a
    start that cannot proceed is visible in the log rather than silent."""
    ready = asyncio.ensure_future(pg.ready())
    try:
        while True:
            done, _ = await asyncio.wait({ready}, timeout=PLACEMENT_REPORT_S)
            if done:
                ready.result()
                return
            log.warning(
                "replica placement group %s (bundles %s) is not placed yet; the cluster has %s available of %s",
                name,
                bundles,
                ray.available_resources(),
                ray.cluster_resources(),
            )
    finally:
        ready.cancel()


def _pack_strategy(bundle: dict[str, float], count: int) -> str:
    """STRICT_PACK (one node: NCCL over NVLink, no network hop) when some node can hold
    every bundle; otherwise PACK, which spreads over as few nodes as it can."""
    if count == 1:
        return "STRICT_PACK"
    for node in ray.nodes():
        have = node.get("Resources", {}) if node.get("Alive") else {}
        if all(have.get(k, 0) >= v * count for k, v in bundle.items()):
            return "STRICT_PACK"
    return "PACK"


async def release_replica(handle: ReplicaHandle) -> None:
    """Stop the workers and give the devices back to Ray (and so to its autoscaler).

    Everything is released even when a part fails: a dead or frozen worker
    must not keep its device from the replica that replaces it."""
    try:
        if handle.replica is not None:
            await handle.replica.close()
    except Exception:  # noqa: BLE001 - the actors and devices go regardless
        log.exception("replica %d did not close cleanly", handle.replica.index)
    finally:
        for a in handle.actors:
            try:
                ray.kill(a)  # SIGKILLs the process, a frozen (SIGSTOPed) one too
            except Exception:  # noqa: BLE001 - already gone
                log.warning("could not kill a worker actor of a released replica", exc_info=True)
        remove_placement_group(handle.placement_group)


async def launch_replicas(
    count: int, spec: ReplicaSpec, metrics: RequestMetrics, first_index: int = 0
) -> list[ReplicaHandle]:
    """Several replicas at once; if any fails, none is left running."""
    results = await asyncio.gather(
        *(launch_replica(first_index + i, spec, metrics) for i in range(count)), return_exceptions=True
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        await asyncio.gather(*(release_replica(r) for r in results if isinstance(r, ReplicaHandle)))
        raise failed[0]
    return list(results)
