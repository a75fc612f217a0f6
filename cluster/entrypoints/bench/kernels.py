"""The body of `folio bench kernels`: paged attention against contiguous SDPA,
and the quantized matmul against dequantize + F.linear. Without a GPU it runs
the CPU sections instead: decode attention (cpu_attention.py) and the int4
matmul's two paths (cpu_quant.py).

Decode: batch 1..256 x context 512..32k on a Llama-3-8B attention layer
(32 query heads, 8 KV heads, head dim 128, bf16, KV blocks of 16 in shuffled
order). Reported: time, achieved bandwidth (K and V bytes read / time) and
its fraction of the GPU's peak, and torch scaled_dot_product_attention on the
same K/V laid out contiguously. Prefill: TFLOP/s of causal attention over
fresh prompts against SDPA(is_causal), and one chunked-prefill step after a
long cached prefix (no SDPA equivalent). Quantized matmul: the Triton kernel
(kernels/quant_matmul.py) on 4- and 8-bit weights with groups of 128, on the
MLP projection shapes of a Llama-3-8B layer, for a decode step, a small batch and
a prefill chunk, against the reference path (dequantize the weight, then
F.linear) and against a dense F.linear of the same shape; reported with the
weight bytes read per second (the bound at decode) and TFLOP/s. Fused MoE
(moe_kernels.py): kernels/fused_moe.py against the per-expert loop on Mixtral
and Qwen3-MoE layers. A sweep of decode, prefill and quantized-matmul launch
configs closes the run (kernel_sweep.py), for tuning the heuristics on the GPU
at hand.

Times are device times of CUDA-graph replays (triton.testing.do_bench_cudagraph):
the kernels' own cost, launch overhead excluded (the MoE section times both, its
docstring says why). The model runner still launches each op from Python.

    folio bench kernels [--out DIR] [--peak-tbps 3.35] [--sections decode prefill quant moe sweep]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from folio.cluster.entrypoints.bench.gpu_layer import (
    BLOCK,
    DTYPE,
    HEAD_DIM,
    HKV,
    HQ,
    QUANT_SHAPES,
    paged_pool,
    random_quantized_weight,
    step_metadata,
    stored_bytes,
    time_ms,
)
from folio.cluster.entrypoints.bench.kernel_sweep import format_sweep, sweep_rows
from folio.cluster.entrypoints.bench.moe_kernels import format_moe, moe_rows
from folio.kernels.paged_decode import decode_config, num_splits_for, paged_decode_attention
from folio.kernels.paged_prefill import paged_prefill_attention
from folio.kernels.quant import dequantized_linear
from folio.kernels.quant_matmul import quantized_linear

PEAK_TBPS = (("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35))  # first match in the device name wins
DECODE_BATCHES = (1, 4, 16, 64, 256)
DECODE_CONTEXTS = (512, 2048, 8192, 32768)
MAX_DECODE_TOKENS = 1 << 21  # batch x context cap: pool + contiguous copy stay under ~25 GB
PREFILL_CASES = ((1, 2048), (1, 8192), (4, 4096), (1, 16384))  # (batch, prompt length)
CHUNK_CASE = (2048, 14336)  # (chunk length, cached prefix)
QUANT_TOKENS = (1, 16, 2048)
QUANT_BITS = (4, 8)
SECTIONS = ("decode", "prefill", "quant", "moe", "sweep")


def peak_bandwidth_tbps(device_name: str, override: Optional[float] = None) -> Optional[float]:
    """Peak HBM bandwidth in TB/s: the override, $FOLIO_PEAK_TBPS, or by device name."""
    if override:
        return override
    if os.environ.get("FOLIO_PEAK_TBPS"):
        return float(os.environ["FOLIO_PEAK_TBPS"])
    return next((tbps for key, tbps in PEAK_TBPS if key in device_name), None)


def _sdpa(q, k, v, causal: bool) -> tuple[Callable[[], object], str]:
    """SDPA on [B, H, L, D] tensors with native GQA; falls back to K/V
    expanded to every query head (reads more bytes) if no fused kernel takes it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]

    def native():
        with sdpa_kernel(fused):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    try:
        native()
        return native, "gqa"
    except RuntimeError:
        group = q.shape[1] // k.shape[1]
        ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return (lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=causal)), "expanded"


