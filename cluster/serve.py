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
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import ray
import uvicorn
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import SchedulerConfig
from cluster.frontend import Frontend
from cluster.metrics import RequestMetrics
from cluster.replica import Replica, WorkerLoadError
from protos import worker_pb2 as pb
from router.app import build_app
from router.openai_serving import OpenAIServing
from worker.actor import WorkerActor
from worker.loader import default_model_path, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    model: Optional[str] = None              # None: the bundled SmolLM2
    served_model_name: Optional[str] = None  # None: the model file or folder name
    host: str = "127.0.0.1"
    port: int = 8000                         # 0: any free port (see Deployment.port)
    replicas: int = 1
    device: str = "auto"                     # auto | cpu | cuda
    dtype: str = ""                          # "": float32 on CPU, bfloat16 on GPU
    max_model_len: Optional[int] = None      # None: the model's own limit
    block_size: int = 16
    kv_cache_memory: Optional[int] = None    # bytes per worker; None: the worker's default
    num_kv_blocks: Optional[int] = None      # exact pool size; overrides kv_cache_memory
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_queued_requests: int = 1024
    enable_prefix_caching: bool = True
    ray_address: Optional[str] = None        # None: start Ray here on 127.0.0.1

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
    actors: list = field(default_factory=list)
    placement_groups: list[PlacementGroup] = field(default_factory=list)
    server: Optional[uvicorn.Server] = None
    port: int = 0

    async def shutdown(self) -> None:
        for r in self.frontend.replicas:
            await r.close()
        for a in self.actors:
            ray.kill(a)
        for pg in self.placement_groups:
            remove_placement_group(pg)


async def deploy(cfg: ServeConfig) -> Deployment:
    """Start the workers and the head's replicas and frontend; no HTTP yet."""
    _connect_ray(cfg.ray_address)
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
    bundle = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}
    load = pb.LoadModelRequest(
        model_path=cfg.model_path, block_size=cfg.block_size, num_blocks=cfg.num_kv_blocks or 0,
        kv_cache_bytes=cfg.kv_cache_memory or 0, dtype=cfg.dtype, device="cuda" if use_gpu else "cpu")
    # Ray reports a node's routable IP even when started on 127.0.0.1; on a Ray we started
    # (one node) the workers listen on loopback, on a joined cluster on their node's IP.
    worker_host = None if cfg.ray_address else "127.0.0.1"
    metrics = RequestMetrics()
    sched = SchedulerConfig(block_size=cfg.block_size, max_num_seqs=cfg.max_num_seqs,
                            max_num_batched_tokens=cfg.max_num_batched_tokens,
                            max_model_len=cfg.max_model_len or 0,
                            enable_prefix_caching=cfg.enable_prefix_caching)
    actors, pgs, replicas = [], [], []
    try:
        for i in range(cfg.replicas):
            # One bundle per device of the replica (tensor-parallel ranks go here), kept together.
            pg = placement_group([bundle], strategy="STRICT_PACK", name=f"folio-replica-{i}")
            pgs.append(pg)
            await pg.ready()
            actor = WorkerActor.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
            ).remote()
            actors.append(actor)
            replicas.append(Replica(i, [await actor.start.remote(worker_host)], sched, metrics))
        log.info("loading %s on %d replica(s) (%s)", cfg.model_path, cfg.replicas, "GPU" if use_gpu else "CPU")
        await asyncio.gather(*(r.start(load) for r in replicas))
        tokenizer = await asyncio.to_thread(load_tokenizer, cfg.model_path)
    except BaseException:
        for r in replicas:
            await r.close()
        for a in actors:
            ray.kill(a)
        for pg in pgs:
            remove_placement_group(pg)
        raise
    frontend = Frontend(replicas, metrics, max_queued=cfg.max_queued_requests)
    serving = OpenAIServing(frontend, tokenizer, cfg.model_name, replicas[0].vocab_size)
    return Deployment(cfg, frontend, serving, actors, pgs)


async def serve(cfg: ServeConfig, on_ready: Optional[Callable[[Deployment], None]] = None) -> None:
    """Deploy, then serve HTTP until the server is told to exit (signal or should_exit)."""
    dep = await deploy(cfg)
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
        await dep.shutdown()


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
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--ray-address", default=None, help="'auto' or host:port (default: start Ray locally)")
    p.set_defaults(func=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> None:
    fields = ServeConfig.__dataclass_fields__
    cfg = ServeConfig(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        asyncio.run(serve(cfg))
    except WorkerLoadError as e:     # the message says why; a traceback would not help
        raise SystemExit(f"folio serve: {e}") from None
