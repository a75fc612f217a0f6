"""`folio serve`: the OpenAI-compatible server on a Ray cluster.

    folio serve                                   # bundled SmolLM2, local Ray on 127.0.0.1
    folio serve --ray-address auto --replicas 4   # an existing cluster, 4 replicas

Start-up, in order: connect to Ray (or start it locally on 127.0.0.1); for each
replica reserve a placement group and start one WorkerActor per device; each
actor returns the address of its gRPC server, and from then on the head talks
to it only over gRPC (LoadModel, then the step stream). When every replica has
loaded the model, the tokenizer is loaded and uvicorn starts on --host/--port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import ray
import uvicorn

from folio.cluster.autoscaler import AutoscalerConfig, ReplicaAutoscaler
from folio.cluster.entrypoints.options import add_config_args, config_from_args
from folio.cluster.frontend import AdmissionConfig, Frontend
from folio.cluster.metrics import RequestMetrics
from folio.cluster.placement import ReplicaHandle, ReplicaSpec, launch_replicas, release_replica, start_local_ray
from folio.cluster.ray_watch import DEFAULT_WATCH, ClusterWatch, WatchConfig
from folio.cluster.replica import DEFAULT_STEP_TIMEOUT_S, WorkerLoadError
from folio.cluster.routing import ROUTING_POLICIES, make_router
from folio.protos.codec import encode_load_request
from folio.protos.config import SchedulerConfig, WorkerConfig, check_speculation
from folio.protos.security import ClusterCredentials
from folio.router.app import build_app
from folio.router.edge import AccessConfig, access_policy
from folio.router.limits import Limits
from folio.router.openai_serving import OpenAIServing
from folio.worker.loader import default_model_path, load_tokenizer

log = logging.getLogger(__name__)

# Once the cluster is gone, releasing the replicas can only time out: bounded, then exit.
LOST_CLUSTER_SHUTDOWN_S = 10.0


class ClusterLost(RuntimeError):
    """The Ray cluster this server ran on went away (stopped, restarted or torn down)."""


@dataclass(frozen=True)
class ServeConfig:
    """Everything `folio serve` takes. Each nested config is its part's own (the flags
    come from their fields, cluster/entrypoints/options.py); the fields here are the
    deployment's: where to listen, how many replicas and where their workers run."""

    worker: WorkerConfig = field(default_factory=WorkerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    autoscaler: AutoscalerConfig = field(default_factory=AutoscalerConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    limits: Limits = field(default_factory=Limits)
    served_model_name: Optional[str] = field(
        default=None, metadata={"help": "the name clients use (default: the model file or folder name)"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address the HTTP server binds"})
    port: int = field(default=8000, metadata={"help": "HTTP port; 0: any free port"})
    replicas: int = field(default=1, metadata={"help": "model replicas, each with its own workers and scheduler"})
    tensor_parallel_size: int = field(
        default=1, metadata={"help": "devices per replica; each holds a 1/N shard of every layer"}
    )
    routing: str = field(
        default="affinity",
        metadata={
            "help": "replica choice: prefix-cache affinity balanced with load, round-robin, or least-loaded",
            "choices": ROUTING_POLICIES,
        },
    )
    step_timeout: float = field(
        default=DEFAULT_STEP_TIMEOUT_S,
        metadata={
            "help": "seconds a step may take; a replica whose step takes longer (a hung worker) fails, "
            "and its requests resume on another replica"
        },
    )
    ray_address: Optional[str] = field(
        default=None, metadata={"help": "'auto' or host:port (default: start Ray here on 127.0.0.1)"}
    )
    cpus_per_worker: int = field(
        default=0, metadata={"help": "CPU workers: cores (torch threads) each; 0: this node's cores / replicas"}
    )
    # Ray reports a node's routable IP even when started on 127.0.0.1; on a Ray we started
    # (one node) the workers listen on loopback, on a joined cluster on their node's IP.
    worker_host: Optional[str] = field(
        default=None,
        metadata={"help": "address workers' gRPC servers bind (default: the node's IP on a joined cluster)"},
    )
    worker_resources: dict = field(
        default_factory=dict,
        metadata={"help": "extra Ray resources per worker, JSON, e.g. '{\"fake_gpu\": 1}'"},
    )
    # Workers' gRPC over TLS (PEM paths as every node sees them); without them plain TCP.
    # Either way every call carries the deployment's random secret.
    worker_tls_cert: Optional[str] = field(
        default=None,
        metadata={"help": "workers serve gRPC over TLS with this PEM certificate (path on every node)"},
    )
    worker_tls_key: Optional[str] = field(default=None, metadata={"help": "the worker certificate's PEM private key"})
    worker_tls_ca: Optional[str] = field(
        default=None, metadata={"help": "PEM CA the head checks worker certificates against (default: system roots)"}
    )
    worker_tls_server_name: Optional[str] = field(
        default=None, metadata={"help": "name the head expects in worker certificates (default: each worker's IP)"}
    )

    def __post_init__(self) -> None:
        check_speculation(self.worker, self.scheduler)

    @property
    def model_path(self) -> str:
        return self.worker.model or default_model_path()

    @property
    def model_name(self) -> str:
        base = os.path.basename(os.path.normpath(self.model_path))
        return self.served_model_name or re.sub(r"\.gguf$", "", base)


@dataclass
class Deployment:
    """Everything `serve` started, so it can be stopped in reverse order."""

    config: ServeConfig
    frontend: Frontend
    serving: OpenAIServing
    spec: ReplicaSpec
    handles: list[ReplicaHandle] = field(default_factory=list)
    server: Optional[uvicorn.Server] = None
    port: int = 0

    async def shutdown(self) -> None:
        await asyncio.gather(*(release_replica(h) for h in self.handles))
        self.handles = []


async def deploy(cfg: ServeConfig) -> Deployment:
    """Start the workers and the head's replicas and frontend; no HTTP yet."""
    _connect_ray(cfg.ray_address)
    resources = ray.cluster_resources()
    use_gpu = cfg.worker.device == "cuda" or (cfg.worker.device == "auto" and resources.get("GPU", 0) >= 1)
    # A CPU replica takes its share of this node's cores (torch threads), not Ray's default 1.
    cpus = cfg.cpus_per_worker or max(1, int(resources.get("CPU", 1)) // (cfg.replicas * cfg.tensor_parallel_size))
    spec = ReplicaSpec(
        load=encode_load_request(replace(cfg.worker, device="cuda" if use_gpu else "cpu"), cfg.scheduler),
        scheduler=cfg.scheduler,
        use_gpu=use_gpu,
        cpus_per_worker=cpus,
        worker_host=cfg.worker_host or (None if cfg.ray_address else "127.0.0.1"),
        resources=dict(cfg.worker_resources),
        tensor_parallel_size=cfg.tensor_parallel_size,
        step_timeout=cfg.step_timeout,
        credentials=ClusterCredentials.generate(
            tls_cert=cfg.worker_tls_cert,
            tls_key=cfg.worker_tls_key,
            tls_ca=cfg.worker_tls_ca,
            tls_server_name=cfg.worker_tls_server_name,
        ),
    )
    metrics = RequestMetrics()
    log.info(
        "loading %s on %d replica(s) (%s)",
        cfg.model_path,
        cfg.replicas,
        "GPU" if use_gpu else f"CPU, {cpus} threads each",
    )
    handles = await launch_replicas(cfg.replicas, spec, metrics)
    try:
        tokenizer = await asyncio.to_thread(load_tokenizer, cfg.model_path)
    except BaseException:
        await asyncio.gather(*(release_replica(h) for h in handles))
        raise
    frontend = Frontend(
        [h.replica for h in handles],
        metrics,
        cfg.admission,
        policy=make_router(cfg.routing, cfg.scheduler.block_size),
    )
    serving = OpenAIServing(frontend, tokenizer, cfg.model_name, handles[0].replica.vocab_size, cfg.limits)
    return Deployment(cfg, frontend, serving, spec, handles)


async def serve(
    cfg: ServeConfig,
    on_ready: Optional[Callable[[Deployment], None]] = None,
    watch: WatchConfig = DEFAULT_WATCH,
    hard_exit: bool = False,
) -> None:
    """Deploy, then serve HTTP until the server is told to exit (signal or should_exit).
    Raises ClusterLost when the Ray cluster goes away under it (ray_watch.py): the port
    is freed for the server a restarted cluster starts. hard_exit (the CLI): if that
    takes too long, the process exits with status 1 regardless."""
    policy = access_policy(cfg.access, cfg.host)  # a bad key setting fails before any worker starts
    dep = await deploy(cfg)
    scaler = _start_autoscaler(cfg, dep)

    loop = asyncio.get_running_loop()

    def on_lost(reason: str) -> None:  # on the watch's thread
        log.error("folio serve: lost its Ray cluster (%s); exiting", reason)
        if hard_exit:  # a backstop: the loop may be stuck in a Ray call that waits for the cluster
            timer = threading.Timer(LOST_CLUSTER_SHUTDOWN_S * 2, os._exit, (1,))
            timer.daemon = True
            timer.start()
        if dep.server is not None:
            loop.call_soon_threadsafe(setattr, dep.server, "should_exit", True)

    watcher = ClusterWatch(on_lost, watch)
    watcher.start()
    try:
        app = build_app(dep.serving, dep.frontend, policy)
        dep.server = _Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info", access_log=False))
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                asyncio.get_running_loop().add_signal_handler(sig, lambda: setattr(dep.server, "should_exit", True))
        task = asyncio.create_task(dep.server.serve())
        while not dep.server.started and not task.done():
            await asyncio.sleep(0.05)
        if dep.server.started:
            dep.port = dep.server.servers[0].sockets[0].getsockname()[1]
            log.info(
                "folio is ready: OpenAI API at http://%s:%d/v1 serving %r (max_model_len %d)",
                cfg.host,
                dep.port,
                cfg.model_name,
                dep.frontend.max_model_len,
            )
            if on_ready is not None:
                on_ready(dep)
        await task
    finally:
        watcher.stop()
        await scaler.stop()
        if watcher.lost is None:
            await dep.shutdown()
        else:  # the actors went with the cluster; Ray's calls would only wait for it
            with contextlib.suppress(Exception, asyncio.TimeoutError):
                await asyncio.wait_for(dep.shutdown(), LOST_CLUSTER_SHUTDOWN_S)
    if watcher.lost is not None:
        raise ClusterLost(watcher.lost)


def _start_autoscaler(cfg: ServeConfig, dep: Deployment) -> ReplicaAutoscaler:
    """The replicas' supervisor, always: it replaces failed replicas, and autoscales
    when --max-replicas is above --min-replicas (else min = max = --replicas)."""
    low = cfg.autoscaler.min_replicas or cfg.replicas
    high = max(low, cfg.autoscaler.max_replicas or low)
    scaler = ReplicaAutoscaler(
        replace(cfg.autoscaler, min_replicas=low, max_replicas=high),
        dep.frontend,
        dep.handles,
        dep.spec,
        dep.frontend.metrics,
    )
    scaler.start()
    if low < high:
        log.info("autoscaling between %d and %d replicas", low, high)
    return scaler


@dataclass
class BackgroundServer:
    """A deployment serving on its own thread and event loop (benchmarks, tests)."""

    deployment: Deployment
    loop: asyncio.AbstractEventLoop

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.deployment.port}"

    def call(self, coro, timeout: float = 30):
        """Run a coroutine on the server's loop (where the head's state lives)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextlib.contextmanager
def serve_in_background(cfg: ServeConfig, start_timeout: float = 300, stop_timeout: float = 120):
    """Serve cfg on a thread until the block ends; yields once the API answers.

    A start that times out is cancelled, so its replicas (and their placement groups)
    are released before the error is raised; a server that does not stop within
    stop_timeout is an error too, so nothing it holds outlives the block unseen.
    """
    ready, box = threading.Event(), {}

    def on_ready(dep: Deployment) -> None:
        box["server"] = BackgroundServer(dep, asyncio.get_running_loop())
        ready.set()

    async def main() -> None:
        box["loop"], box["task"] = asyncio.get_running_loop(), asyncio.current_task()
        await serve(cfg, on_ready)

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e
            ready.set()

    thread = threading.Thread(target=run, name="folio-serve", daemon=True)
    thread.start()
    if not ready.wait(start_timeout):
        box["loop"].call_soon_threadsafe(box["task"].cancel)
        thread.join(stop_timeout)
        raise TimeoutError(f"folio serve did not start within {start_timeout:.0f} s (see its log for why)")
    if "error" in box:
        raise box["error"]
    server = box["server"]
    try:
        yield server
    finally:
        server.loop.call_soon_threadsafe(setattr, server.deployment.server, "should_exit", True)
        thread.join(stop_timeout)
        if thread.is_alive():
            raise RuntimeError(f"folio serve did not stop within {stop_timeout:.0f} s; its replicas may still be held")


class _Server(uvicorn.Server):
    """uvicorn minus its signal capture, which re-raises SIGINT after serving and so
    would cut the workers' shutdown short; serve() handles the signals instead."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _connect_ray(address: Optional[str]) -> None:
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        start_local_ray()


HELP = "serve the OpenAI API on a Ray cluster"


def add_cli_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, ServeConfig)


def main(args: argparse.Namespace) -> None:
    try:
        cfg = config_from_args(ServeConfig, args)
        access_policy(cfg.access, cfg.host)
    except (ValueError, OSError) as e:  # settings and keys: a clear line, before anything starts
        raise SystemExit(f"{e}" if str(e).startswith("folio serve") else f"folio serve: {e}") from None
    try:
        asyncio.run(serve(cfg, hard_exit=True))
    except WorkerLoadError as e:  # the message says why; a traceback would not help
        raise SystemExit(f"folio serve: {e}") from None
    except ClusterLost as e:
        # Non-zero, so a supervisor (systemd, a container runtime) sees a failure; and
        # os._exit, because Ray's exit hooks would wait for the cluster that is gone.
        print(f"folio serve: lost its Ray cluster ({e}); exiting", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)
