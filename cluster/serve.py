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
import json
import logging
import os
import re
import signal
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import ray
import uvicorn

from cluster.autoscaler import AutoscalerConfig, ReplicaAutoscaler
from cluster.config import SchedulerConfig
from cluster.frontend import Frontend
from cluster.metrics import RequestMetrics
from cluster.placement import ReplicaHandle, ReplicaSpec, launch_replicas, release_replica
from cluster.replica import WorkerLoadError
from cluster.routing import ROUTING_POLICIES, make_router
from protos import worker_pb2 as pb
from router.app import build_app
from router.openai_serving import OpenAIServing
from worker.loader import default_model_path, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    model: Optional[str] = None              # None: the bundled SmolLM2
    served_model_name: Optional[str] = None  # None: the model file or folder name
    host: str = "127.0.0.1"
    port: int = 8000                         # 0: any free port (see Deployment.port)
    replicas: int = 1
    tensor_parallel_size: int = 1            # workers (devices) per replica
    routing: str = "affinity"                # see cluster/routing.py ROUTING_POLICIES
    device: str = "auto"                     # auto | cpu | cuda
    dtype: str = ""                          # "": float32 on CPU, bfloat16 on GPU
    max_model_len: Optional[int] = None      # None: the model's own limit
    block_size: int = 16
    kv_cache_memory: Optional[int] = None    # bytes per worker; None: the worker's default
    num_kv_blocks: Optional[int] = None      # exact pool size; overrides kv_cache_memory
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_queued_requests: int = 1024
    max_request_retries: int = 2             # resumes on another replica after a replica fails
    enable_prefix_caching: bool = True
    num_speculative_tokens: int = 0          # n-gram (prompt lookup) drafts per step; 0: off
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    ray_address: Optional[str] = None        # None: start Ray here on 127.0.0.1
    cpus_per_worker: int = 0                 # CPU workers: 0 = this node's cores / replicas
    worker_host: Optional[str] = None        # workers' gRPC host; None: 127.0.0.1 on a Ray we
                                             # started, the node's IP on a joined cluster
    worker_resources: dict = field(default_factory=dict)   # extra Ray resources per worker
    min_replicas: Optional[int] = None       # autoscaling bounds; None: --replicas (fixed size)
    max_replicas: Optional[int] = None
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0

    @property
    def model_path(self) -> str:
        return self.model or default_model_path()

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
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and resources.get("GPU", 0) >= 1)
    # A CPU replica takes its share of this node's cores (torch threads), not Ray's default 1.
    cpus = cfg.cpus_per_worker or max(1, int(resources.get("CPU", 1)) // (cfg.replicas * cfg.tensor_parallel_size))
    spec = ReplicaSpec(
        load=pb.LoadModelRequest(
            model_path=cfg.model_path, block_size=cfg.block_size, num_blocks=cfg.num_kv_blocks or 0,
            kv_cache_bytes=cfg.kv_cache_memory or 0, dtype=cfg.dtype,
            device="cuda" if use_gpu else "cpu"),
        scheduler=SchedulerConfig(block_size=cfg.block_size, max_num_seqs=cfg.max_num_seqs,
                                  max_num_batched_tokens=cfg.max_num_batched_tokens,
                                  max_model_len=cfg.max_model_len or 0,
                                  enable_prefix_caching=cfg.enable_prefix_caching,
                                  num_speculative_tokens=cfg.num_speculative_tokens,
                                  prompt_lookup_min=cfg.prompt_lookup_min,
                                  prompt_lookup_max=cfg.prompt_lookup_max),
        use_gpu=use_gpu, cpus_per_worker=cpus,
        # Ray reports a node's routable IP even when started on 127.0.0.1; on a Ray we started
        # (one node) the workers listen on loopback, on a joined cluster on their node's IP.
        worker_host=cfg.worker_host or (None if cfg.ray_address else "127.0.0.1"),
        resources=dict(cfg.worker_resources), tensor_parallel_size=cfg.tensor_parallel_size)
    metrics = RequestMetrics()
    log.info("loading %s on %d replica(s) (%s)", cfg.model_path, cfg.replicas,
             "GPU" if use_gpu else f"CPU, {cpus} threads each")
    handles = await launch_replicas(cfg.replicas, spec, metrics)
    try:
        tokenizer = await asyncio.to_thread(load_tokenizer, cfg.model_path)
    except BaseException:
        await asyncio.gather(*(release_replica(h) for h in handles))
        raise
    frontend = Frontend([h.replica for h in handles], metrics, max_queued=cfg.max_queued_requests,
                        policy=make_router(cfg.routing, cfg.block_size),
                        max_request_retries=cfg.max_request_retries)
    serving = OpenAIServing(frontend, tokenizer, cfg.model_name, handles[0].replica.vocab_size)
    return Deployment(cfg, frontend, serving, spec, handles)


async def serve(cfg: ServeConfig, on_ready: Optional[Callable[[Deployment], None]] = None) -> None:
    """Deploy, then serve HTTP until the server is told to exit (signal or should_exit)."""
    dep = await deploy(cfg)
    scaler = _start_autoscaler(cfg, dep)
    try:
        app = build_app(dep.serving, dep.frontend)
        dep.server = _Server(uvicorn.Config(app, host=cfg.host, port=cfg.port,
                                            log_level="info", access_log=False))
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                asyncio.get_running_loop().add_signal_handler(
                    sig, lambda: setattr(dep.server, "should_exit", True))
        task = asyncio.create_task(dep.server.serve())
        while not dep.server.started and not task.done():
            await asyncio.sleep(0.05)
        if dep.server.started:
            dep.port = dep.server.servers[0].sockets[0].getsockname()[1]
            log.info("folio is ready: OpenAI API at http://%s:%d/v1 serving %r (max_model_len %d)",
                     cfg.host, dep.port, cfg.model_name, dep.frontend.max_model_len)
            if on_ready is not None:
                on_ready(dep)
        await task
    finally:
        if scaler is not None:
            await scaler.stop()
        await dep.shutdown()


def _start_autoscaler(cfg: ServeConfig, dep: Deployment) -> Optional[ReplicaAutoscaler]:
    low = cfg.min_replicas or cfg.replicas
    high = max(low, cfg.max_replicas or low)
    if low == high == cfg.replicas:
        return None
    scaler = ReplicaAutoscaler(
        AutoscalerConfig(min_replicas=low, max_replicas=high, upscale_delay_s=cfg.upscale_delay_s,
                         downscale_delay_s=cfg.downscale_delay_s),
        dep.frontend, dep.handles, dep.spec, dep.frontend.metrics)
    scaler.start()
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
def serve_in_background(cfg: ServeConfig, start_timeout: float = 300):
    """Serve cfg on a thread until the block ends; yields once the API answers."""
    ready, box = threading.Event(), {}

    def on_ready(dep: Deployment) -> None:
        box["server"] = BackgroundServer(dep, asyncio.get_running_loop())
        ready.set()

    def run() -> None:
        try:
            asyncio.run(serve(cfg, on_ready))
        except BaseException as e:      # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e
            ready.set()

    thread = threading.Thread(target=run, name="folio-serve", daemon=True)
    thread.start()
    if not ready.wait(start_timeout):
        raise TimeoutError(f"folio serve did not start within {start_timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    server = box["server"]
    try:
        yield server
    finally:
        server.loop.call_soon_threadsafe(setattr, server.deployment.server, "should_exit", True)
        thread.join(120)


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
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)


def _bytes(text: str) -> int:
    """"4GiB", "512MiB", "1.5GB" or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4GiB or 512MiB)")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary or not unit else 1000
    return int(value * base ** "_KMGT".index(unit or "_"))


def build_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the OpenAI API on a Ray cluster")
    d = ServeConfig()
    p.add_argument("--model", default=None, help="model dir or .gguf (default: bundled SmolLM2)")
    p.add_argument("--served-model-name", default=None, help="the name clients use (default: from the path)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size,
                   help="devices per replica; each holds a 1/N shard of every layer")
    p.add_argument("--routing", choices=ROUTING_POLICIES, default=d.routing,
                   help="replica choice: prefix-cache affinity balanced with load (default), "
                        "round-robin, or least-loaded")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device)
    p.add_argument("--dtype", default=d.dtype, help="float32, bfloat16, float16 (default: by device)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--kv-cache-memory", type=_bytes, default=None, help="KV pool per worker, e.g. 2GiB")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="exact KV pool size in blocks")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="admission queue bound; beyond it requests get 429")
    p.add_argument("--max-request-retries", type=int, default=d.max_request_retries,
                   help="times a request resumes on another replica when its replica fails")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--num-speculative-tokens", type=int, default=d.num_speculative_tokens,
                   help="speculative decoding: up to this many n-gram (prompt lookup) draft tokens "
                        "verified per step; 0 turns it off")
    p.add_argument("--prompt-lookup-min", type=int, default=d.prompt_lookup_min,
                   help="shortest suffix n-gram looked up for drafts")
    p.add_argument("--prompt-lookup-max", type=int, default=d.prompt_lookup_max,
                   help="longest suffix n-gram looked up (tried first)")
    p.add_argument("--cpus-per-worker", type=int, default=0,
                   help="CPU workers: cores (torch threads) each; default: this node's cores / replicas")
    p.add_argument("--ray-address", default=None, help="'auto' or host:port (default: start Ray locally)")
    p.add_argument("--worker-host", default=None,
                   help="address workers' gRPC servers bind (default: the node's IP on a joined cluster)")
    p.add_argument("--worker-resources", type=json.loads, default={},
                   help='extra Ray resources per worker, JSON, e.g. \'{"fake_gpu": 1}\'')
    p.add_argument("--min-replicas", type=int, default=None,
                   help="autoscale: never fewer replicas (default: --replicas)")
    p.add_argument("--max-replicas", type=int, default=None,
                   help="autoscale: never more replicas; more than --min-replicas turns autoscaling on")
    p.add_argument("--upscale-delay", dest="upscale_delay_s", type=float, default=d.upscale_delay_s,
                   help="seconds more replicas must be wanted before one is added")
    p.add_argument("--downscale-delay", dest="downscale_delay_s", type=float, default=d.downscale_delay_s,
                   help="seconds fewer replicas must be wanted before one is drained")
    p.set_defaults(func=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> None:
    fields = ServeConfig.__dataclass_fields__
    cfg = ServeConfig(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        asyncio.run(serve(cfg))
    except WorkerLoadError as e:     # the message says why; a traceback would not help
        raise SystemExit(f"folio serve: {e}") from None
