"""`folio bench replicas`: what a second replica and prefix-affinity routing buy.

    folio bench replicas --num-requests 32 --concurrency 8

One run starts four deployments in turn on the local Ray (each `folio serve`
in-process on a free port, loaded over real HTTP with cluster/entrypoints/bench/serve.py's
client) and prints:

1. throughput: the chat-like workload at a fixed concurrency on one replica
   and on two, run in the order 1, 2, 2, 1 so that a drift in the machine's
   background load hits both alike; the ratio of mean output tokens per second.
   Every worker gets --cpus-per-worker cores (default 1) in both cases, so a
   CPU replica stands for one device and the figure says what adding a
   device's worth of replica buys;
2. prefix hit rate: a shared-prefix workload (a few long "system prompts",
   each request one of them plus a short unique tail) on two replicas routed
   by affinity, then round robin. The KV pool per replica is sized to hold
   about half of the prefixes, so where requests go decides what stays cached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random

from folio.cluster.entrypoints.bench.serve import run_load, summarize
from folio.cluster.entrypoints.bench.workload import SyntheticRequest, chat_like
from folio.cluster.entrypoints.options import build_config
from folio.cluster.entrypoints.serve import ServeConfig, serve_in_background
from folio.cluster.placement import start_local_ray
from folio.protos.config import SchedulerConfig


def shared_prefix(
    num_requests: int, vocab_size: int, num_prefixes: int, prefix_len: int, tail_len: int, output_len: int, seed: int
) -> list[SyntheticRequest]:
    """Each request: one of num_prefixes random prefixes (chosen at random) + a unique tail."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(100, vocab_size - 1) for _ in range(prefix_len)] for _ in range(num_prefixes)]
    return [
        SyntheticRequest(
            rng.choice(prefixes) + [rng.randrange(100, vocab_size - 1) for _ in range(tail_len)], output_len
        )
        for _ in range(num_requests)
    ]


def _deploy_and_load(cfg: ServeConfig, reqs: list[SyntheticRequest], concurrency: int) -> dict:
    """Serve cfg on a free port, run the load, read the head's counters, stop."""
    with serve_in_background(cfg) as server:
        records, seconds = asyncio.run(run_load(server.base_url + "/v1", None, reqs, float("inf"), concurrency, seed=0))
        stats = server.call(_head_stats(server.deployment))
    s = summarize(records, seconds)
    return {
        "output_tokens_per_s": s["output_tokens_per_s"],
        "failed": s["failed"],
        "seconds": seconds,
        "ttft_p50_s": s["ttft_s"].get("p50"),
        **stats,
    }


async def _head_stats(dep) -> dict:
    """Prefix hits over all replicas, and the routing decisions (as /metrics shows them)."""
    stats = [r.stats() for r in dep.frontend.replicas]
    hit = sum(s.prefix_hit_tokens for s in stats)
    query = sum(s.prefix_query_tokens for s in stats)
    decisions = getattr(dep.frontend.policy, "decisions", {})
    return {
        "prefix_hit_rate": hit / query if query else 0.0,
        "per_replica_hit_rate": [round(s.prefix_hit_rate, 3) for s in stats],
        "routing": {f"replica={i},reason={why}": n for (i, why), n in sorted(decisions.items())},
    }


HELP = "two replicas vs one; affinity vs round-robin prefix hits"


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model dir or .gguf (default: bundled SmolLM2)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--prompt-median", type=int, default=64)
    p.add_argument("--output-median", type=int, default=32)
    p.add_argument("--num-prefixes", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=192)
    p.add_argument("--tail-len", type=int, default=16)
    p.add_argument("--prefix-output-len", type=int, default=8)
    p.add_argument(
        "--num-kv-blocks",
        type=int,
        default=0,
        help="KV pool per replica for the prefix runs (default: about half the prefixes plus the running requests)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=int,
        default=1,
        help="cores (torch threads) per worker, the same for one and two replicas",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")


def main(args: argparse.Namespace) -> dict:
    import ray

    from folio.worker.loader import default_model_path, load_tokenizer

    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not ray.is_initialized():
        # Here, on the main thread, so the four deployments share one Ray that outlives each.
        start_local_ray()
    model = args.model or default_model_path()
    vocab = len(load_tokenizer(model))
    base = dict(model=model, port=0, max_num_seqs=args.concurrency, cpus_per_worker=args.cpus_per_worker)
    result: dict = {}

    chat = chat_like(args.num_requests, vocab, args.seed, args.prompt_median, args.output_median)
    runs: dict[int, list[float]] = {1: [], 2: []}
    for n in (1, 2, 2, 1):
        r = _deploy_and_load(build_config(ServeConfig, **base, replicas=n), chat, args.concurrency)
        runs[n].append(r["output_tokens_per_s"])
        print(
            f"chat-like, {n} replica(s), concurrency {args.concurrency}: {r['output_tokens_per_s']:.1f} "
            f"output tok/s, {r['failed']} failed (load average {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    for n, tps in runs.items():
        result[f"replicas_{n}_output_tokens_per_s"] = sum(tps) / len(tps)
    result["throughput_ratio"] = result["replicas_2_output_tokens_per_s"] / result["replicas_1_output_tokens_per_s"]
    print(f"two replicas / one: {result['throughput_ratio']:.2f}x")

    block = SchedulerConfig.block_size
    prefix_blocks = -(-args.prefix_len // block)
    running_blocks = args.concurrency * (-(-(args.prefix_len + args.tail_len + args.prefix_output_len) // block))
    kv_blocks = args.num_kv_blocks or running_blocks // 2 + prefix_blocks * args.num_prefixes // 2
    reqs = shared_prefix(
        args.num_requests, vocab, args.num_prefixes, args.prefix_len, args.tail_len, args.prefix_output_len, args.seed
    )
    for routing in ("affinity", "round-robin"):
        cfg = build_config(ServeConfig, **base, replicas=2, routing=routing, num_kv_blocks=kv_blocks)
        r = _deploy_and_load(cfg, reqs, args.concurrency)
        result[f"prefix_{routing}"] = r
        print(
            f"shared prefix ({args.num_prefixes} x {args.prefix_len} tokens, {kv_blocks} KV blocks "
            f"per replica), 2 replicas, {routing}: prefix hit rate {r['prefix_hit_rate']:.2f} "
            f"(per replica {r['per_replica_hit_rate']}), {r['output_tokens_per_s']:.1f} output tok/s, "
            f"TTFT p50 {r['ttft_p50_s'] * 1000:.0f} ms; routing {r['routing']} "
            f"(load average {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"}, **result}, f, indent=2)
    return result
