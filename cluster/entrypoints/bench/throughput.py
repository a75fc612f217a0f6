"""`folio bench throughput`: folio's engine against naive transformers generate().

Both sides run the same fixed-seed chat-like workload on the same model, each
in its own process (so each peak RSS is its own), greedy, with every request
producing exactly its target number of tokens. The baseline is the naive way:
static batches in arrival order, left-padded, each batch running until its
longest member is done. Throughput counts only requested tokens on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

from folio.cluster.entrypoints.bench.workload import SyntheticRequest, chat_like
from folio.cluster.entrypoints.options import add_config_args, options_from_args
from folio.protos.config import EngineConfig, default_device, default_dtype


@dataclass(frozen=True)
class Placement:
    device: str  # cpu | cuda
    dtype: str  # a torch dtype name

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def _peak_memory(device: str) -> dict:
    """Peak host RSS, and on a GPU the peak of memory allocated by torch."""
    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        import torch

        peak["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def run_folio(options: dict, reqs: list[SyntheticRequest], where: Placement) -> dict:
    from folio.cluster.entrypoints.llm import LLM
    from folio.protos.messages import SamplingParams

    llm = LLM(**options, tokenizer=False)
    llm.generate([reqs[0].prompt_token_ids[:8]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    params = [SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True) for r in reqs]
    t0 = time.perf_counter()
    results = llm.generate([r.prompt_token_ids for r in reqs], params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(res.outputs[0].token_ids) for res in results)
    assert tokens == sum(r.output_len for r in reqs), "folio produced the wrong number of tokens"
    model = llm.worker.model
    return {
        "name": f"folio ({llm.worker.model_config.quantization or 'dense'} weights)",
        "output_tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        **_peak_memory(where.device),
        "weights_mib": _tensor_bytes(list(model.parameters()) + list(model.buffers())) / 2**20,
        "preemptions": llm.scheduler.num_preemptions,
    }


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def run_hf(model: str | None, reqs: list[SyntheticRequest], where: Placement, batch_size: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from folio.worker.loader import default_model_path, resolve_model_path

    directory, gguf = resolve_model_path(model or default_model_path())
    kw = {"gguf_file": gguf} if gguf else {}
    m = AutoModelForCausalLM.from_pretrained(directory, dtype=where.torch_dtype, **kw).to(where.device).eval()
    pad = m.config.eos_token_id if isinstance(m.config.eos_token_id, int) else 0

    def batch_generate(batch: list[SyntheticRequest]) -> None:
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding, as decoder-only generation needs
            ids[i, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
            mask[i, width - len(r.prompt_token_ids) :] = 1
        longest = max(r.output_len for r in batch)
        with torch.inference_mode():
            m.generate(
                input_ids=ids.to(where.device),
                attention_mask=mask.to(where.device),
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=False,
                pad_token_id=pad,
            )
        if where.device == "cuda":
            torch.cuda.synchronize()

    batch_generate(reqs[:1])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch_size):
        batch_generate(reqs[i : i + batch_size])
    elapsed = time.perf_counter() - t0
    tokens = sum(r.output_len for r in reqs)
    return {
        "name": f"transformers generate (static batches of {batch_size})",
        "output_tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        **_peak_memory(where.device),
    }


def _device_name(where: Placement) -> str:
    if where.device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name()} {where.dtype}"
    return f"cpu {where.dtype}"


def _in_subprocess(fn, *args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


HELP = "offline throughput: folio vs naive transformers generate()"


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-median", type=int, default=96)
    p.add_argument("--output-median", type=int, default=64)
    p.add_argument("--baseline-batch-size", type=int, default=16)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    # folio's engine settings, as `folio generate` takes them; --model, --device and --dtype
    # apply to the baseline too.
    add_config_args(p, EngineConfig)


def main(args: argparse.Namespace) -> dict:
    import torch

    from folio.worker.loader import default_model_path, load_model_config

    options = options_from_args(EngineConfig, args)
    device = options["device"] if options["device"] != "auto" else default_device(torch.cuda.is_available())
    where = Placement(device, options["dtype"] or default_dtype(device))
    options.update(device=where.device, dtype=where.dtype)
    cfg = load_model_config(args.model or default_model_path())
    reqs = chat_like(args.num_requests, cfg.vocab_size, args.seed, args.prompt_median, args.output_median)
    print(
        f"workload: {len(reqs)} requests, seed {args.seed}, "
        f"prompt tokens {sum(len(r.prompt_token_ids) for r in reqs)}, "
        f"output tokens {sum(r.output_len for r in reqs)}"
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, {_device_name(where)}")
    mem = "peak GPU MiB" if where.device == "cuda" else "peak RSS MiB"
    print(f"{'engine':52s} {'out tok/s':>10s} {'seconds':>9s} {mem:>13s} {'weights MiB':>12s}")
    sides = [(run_folio, options, reqs, where)]
    if not args.skip_baseline:
        sides.append((run_hf, args.model, reqs, where, args.baseline_batch_size))
    rows = []
    for fn, *fn_args in sides:
        r = _in_subprocess(fn, *fn_args)
        peak = r["peak_gpu_mib"] if where.device == "cuda" else r["peak_rss_mib"]
        weights = f"{r['weights_mib']:12.0f}" if "weights_mib" in r else f"{'':12s}"
        print(f"{r['name']:52s} {r['tokens_per_s']:10.1f} {r['seconds']:9.1f} {peak:13.0f} {weights}", flush=True)
        rows.append(r)
    result = {"rows": rows, "device": _device_name(where), "dtype": where.dtype}
    if len(rows) == 2:
        result["ratio"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
        print(f"folio / baseline throughput: {result['ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
