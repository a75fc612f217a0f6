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
from cluster.replica import DEFAULT_STEP_TIMEOUT_S, WorkerLoadError
from cluster.routing import ROUTING_POLICIES, make_router
from protos import worker_pb2 as pb
from protos.security import ClusterCredentials
from router.app import build_app
from router.edge import AccessPolicy, load_api_keys
from router.limits import DEFAULT_TEMPLATE_KWARGS, Limits
from router.openai_serving import OpenAIServing
from worker.loader import default_model_path, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    model: Optional[str] = None  # None: the bundled SmolLM2
    served_model_name: Optional[str] = None  # None: the model file or folder name
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (see Deployment.port)
    replicas: int = 1
    tensor_parallel_size: int = 1  # workers (devices) per replica
    routing: str = "affinity"  # see cluster/routing.py ROUTING_POLICIES
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = ""  # "": float32 on CPU, bfloat16 on GPU
    max_model_len: Optional[int] = None  # None: the model's own limit
    # The scheduler's limits: defaults from SchedulerConfig, their one home.
    block_size: int = SchedulerConfig.block_size
    kv_cache_memory: Optional[int] = None  # bytes per worker; None: the worker's default
    num_kv_blocks: Optional[int] = None  # exact pool size; overrides kv_cache_memory
    gpu_memory_utilization: float = 0.9  # GPU, neither of the two above: the share of the
    # device for weights, a step's peak and the KV pool
    max_num_seqs: int = SchedulerConfig.max_num_seqs
    max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens
    max_queued_requests: int = 1024
    max_queue_wait_s: float = 30.0  # refuse (429) what would wait longer for a replica
    # The HTTP edge (router/edge.py, router/limits.py).
    api_keys: tuple[str, ...] = ()  # --api-key, also FOLIO_API_KEY; none: no key needed
    api_key_file: Optional[str] = None  # one key per line, or JSON (router/edge.py)
    prefix_cache_per_key: bool = False  # each key's prompts hit only its own prefix cache
    no_api_key: bool = False  # allow --host beyond loopback without keys
    public_metrics: bool = False  # /metrics and /health/replicas without a key
    enable_priority: bool = False  # honour every client's `priority` (else per key)
    max_request_body: int = 4 << 20
    trust_request_chat_template: bool = False
    chat_template_kwargs: tuple[str, ...] = ()  # allowed beyond router.limits.DEFAULT_TEMPLATE_KWARGS
    chat_template_timeout_s: float = 5.0
    stream_keepalive_s: float = 10.0
    # Resumes elsewhere of a request that was running on a replica when it failed: one,
    # so a request that was on two replicas that died (a poison request) is failed.
    max_request_retries: int = 1
    step_timeout: float = DEFAULT_STEP_TIMEOUT_S  # seconds; a slower step fails its replica
    enable_prefix_caching: bool = SchedulerConfig.enable_prefix_caching
    num_speculative_tokens: int = SchedulerConfig.num_speculative_tokens  # n-gram drafts per step; 0: off
    prompt_lookup_min: int = SchedulerConfig.prompt_lookup_min
    prompt_lookup_max: int = SchedulerConfig.prompt_lookup_max
    ray_address: Optional[str] = None  # None: start Ray here on 127.0.0.1
    cpus_per_worker: int = 0  # CPU workers: 0 = this node's cores / replicas
    worker_host: Optional[str] = None  # workers' gRPC host; None: 127.0.0.1 on a Ray we
    # started, the node's IP on a joined cluster
    worker_resources: dict = field(default_factory=dict)  # extra Ray resources per worker
    # Workers' gRPC over TLS (PEM paths as every node sees them); without them plain TCP.
    # Either way every call carries the deployment's random secret.
    worker_tls_cert: Optional[str] = None
    worker_tls_key: Optional[str] = None
    worker_tls_ca: Optional[str] = None  # the head checks worker certificates against it
    worker_tls_server_name: Optional[str] = None  # None: certificates name the workers' IPs
    min_replicas: Optional[int] = None  # autoscaling bounds; None: --replicas (fixed size)
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
            model_path=cfg.model_path,
            block_size=cfg.block_size,
            num_blocks=cfg.num_kv_blocks or 0,
            kv_cache_bytes=cfg.kv_cache_memory or 0,
            dtype=cfg.dtype,
            device="cuda" if use_gpu else "cpu",
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
        ),
        scheduler=SchedulerConfig(
            block_size=cfg.block_size,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=cfg.max_model_len or 0,
            enable_prefix_caching=cfg.enable_prefix_caching,
            num_speculative_tokens=cfg.num_speculative_tokens,
            prompt_lookup_min=cfg.prompt_lookup_min,
            prompt_lookup_max=cfg.prompt_lookup_max,
        ),
        use_gpu=use_gpu,
        cpus_per_worker=cpus,
        # Ray reports a node's routable IP even when started on 127.0.0.1; on a Ray we started
        # (one node) the workers listen on loopback, on a joined cluster on their node's IP.
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
        max_queued=cfg.max_queued_requests,
        max_queue_wait_s=cfg.max_queue_wait_s,
        policy=make_router(cfg.routing, cfg.block_size),
        max_request_retries=cfg.max_request_retries,
    )
    serving = OpenAIServing(frontend, tokenizer, cfg.model_name, handles[0].replica.vocab_size, edge_limits(cfg))
    return Deployment(cfg, frontend, serving, spec, handles)