def _contiguous(cache: torch.Tensor, tables: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, HKV, seq_len, D]: the same K or V rows, laid out for SDPA."""
    rows = cache[tables.long()].flatten(1, 2)[:, :seq_len]  # [B, S, HKV, D]
    return rows.transpose(1, 2).contiguous()


def _time_against_sdpa(attend: Callable, batch: int, n_new: int, seq_len: int, device) -> tuple[float, float, str]:
    """(ms, SDPA ms, SDPA layout) for batch sequences each adding n_new tokens
    to reach seq_len: `attend` (a paged attention function) on the paged pool,
    then SDPA on the same K/V laid out contiguously. n_new is 1 (decode) or
    seq_len (fresh prompts, causal)."""
    k_cache, v_cache, tables = paged_pool(batch, seq_len, device)
    meta = step_metadata([n_new] * batch, [seq_len - n_new] * batch, tables)
    q = torch.randn(batch * n_new, HQ, HEAD_DIM, device=device, dtype=DTYPE)
    ms = time_ms(lambda: attend(q, k_cache, v_cache, meta, HEAD_DIM**-0.5))
    k, v = _contiguous(k_cache, tables, seq_len), _contiguous(v_cache, tables, seq_len)
    k_cache = v_cache = None  # free the pool: only one layout needs to fit at a time
    sdpa, layout = _sdpa(q.view(batch, n_new, HQ, HEAD_DIM).transpose(1, 2), k, v, causal=n_new > 1)
    return ms, time_ms(sdpa), layout


def _decode_rows(device, peak: Optional[float], sms: int) -> list[dict]:
    rows = []
    block_n = decode_config(HEAD_DIM, DTYPE).block_n
    for ctx in DECODE_CONTEXTS:
        for batch in DECODE_BATCHES:
            if batch * ctx > MAX_DECODE_TOKENS:
                continue
            ms, sdpa_ms, layout = _time_against_sdpa(paged_decode_attention, batch, 1, ctx, device)
            kv_bytes = 2 * batch * ctx * HKV * HEAD_DIM * DTYPE.itemsize
            gbps = kv_bytes / ms / 1e6
            rows.append(
                dict(
                    kind="decode",
                    batch=batch,
                    context=ctx,
                    ms=ms,
                    gbps=gbps,
                    peak_frac=gbps / (peak * 1e3) if peak else None,
                    splits=num_splits_for(batch, HKV, ctx, block_n, sms),
                    sdpa_ms=sdpa_ms,
                    sdpa_gbps=kv_bytes / sdpa_ms / 1e6,
                    sdpa_layout=layout,
                    time_vs_sdpa=ms / sdpa_ms,
                )
            )
            print(_format(rows[-1]), flush=True)
    return rows


def _prefill_rows(device) -> list[dict]:
    rows = []
    for batch, n in PREFILL_CASES:
        ms, sdpa_ms, layout = _time_against_sdpa(paged_prefill_attention, batch, n, n, device)
        flops = 4 * batch * HQ * HEAD_DIM * n * (n + 1) / 2
        rows.append(
            dict(
                kind="prefill",
                batch=batch,
                context=n,
                ms=ms,
                tflops=flops / ms / 1e9,
                sdpa_ms=sdpa_ms,
                sdpa_tflops=flops / sdpa_ms / 1e9,
                sdpa_layout=layout,
                time_vs_sdpa=ms / sdpa_ms,
            )
        )
        print(_format(rows[-1]), flush=True)
    chunk, prefix = CHUNK_CASE
    k_cache, v_cache, tables = paged_pool(1, prefix + chunk, device)
    meta = step_metadata([chunk], [prefix], tables)
    q = torch.randn(chunk, HQ, HEAD_DIM, device=device, dtype=DTYPE)
    ms = time_ms(lambda: paged_prefill_attention(q, k_cache, v_cache, meta, HEAD_DIM**-0.5))
    flops = 4 * HQ * HEAD_DIM * chunk * (prefix + (chunk + 1) / 2)
    rows.append(dict(kind="chunked-prefill", batch=1, context=prefix + chunk, ms=ms, tflops=flops / ms / 1e9))
    print(_format(rows[-1]), flush=True)
    return rows


def _quant_rows(device, peak: Optional[float]) -> list[dict]:
    rows = []
    for n, k in QUANT_SHAPES:
        dense = torch.randn(n, k, device=device, dtype=DTYPE)
        xs = {t: torch.randn(t, k, device=device, dtype=DTYPE) for t in QUANT_TOKENS}
        dense_ms = {t: time_ms(functools.partial(F.linear, xs[t], dense)) for t in QUANT_TOKENS}
        dense = None
        for bits in QUANT_BITS:
            w = random_quantized_weight(n, k, bits, device)
            weight_bytes = stored_bytes(w)
            for t in QUANT_TOKENS:
                ms = time_ms(functools.partial(quantized_linear, xs[t], w))
                gbps = weight_bytes / ms / 1e6
                deq_ms = time_ms(functools.partial(dequantized_linear, xs[t], w))
                rows.append(
                    dict(
                        kind=f"quant-w{bits}",
                        tokens=t,
                        shape=f"{n}x{k}",
                        ms=ms,
                        gbps=gbps,
                        peak_frac=gbps / (peak * 1e3) if peak else None,
                        tflops=2 * t * n * k / ms / 1e9,
                        dequant_ms=deq_ms,
                        time_vs_dequant=ms / deq_ms,
                        dense_ms=dense_ms[t],
                        time_vs_dense=ms / dense_ms[t],
                    )
                )
                print(_format(rows[-1]), flush=True)
            w = None
    return rows


def _format_quant(r: dict) -> str:
    head = f"{r['kind']:<15} tokens {r['tokens']:>4} {r['shape']:>10}  {r['ms'] * 1e3:9.1f} us"
    head += f"  {r['gbps']:7.0f} GB/s"
    head += f" ({r['peak_frac']:5.1%} of peak)" if r.get("peak_frac") is not None else ""
    head += f"  {r['tflops']:6.1f} TFLOP/s"
    head += f" | dequant+linear {r['dequant_ms'] * 1e3:9.1f} us  ours/that {r['time_vs_dequant']:5.2f}"
    return head + f" | dense {r['dense_ms'] * 1e3:9.1f} us  ours/dense {r['time_vs_dense']:5.2f}"


def _format(r: dict) -> str:
    if r["kind"].startswith("quant"):
        return _format_quant(r)
    if r["kind"] == "fused-moe":
        return format_moe(r)
    if r["kind"].startswith("sweep"):
        return format_sweep(r)
    head = f"{r['kind']:<15} batch {r['batch']:>3} ctx {r['context']:>6}  {r['ms'] * 1e3:9.1f} us"
    if "gbps" in r:
        head += f"  {r['gbps']:7.0f} GB/s"
        head += f" ({r['peak_frac']:5.1%} of peak)" if r.get("peak_frac") is not None else ""
    if "tflops" in r:
        head += f"  {r['tflops']:6.1f} TFLOP/s"
    if "sdpa_ms" in r:
        head += f" | sdpa[{r['sdpa_layout']}] {r['sdpa_ms'] * 1e3:9.1f} us  ours/sdpa {r['time_vs_sdpa']:5.2f}"
    if "config" in r:
        head += f" | {r['config']}"
    if "splits" in r:
        head += f" | splits {r['splits']}"
    return head


def run_kernel_bench(
    out_dir: Optional[str] = None, peak_tbps: Optional[float] = None, sections: tuple[str, ...] = SECTIONS
) -> list[dict]:
    """Run the sections on the current CUDA device, print one line per
    measurement, and write kernel_bench.json and kernel_bench.txt to out_dir."""
    if not torch.cuda.is_available():
        from folio.cluster.entrypoints.bench.cpu_attention import run_cpu_attention_bench
        from folio.cluster.entrypoints.bench.cpu_quant import run_cpu_head_bench, run_cpu_quant_bench

        rows = run_cpu_attention_bench() + run_cpu_quant_bench() + run_cpu_head_bench()
        return _write(rows, out_dir, json.dumps)
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    peak = peak_bandwidth_tbps(props.name, peak_tbps)
    print(
        f"{props.name}: {props.multi_processor_count} SMs, peak "
        f"{f'{peak} TB/s' if peak else 'unknown (pass peak_tbps)'}; "
        f"attention {HQ}q/{HKV}kv heads x {HEAD_DIM}, {DTYPE}, blocks of {BLOCK}",
        flush=True,
    )
    run = {
        "decode": lambda: _decode_rows(device, peak, props.multi_processor_count),
        "prefill": lambda: _prefill_rows(device),
        "quant": lambda: _quant_rows(device, peak),
        "moe": lambda: moe_rows(device),
        "sweep": lambda: sweep_rows(device),
    }
    rows = []
    with torch.inference_mode():
        for name in sections:
            rows += run[name]()
    for r in rows:
        r.update(device=props.name, peak_tbps=peak)
    return _write(rows, out_dir, _format)


def _write(rows: list[dict], out_dir: Optional[str], fmt: Callable[[dict], str]) -> list[dict]:
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "kernel_bench.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(out_dir, "kernel_bench.txt"), "w") as f:
            f.write("\n".join(fmt(r) for r in rows) + "\n")
    return rows


HELP = (
    "Triton paged attention against SDPA, quantized matmul against dequantize+linear, "
    "fused MoE against the per-expert loop (GPU); "
    "without a GPU, the CPU decode attention against bf16 SDPA and the int4 kernel against the wide-batch path"
)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="folder for kernel_bench.json and kernel_bench.txt")
    p.add_argument("--peak-tbps", type=float, help="peak memory bandwidth, TB/s (default: by device name)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="GPU sections to run")


def main(args: argparse.Namespace) -> list[dict]:
    return run_kernel_bench(args.out, args.peak_tbps, tuple(args.sections))
