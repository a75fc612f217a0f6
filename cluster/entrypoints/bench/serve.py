"""`folio bench serve`: open-loop load against an OpenAI-compatible server.

    folio serve &                                      # or any other server
    folio bench serve --request-rate 8 --num-requests 200
    folio bench serve --concurrency 32                 # closed loop: 32 in flight

Requests arrive as a Poisson process at --request-rate (inf: all at once),
optionally capped at --concurrency in flight. Each is a streaming
/v1/completions call with a token-id prompt and ignore_eos, so every server
sees exactly the same work (the chat-like mix of cluster/entrypoints/bench/workload.py). The
report gives throughput and TTFT, ITL, TPOT and end-to-end percentiles; then,
unless --skip-engine, the same workload runs through folio's engine in-process
(no HTTP, no gRPC, all requests at once) and the ratio of the two throughputs
shows what serving costs. Run the engine on the server's machine for a fair
ratio; with a finite request rate the served side is bound by the arrivals.

    folio bench serve --base-url URL --baseline-url URL2 --rounds 3 --skip-engine

compares two servers on the same workload instead (say, one build against the
commit before it): after a short unrecorded warm-up of each, rounds alternate
between them (A B, then B A, ...), so a machine that slows down during the run
costs both alike, and the report gives each round and the ratio of the median
throughputs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx

from folio.cluster.entrypoints.bench.workload import SyntheticRequest, chat_like
from folio.cluster.entrypoints.options import add_config_args, options_from_args
from folio.protos.config import EngineConfig


@dataclass
class RequestRecord:
    prompt_tokens: int
    output_tokens: int = 0
    ttft: Optional[float] = None
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)  # gaps between streamed chunks
    error: Optional[str] = None


async def _one(client: httpx.AsyncClient, model: str, req: SyntheticRequest) -> RequestRecord:
    rec = await _attempt(client, model, req)
    if rec.error and rec.error.startswith("RemoteProtocolError") and rec.ttft is None:
        # A server may close a kept-alive connection as the next request goes out on it
        # (llama-server does every few requests): nothing was served, so send it again.
        rec = await _attempt(client, model, req)
    return rec


async def _attempt(client: httpx.AsyncClient, model: str, req: SyntheticRequest) -> RequestRecord:
    rec = RequestRecord(prompt_tokens=len(req.prompt_token_ids))
    body = {
        "model": model,
        "prompt": req.prompt_token_ids,
        "max_tokens": req.output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/completions", json=body) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec.error = chunk["error"].get("message", "error in stream")
                    return rec
                if chunk.get("usage"):
                    rec.output_tokens = chunk["usage"]["completion_tokens"]
                if not any(c.get("text") for c in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                if rec.ttft is None:
                    rec.ttft = now - start
                else:
                    rec.itls.append(now - last)
                last = now
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {e}"
    rec.latency = time.perf_counter() - start
    return rec


async def run_load(
    base_url: str,
    model: Optional[str],
    reqs: list[SyntheticRequest],
    request_rate: float,
    concurrency: Optional[int],
    seed: int,
    api_key: Optional[str] = None,
) -> tuple[list[RequestRecord], float]:
    """Send every request on schedule; return their records and the wall time."""
    limits = httpx.Limits(max_connections=concurrency or len(reqs), max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(
        base_url=base_url, timeout=httpx.Timeout(None, connect=30), limits=limits, headers=headers
    ) as client:
        if model is None:
            model = (await client.get("/models")).json()["data"][0]["id"]
        gate = asyncio.Semaphore(concurrency or len(reqs))
        rng = random.Random(seed)

        async def gated(req: SyntheticRequest) -> RequestRecord:
            async with gate:
                return await _one(client, model, req)

        start = time.perf_counter()
        tasks = []
        for req in reqs:
            tasks.append(asyncio.create_task(gated(req)))
            if math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
        records = await asyncio.gather(*tasks)
        return records, time.perf_counter() - start


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {"mean": sum(v) / len(v), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def summarize(records: list[RequestRecord], seconds: float) -> dict:
    ok = [r for r in records if r.error is None]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "seconds": seconds,
        "requests_per_s": len(ok) / seconds,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / seconds,
        "total_tokens_per_s": (out_tokens + sum(r.prompt_tokens for r in ok)) / seconds,
        "ttft_s": _percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": _percentiles([x for r in ok for x in r.itls]),
        "tpot_s": _percentiles(
            [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
        ),
        "e2e_s": _percentiles([r.latency for r in ok]),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


def _print(s: dict) -> None:
    print(f"requests: {s['requests'] - s['failed']} ok, {s['failed']} failed, in {s['seconds']:.1f} s")
    print(
        f"throughput: {s['requests_per_s']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tok/s, "
        f"{s['total_tokens_per_s']:.1f} total tok/s"
    )
    print(f"{'ms':8s} {'mean':>9s} {'p50':>9s} {'p90':>9s} {'p99':>9s}")
    for key in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
        p = s[key]
        if p:
            print(f"{key[:-2].upper():8s} " + " ".join(f"{p[q] * 1000:9.1f}" for q in ("mean", "p50", "p90", "p99")))
    for e in s["errors"]:
        print(f"error: {e}")


HELP = "load an OpenAI-compatible server; compare with the in-process engine"


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--served-model", default=None, help="model name to send (default: the server's first)")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second")
    p.add_argument("--concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-median", type=int, default=96)
    p.add_argument("--output-median", type=int, default=64)
    p.add_argument("--skip-engine", action="store_true", help="skip the in-process comparison")
    p.add_argument(
        "--api-key",
        default=os.environ.get("FOLIO_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default: $FOLIO_API_KEY)",
    )
    p.add_argument(
        "--baseline-url", default=None, help="another server to compare with on the same workload, rounds alternating"
    )
    p.add_argument("--baseline-api-key", default=None, help="its key (default: --api-key)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per server with --baseline-url")
    p.add_argument("--json", default=None, help="also write the results here")
    # The model on disk (the workload's vocabulary) and the in-process engine's limits: match the server's.
    add_config_args(p, EngineConfig, names=("model", "dtype", "quantization", "max_num_seqs", "max_num_batched_tokens"))


def _compare(args: argparse.Namespace, reqs: list[SyntheticRequest]) -> dict:
    """The workload against --base-url and --baseline-url, alternating for --rounds each."""
    servers = [
        ("served", args.base_url, args.api_key),
        ("baseline", args.baseline_url, args.baseline_api_key or args.api_key),
    ]
    rounds: dict[str, list[dict]] = {"served": [], "baseline": []}
    for _, url, key in servers:  # a fresh server's first requests warm it up: not counted
        asyncio.run(run_load(url, args.served_model, reqs[:16], math.inf, args.concurrency, args.seed, key))
    for i in range(args.rounds):
        for name, url, key in servers if i % 2 == 0 else servers[::-1]:
            records, seconds = asyncio.run(
                run_load(url, args.served_model, reqs, args.request_rate, args.concurrency, args.seed, key)
            )
            s = summarize(records, seconds)
            rounds[name].append(s)
            print(
                f"--- round {i + 1}, {name} ({url}): {s['output_tokens_per_s']:.1f} output tok/s, {s['failed']} failed"
            )
    result = {}
    for name, _, _ in servers:
        best = sorted(rounds[name], key=lambda s: s["output_tokens_per_s"])[len(rounds[name]) // 2]
        result[name] = best
        print(f"--- {name}, median round:")
        _print(best)
    served, base = (statistics.median(s["output_tokens_per_s"] for s in rounds[n]) for n in rounds)
    result["rounds"] = rounds
    result["vs_baseline"] = served / base
    print(f"served / baseline output throughput (medians of {args.rounds} rounds): {result['vs_baseline']:.3f}")
    return result


def main(args: argparse.Namespace) -> dict:
    from folio.cluster.entrypoints.bench.throughput import Placement, _in_subprocess, run_folio
    from folio.worker.loader import default_model_path, load_tokenizer

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    model_path = args.model or default_model_path()
    vocab = len(load_tokenizer(model_path))
    reqs = chat_like(args.num_requests, vocab, args.seed, args.prompt_median, args.output_median)
    print(
        f"workload: {len(reqs)} requests, seed {args.seed}, prompt tokens "
        f"{sum(len(r.prompt_token_ids) for r in reqs)}, output tokens {sum(r.output_len for r in reqs)}; "
        f"rate {args.request_rate} req/s, concurrency {args.concurrency or 'unbounded'}"
    )
    if args.baseline_url:
        result = _compare(args, reqs)
    else:
        records, seconds = asyncio.run(
            run_load(
                args.base_url, args.served_model, reqs, args.request_rate, args.concurrency, args.seed, args.api_key
            )
        )
        result = {"served": summarize(records, seconds)}
        print(f"--- {args.base_url}")
        _print(result["served"])
    if not args.skip_engine:
        # The in-process engine on this machine's CPU, as the CPU server runs it.
        where = Placement("cpu", args.dtype or "float32")
        options = {**options_from_args(EngineConfig, args), "device": where.device, "dtype": where.dtype}
        engine = _in_subprocess(run_folio, options, reqs, where)
        result["engine"] = engine
        result["ratio"] = result["served"]["output_tokens_per_s"] / engine["tokens_per_s"]
        print(f"--- folio engine in-process: {engine['tokens_per_s']:.1f} output tok/s in {engine['seconds']:.1f} s")
        print(f"served / in-process throughput: {result['ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            settings = {
                k: str(v) if isinstance(v, float) and math.isinf(v) else v for k, v in vars(args).items() if k != "func"
            }
            json.dump({"args": settings, **result}, f, indent=2)
    return result