async def serve(cfg: ServeConfig, on_ready: Optional[Callable[[Deployment], None]] = None) -> None:
    """Deploy, then serve HTTP until the server is told to exit (signal or should_exit)."""
    policy = access_policy(cfg)  # a bad key setting fails before any worker starts
    dep = await deploy(cfg)
    scaler = _start_autoscaler(cfg, dep)
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
        await scaler.stop()
        await dep.shutdown()


def edge_limits(cfg: ServeConfig) -> Limits:
    return Limits(
        max_body_bytes=cfg.max_request_body,
        trust_request_chat_template=cfg.trust_request_chat_template,
        chat_template_kwargs=DEFAULT_TEMPLATE_KWARGS | set(cfg.chat_template_kwargs),
        chat_template_timeout_s=cfg.chat_template_timeout_s,
        stream_keepalive_s=cfg.stream_keepalive_s,
    )


def access_policy(cfg: ServeConfig) -> AccessPolicy:
    """The HTTP edge's keys and rules. Listening beyond loopback without a key is refused
    unless the operator says so (--no-api-key: an authenticating proxy in front)."""
    keys = load_api_keys(list(cfg.api_keys), cfg.api_key_file, salt_per_key=cfg.prefix_cache_per_key)
    if not keys and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        if not cfg.no_api_key:
            raise ValueError(
                f"folio serve: --host {cfg.host} is reachable from other machines; set "
                "an API key (--api-key, FOLIO_API_KEY or --api-key-file), or pass "
                "--no-api-key if a proxy in front authenticates clients"
            )
        log.warning("serving on %s without API keys (--no-api-key): anyone who reaches it can use it", cfg.host)
    return AccessPolicy(keys=keys, public_metrics=cfg.public_metrics, enable_priority=cfg.enable_priority)


