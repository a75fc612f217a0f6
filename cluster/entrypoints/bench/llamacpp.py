"""`folio bench llamacpp`: folio serve against llama.cpp's llama-server, one machine, one run.

    folio bench llamacpp                          # builds llama-server once, then compares
    folio bench llamacpp --llama-server PATH      # a llama-server already built
    folio bench llamacpp --concurrency 1 16 64 --rounds 3

llama-server is llama.cpp's OpenAI-compatible server, the CPU peer to beat. It is
built from the llama.cpp source that the llama-cpp-python sdist on the package
registry carries (vendor/llama.cpp; cmake, -DLLAMA_CURL=OFF), into --build-dir,
once: 8 to 15 minutes on two cores. Both servers then serve the same GGUF (by
default the bundled SmolLM2 Q4_1) on 127.0.0.1, and chat-like workloads drawn from
--seed (streaming /v1/completions, token-id prompts, every request run to its
max_tokens) go to each at every --concurrency, closed loop, the two alternating
round by round so a machine that slows down costs both alike. Each round sends
prompts of its own, the same to both servers (see compare).
The report is each server's output tokens per second and folio's ratio to
llama-server's, median of the rounds.

Absolute figures move several-fold between CPUs (AVX2, AVX-512, AMX): only the
ratio, measured here in one run, compares.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Callable, Optional

import httpx

from folio.cluster.entrypoints.bench.serve import run_load, summarize
from folio.cluster.entrypoints.bench.workload import SyntheticRequest, chat_like
from folio.cluster.entrypoints.options import add_config_args, build_config
from folio.cluster.entrypoints.serve import ServeConfig, serve_in_background  # needs Ray: no command without it
from folio.cluster.placement import start_local_ray
from folio.protos.config import SchedulerConfig, WorkerConfig

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # its sdist carries llama.cpp's source (vendor/llama.cpp)


def build_llama_server(build_dir: str) -> str:
    """The llama-server binary under build_dir, built from the registry's source if not there yet."""
    binary = os.path.join(build_dir, "llama.cpp", "build", "bin", "llama-server")
    if os.path.isfile(binary):
        return binary
    os.makedirs(build_dir, exist_ok=True)
    source = os.path.join(build_dir, "llama.cpp")
    if not os.path.isdir(source):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                LLAMA_CPP_PYTHON,
                "-d",
                build_dir,
            ],
            check=True,
        )
        [sdist] = glob.glob(os.path.join(build_dir, "llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            root = tar.getnames()[0].split("/")[0]
            members = [m for m in tar.getmembers() if m.name.startswith(f"{root}/vendor/llama.cpp/")]
            tar.extractall(build_dir, members=members, filter="data")
        os.rename(os.path.join(build_dir, root, "vendor", "llama.cpp"), source)
    print(f"building llama-server in {source} (8 to 15 minutes on two cores) ...", flush=True)
    configure = ["cmake", "-B", "build", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DCMAKE_BUILD_TYPE=Release"]
    subprocess.run(configure + _instruction_set_flags(), cwd=source, check=True, stdout=subprocess.DEVNULL)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", "build", "--target", "llama-server", "-j", jobs], cwd=source, check=True)
    return binary


def _instruction_set_flags() -> list[str]:
    """The vector extensions this CPU reports, named to cmake, in place of -march=native.

    Native builds also compile llama.cpp's AMX kernels where CPUID lists AMX, and there
    llama-server dies of SIGILL in its first forward (seen on this project's machines,
    also on one where Linux grants this process the AMX tile state and oneDNN's AMX
    matmuls run: the trap is a `tilezero` in libggml-cpu, before any tile config is
    loaded). So: every AVX level the CPU has, never AMX.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return []  # not Linux: let cmake decide
    wanted = {
        "GGML_AVX512": "avx512f",
        "GGML_AVX512_VBMI": "avx512vbmi",
        "GGML_AVX512_VNNI": "avx512_vnni",
        "GGML_AVX512_BF16": "avx512_bf16",
        "GGML_AVX_VNNI": "avx_vnni",
    }
    return ["-DGGML_NATIVE=OFF"] + [f"-D{option}={'ON' if flag in flags else 'OFF'}" for option, flag in wanted.items()]


@contextlib.contextmanager
def llama_server(binary: str, model: str, slots: int, threads: int, context: int, start_timeout: float = 300):
    """llama-server on a free loopback port, with `slots` sequences batched continuously;
    yields its /v1 base URL once /health answers."""
    from folio.worker.parallel import free_port

    port = free_port("127.0.0.1")
    cmd = [binary, "-m", model, "-np", str(slots), "-t", str(threads), "-c", str(context)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    log = tempfile.NamedTemporaryFile("w+", prefix="llama-server-", suffix=".log")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"llama-server exited ({proc.returncode}): {log.read()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama-server did not answer /health within {start_timeout:.0f} s")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# Short prompts whose continuations are mostly confident: where two servers part on
# them, it is arithmetic, not a coin flip between equally likely words.
GREEDY_PROMPTS = (
    "The capital of France is",
    "Here is a Python function that returns the factorial of n:\n",
    "The three primary colors are",
    "Once upon a time, in a small village by the sea,",
    "Water boils at a temperature of",
    "1, 2, 3, 4, 5,",
)


def greedy_agreement(servers: dict[str, str], tokenizer, max_tokens: int = 48) -> list[dict]:
    """Each of GREEDY_PROMPTS continued greedily (temperature 0, the same token-id prompt)
    by every server, and how many leading tokens of their texts agree (both texts encoded
    with the model's tokenizer). Both servers read the same quantized weights but do not
    compute alike (llama.cpp rounds the activations to 8 bits for its dot products; folio
    multiplies them in bf16 or fp32), so near-ties can go either way, and the texts part
    there."""
    rows = []
    with httpx.Client(timeout=300) as client:
        models = {name: client.get(f"{url}/models").json()["data"][0]["id"] for name, url in servers.items()}
        for prompt in GREEDY_PROMPTS:
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            texts = {}
            for name, url in servers.items():
                body = {"model": models[name], "prompt": ids, "max_tokens": max_tokens, "temperature": 0}
                r = client.post(f"{url}/completions", json=body)
                r.raise_for_status()
                texts[name] = r.json()["choices"][0]["text"]
            encoded = [tokenizer.encode(t, add_special_tokens=False) for t in texts.values()]
            shared = shared_prefix(encoded)
            row = {"prompt": prompt, "texts": texts, "shared_tokens": shared, "tokens": [len(e) for e in encoded]}
            if "folio" in servers and len(set(texts.values())) > 1:
                row["folio_margin"] = _margin(client, servers["folio"], models["folio"], ids + encoded[0][:shared])
            rows.append(row)
    return rows


def shared_prefix(seqs: list[list[int]]) -> int:
    """How many leading items all of seqs have in common."""
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def _margin(client: httpx.Client, url: str, model: str, ids: list[int]) -> Optional[float]:
    """folio's logprob gap between its first and second choice where the texts part: a
    small gap is a near-tie, which other arithmetic may well decide the other way."""
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 2}
    top = client.post(f"{url}/completions", json=body).json()["choices"][0]["logprobs"]["top_logprobs"][0]
    best = sorted(top.values(), reverse=True)
    return round(best[0] - best[1], 3) if len(best) > 1 else None


def print_agreement(rows: list[dict]) -> None:
    for row in rows:
        identical = len(set(row["texts"].values())) == 1
        same = "identical" if identical else f"first {row['shared_tokens']} tokens agree"
        if row.get("folio_margin") is not None:
            same += f"; there folio's top two choices are {row['folio_margin']} nats apart"
        print(f"  {row['prompt']!r}: {same}")
        if not identical:
            for name, text in row["texts"].items():
                print(f"    {name:12s} {text!r}")


def compare(
    servers: dict[str, str],
    workload: Callable[[int], list[SyntheticRequest]],
    concurrencies: list[int],
    rounds: int,
    seed: int,
) -> list[dict]:
    """Each server at each concurrency, rounds alternating; one row per concurrency.

    Every round and every warm-up sends a workload of its own (workload(k), a fresh k
    each), the same to both servers, so that neither answers a prompt it has seen in an
    earlier round: llama-server keeps each slot's last prompt and reuses it, and a round
    repeating the last one's prompts ran 1.5x faster at one stream (10 ms to the first
    token against 140-190 ms), which no real workload of distinct requests would see."""
    rows = []
    keys = itertools.count()
    for c in concurrencies:
        warm_up = workload(next(keys))[: max(2, c)]  # short, unrecorded
        for url in servers.values():
            asyncio.run(run_load(url, None, warm_up, float("inf"), c, seed))
        figures: dict[str, list[float]] = {name: [] for name in servers}
        for i in range(rounds):
            reqs = workload(next(keys))
            order = list(servers.items()) if i % 2 == 0 else list(servers.items())[::-1]
            for name, url in order:
                records, seconds = asyncio.run(run_load(url, None, reqs, float("inf"), c, seed))
                s = summarize(records, seconds)
                if s["failed"] or s["output_tokens"] != sum(r.output_len for r in reqs):
                    raise RuntimeError(
                        f"{name} at concurrency {c}: {s['failed']} failed, {s['output_tokens']} of "
                        f"{sum(r.output_len for r in reqs)} tokens; errors {s['errors']}"
                    )
                figures[name].append(s["output_tokens_per_s"])
                print(
                    f"  concurrency {c:3d}, round {i + 1}, {name:12s} {s['output_tokens_per_s']:8.1f} tok/s", flush=True
                )
        row = {"concurrency": c, **{f"{n}_tok_s": statistics.median(v) for n, v in figures.items()}}
        row["rounds"] = figures
        rows.append(row)
    return rows


HELP = "folio serve against llama.cpp's llama-server on the same GGUF and workload"


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a GGUF both serve (default: the bundled SmolLM2 Q4_1)")
    p.add_argument("--llama-server", default=None, help="a built llama-server binary (default: build one)")
    p.add_argument("--build-dir", default=os.path.expanduser("~/.cache/folio/llama.cpp"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="requests in flight (each)")
    p.add_argument("--rounds", type=int, default=1, help="rounds per server at each concurrency (median)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-median", type=int, default=64)
    p.add_argument("--output-median", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama-server's threads")
    p.add_argument("--json", default=None, help="also write the results here")
    # How folio holds the weights and its KV pool (its defaults, as `folio serve` has them).
    add_config_args(p, WorkerConfig, names=("dtype", "quantization", "kv_cache_dtype", "compile", "speculative_model"))
    add_config_args(p, SchedulerConfig, names=("num_speculative_tokens", "speculative_max_batch"))


def main(args: argparse.Namespace) -> dict:
    import ray

    from folio.worker.loader import default_model_path, load_tokenizer

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    model = args.model or default_model_path()
    if not model.endswith(".gguf"):
        raise SystemExit("folio bench llamacpp: --model must be a .gguf file (llama-server reads GGUF only)")
    binary = args.llama_server or build_llama_server(args.build_dir)
    tokenizer = load_tokenizer(model)
    # One workload per round and per warm-up (see compare), drawn here to size the slots.
    workloads = [
        chat_like(args.num_requests, len(tokenizer), args.seed + k, args.prompt_median, args.output_median)
        for k in range(len(args.concurrency) * (args.rounds + 1))
    ]
    longest = max(len(r.prompt_token_ids) + r.output_len for w in workloads for r in w)
    slots = max(args.concurrency)
    prompt = statistics.mean(sum(len(r.prompt_token_ids) for r in w) for w in workloads)
    output = statistics.mean(sum(r.output_len for r in w) for w in workloads)
    print(
        f"workload: {args.num_requests} requests a round, each round its own (prompt tokens {prompt:.0f}, "
        f"output tokens {output:.0f} a round on average; longest request {longest} tokens); "
        f"llama-server: {slots} slots, {args.threads} threads"
    )
    if not ray.is_initialized():
        start_local_ray()
    # llama-server splits its context evenly among its slots: each must hold the longest request.
    with llama_server(binary, model, slots, args.threads, slots * (longest + 16)) as peer_url:
        cfg = build_config(
            ServeConfig,
            model=model,
            port=0,
            max_num_seqs=max(slots, 1),
            dtype=args.dtype,
            quantization=args.quantization,
            kv_cache_dtype=args.kv_cache_dtype,
            compile=args.compile,
            speculative_model=args.speculative_model,
            num_speculative_tokens=args.num_speculative_tokens,
            speculative_max_batch=args.speculative_max_batch,
        )
        with serve_in_background(cfg) as folio:
            servers = {"folio": folio.base_url + "/v1", "llama_server": peer_url}
            print(f"greedy continuations of {len(GREEDY_PROMPTS)} prompts, folio against llama-server:")
            agreement = greedy_agreement(servers, tokenizer)
            print_agreement(agreement)
            rows = compare(
                servers,
                workloads.__getitem__,
                args.concurrency,
                args.rounds,
                args.seed,
            )
    print(f"{'concurrency':>11s} {'folio tok/s':>12s} {'llama-server':>13s} {'folio / llama-server':>21s}")
    for row in rows:
        row["ratio"] = row["folio_tok_s"] / row["llama_server_tok_s"]
        c, ours, theirs = row["concurrency"], row["folio_tok_s"], row["llama_server_tok_s"]
        print(f"{c:11d} {ours:12.1f} {theirs:13.1f} {row['ratio']:20.2f}x")
    result = {"model": model, "dtype": args.dtype, "quantization": args.quantization, "llama_server": binary}
    result["kv_cache_dtype"], result["compile"] = args.kv_cache_dtype, args.compile
    result["speculative_model"], result["num_speculative_tokens"] = args.speculative_model, args.num_speculative_tokens
    result["rows"], result["greedy_agreement"] = rows, agreement
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