def _start_autoscaler(cfg: ServeConfig, dep: Deployment) -> ReplicaAutoscaler:
    """The replicas' supervisor, always: it replaces failed replicas, and autoscales
    when --max-replicas is above --min-replicas (else min = max = --replicas)."""
    low = cfg.min_replicas or cfg.replicas
    high = max(low, cfg.max_replicas or low)
    scaler = ReplicaAutoscaler(
        AutoscalerConfig(
            min_replicas=low,
            max_replicas=high,
            upscale_delay_s=cfg.upscale_delay_s,
            downscale_delay_s=cfg.downscale_delay_s,
        ),
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
def serve_in_background(cfg: ServeConfig, start_timeout: float = 300):
    """Serve cfg on a thread until the block ends; yields once the API answers."""
    ready, box = threading.Event(), {}

    def on_ready(dep: Deployment) -> None:
        box["server"] = BackgroundServer(dep, asyncio.get_running_loop())
        ready.set()

    def run() -> None:
        try:
            asyncio.run(serve(cfg, on_ready))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
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


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
    return value


def _bytes(text: str) -> int:
    """ "4GiB", "512MiB", "1.5GB" or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4GiB or 512MiB)")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary or not unit else 1000
    return int(value * base ** "_KMGT".index(unit or "_"))


HELP = "serve the OpenAI API on a Ray cluster"


def add_cli_args(p: argparse.ArgumentParser) -> None:
    d = ServeConfig()
    p.add_argument("--model", default=None, help="model dir or .gguf (default: bundled SmolLM2)")
    p.add_argument("--served-model-name", default=None, help="the name clients use (default: from the path)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=d.tensor_parallel_size,
        help="devices per replica; each holds a 1/N shard of every layer",
    )
    p.add_argument(
        "--routing",
        choices=ROUTING_POLICIES,
        default=d.routing,
        help="replica choice: prefix-cache affinity balanced with load (default), round-robin, or least-loaded",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device)
    p.add_argument("--dtype", default=d.dtype, help="float32, bfloat16, float16 (default: by device)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--kv-cache-memory", type=_bytes, default=None, help="KV pool per worker, e.g. 2GiB")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="exact KV pool size in blocks")
    p.add_argument(
        "--gpu-memory-utilization",
        type=_fraction,
        default=d.gpu_memory_utilization,
        help="GPU without --kv-cache-memory or --num-kv-blocks: the share of each "
        "device's memory for the weights, a step's peak and the KV pool, which "
        "gets the rest (default %(default)s)",
    )
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=d.max_queued_requests,
        help="admission queue bound; beyond it requests get 429",
    )
    p.add_argument(
        "--max-queue-wait",
        dest="max_queue_wait_s",
        type=float,
        default=d.max_queue_wait_s,
        help="seconds a request may be expected to wait for a replica; beyond it, 429 "
        "with Retry-After (estimated from the measured drain rate)",
    )
    e = p.add_argument_group("HTTP edge: keys and limits (see the README's Security and limits)")
    e.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        default=[],
        help="require 'Authorization: Bearer KEY' (repeatable; also FOLIO_API_KEY)",
    )
    e.add_argument(
        "--api-key-file",
        default=None,
        help='keys, one per line, or a JSON list of {"key", "name", "allow_priority", "cache_salt"} objects',
    )
    e.add_argument(
        "--no-api-key",
        action="store_true",
        help="serve beyond loopback without API keys (a proxy in front authenticates)",
    )
    e.add_argument(
        "--prefix-cache-per-key",
        action="store_true",
        help="keep each API key's prefix-cache entries apart from every other key's",
    )
    e.add_argument("--public-metrics", action="store_true", help="serve /metrics and /health/replicas without a key")
    e.add_argument(
        "--enable-priority",
        action="store_true",
        help="honour the request field `priority` from every client (default: only keys with allow_priority)",
    )
    e.add_argument(
        "--max-request-body",
        type=_bytes,
        default=d.max_request_body,
        help="largest request body, e.g. 4MiB; larger ones get 413",
    )
    e.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="accept chat templates sent with requests (they run on the head)",
    )
    e.add_argument(
        "--chat-template-kwarg",
        dest="chat_template_kwargs",
        action="append",
        default=[],
        help=f"allow this chat_template_kwargs key besides {', '.join(sorted(DEFAULT_TEMPLATE_KWARGS))} (repeatable)",
    )
    e.add_argument(
        "--chat-template-timeout",
        dest="chat_template_timeout_s",
        type=float,
        default=d.chat_template_timeout_s,
        help="seconds a chat template may render",
    )
    e.add_argument(
        "--stream-keepalive",
        dest="stream_keepalive_s",
        type=float,
        default=d.stream_keepalive_s,
        help="seconds of silence after which a stream gets an SSE keep-alive comment",
    )
    p.add_argument(
        "--max-request-retries",
        type=int,
        default=d.max_request_retries,
        help="times a request that was running on a replica when it failed resumes on "
        "another (a request that only waited there always resumes)",
    )
    p.add_argument(
        "--step-timeout",
        type=float,
        default=d.step_timeout,
        help="seconds a step may take; a replica whose step takes longer (a hung "
        "worker) fails, and its requests resume on another replica",
    )
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=d.num_speculative_tokens,
        help="speculative decoding: up to this many n-gram (prompt lookup) draft tokens "
        "verified per step; 0 turns it off",
    )
    p.add_argument(
        "--prompt-lookup-min", type=int, default=d.prompt_lookup_min, help="shortest suffix n-gram looked up for drafts"
    )
    p.add_argument(
        "--prompt-lookup-max",
        type=int,
        default=d.prompt_lookup_max,
        help="longest suffix n-gram looked up (tried first)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=int,
        default=0,
        help="CPU workers: cores (torch threads) each; default: this node's cores / replicas",
    )
    p.add_argument("--ray-address", default=None, help="'auto' or host:port (default: start Ray locally)")
    p.add_argument(
        "--worker-host",
        default=None,
        help="address workers' gRPC servers bind (default: the node's IP on a joined cluster)",
    )
    p.add_argument(
        "--worker-resources",
        type=json.loads,
        default={},
        help="extra Ray resources per worker, JSON, e.g. '{\"fake_gpu\": 1}'",
    )
    p.add_argument(
        "--worker-tls-cert",
        default=None,
        help="workers serve gRPC over TLS with this PEM certificate (path on every node)",
    )
    p.add_argument("--worker-tls-key", default=None, help="the worker certificate's PEM private key")
    p.add_argument(
        "--worker-tls-ca",
        default=None,
        help="PEM CA the head checks worker certificates against (default: system roots)",
    )
    p.add_argument(
        "--worker-tls-server-name",
        default=None,
        help="name the head expects in worker certificates (default: each worker's IP)",
    )
    p.add_argument(
        "--min-replicas", type=int, default=None, help="autoscale: never fewer replicas (default: --replicas)"
    )
    p.add_argument(
        "--max-replicas",
        type=int,
        default=None,
        help="autoscale: never more replicas; more than --min-replicas turns autoscaling on",
    )
    p.add_argument(
        "--upscale-delay",
        dest="upscale_delay_s",
        type=float,
        default=d.upscale_delay_s,
        help="seconds more replicas must be wanted before one is added",
    )
    p.add_argument(
        "--downscale-delay",
        dest="downscale_delay_s",
        type=float,
        default=d.downscale_delay_s,
        help="seconds fewer replicas must be wanted before one is drained",
    )


def main(args: argparse.Namespace) -> None:
    fields = ServeConfig.__dataclass_fields__
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in fields}
    cfg = ServeConfig(**values)
    try:
        access_policy(cfg)
    except (ValueError, OSError) as e:  # keys: a clear line, before anything starts
        raise SystemExit(f"{e}" if str(e).startswith("folio serve") else f"folio serve: {e}") from None
    try:
        asyncio.run(serve(cfg))
    except WorkerLoadError as e:  # the message says why; a traceback would not help
        raise SystemExit(f"folio serve: {e}") from None
