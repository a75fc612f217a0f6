"""The sweep section of `folio bench kernels` (GPU only): launch configs of the
decode, prefill and quantized-matmul kernels timed side by side on the GPU at
hand, the heuristic's own choice marked, for tuning decode_config,
prefill_config and quant_matmul_config. A config the GPU cannot run (too much
shared memory, say) is a row with its error, not the end of the run.

Shapes are gpu_layer.py's: a Llama-3-8B attention layer and MLP projections, bf16.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from folio.cluster.entrypoints.bench.gpu_layer import (
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
from folio.kernels.paged_decode import DecodeConfig, decode_config, paged_decode_attention
from folio.kernels.paged_prefill import PrefillConfig, paged_prefill_attention, prefill_config
from folio.kernels.quant_matmul import QuantMatmulConfig, quant_matmul_config, quantized_linear

DECODE_SHAPES = ((1, 32768), (16, 8192), (64, 8192))  # (batch, context)
DECODE_SWEEP = (
    DecodeConfig(64, 4, 3),
    DecodeConfig(64, 4, 4),
    DecodeConfig(128, 4, 2),
    DecodeConfig(128, 8, 3),
    DecodeConfig(32, 4, 4),
)
PREFILL_SHAPE = (1, 8192)  # (batch, prompt length)
PREFILL_SWEEP = (
    PrefillConfig(128, 32, 8, 3),
    PrefillConfig(128, 64, 8, 3),
    PrefillConfig(128, 64, 8, 2),
    PrefillConfig(128, 128, 8, 2),
    PrefillConfig(128, 64, 4, 3),
    PrefillConfig(64, 64, 4, 3),
    PrefillConfig(64, 64, 4, 4),
    PrefillConfig(64, 128, 4, 3),
    PrefillConfig(64, 32, 4, 2),
    PrefillConfig(256, 64, 8, 2),
)
QUANT_SWEEP = {  # tokens -> configs (block_m, block_n, block_k, warps, stages)
    1: (
        QuantMatmulConfig(16, 32, 128, 4, 4),
        QuantMatmulConfig(16, 64, 128, 4, 4),
        QuantMatmulConfig(16, 32, 256, 4, 4),
        QuantMatmulConfig(16, 64, 256, 4, 3),
        QuantMatmulConfig(16, 128, 128, 4, 3),
        QuantMatmulConfig(16, 32, 128, 2, 4),
        QuantMatmulConfig(16, 16, 256, 2, 4),
        QuantMatmulConfig(16, 32, 512, 4, 3),
    ),
    2048: (
        QuantMatmulConfig(128, 128, 64, 8, 3),
        QuantMatmulConfig(128, 128, 128, 8, 3),
        QuantMatmulConfig(128, 256, 64, 8, 3),
        QuantMatmulConfig(256, 128, 64, 8, 3),
        QuantMatmulConfig(128, 128, 64, 4, 4),
        QuantMatmulConfig(64, 128, 64, 4, 4),
        QuantMatmulConfig(128, 64, 128, 4, 3),
    ),
}


def _timed(rows: list, row: dict, fn: Callable[[], object], nbytes: float = 0, flops: float = 0) -> None:
    """Time fn into row (ms, and GB/s of nbytes and TFLOP/s of flops where given), append, print."""
    try:
        row["ms"] = time_ms(fn)
        row["gbps"] = nbytes / row["ms"] / 1e6 if nbytes else None
        row["tflops"] = flops / row["ms"] / 1e9 if flops else None
    except Exception as e:  # noqa: BLE001  a config this GPU cannot run is a result too
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    rows.append(row)
    print(format_sweep(row), flush=True)


def format_sweep(r: dict) -> str:
    head = f"{r['kind']:<15} {r['case']:<22} {r['config']:<40}{' *' if r['default'] else '  '}"
    if "error" in r:
        return head + f"  failed: {r['error']}"
    head += f"  {r['ms'] * 1e3:9.1f} us"
    if r.get("gbps") is not None:
        head += f"  {r['gbps']:7.0f} GB/s"
    if r.get("tflops") is not None:
        head += f"  {r['tflops']:6.1f} TFLOP/s"
    return head


def sweep_rows(device) -> list[dict]:
    """Every config of each sweep on its shapes; '*' marks the heuristic's pick."""
    rows: list[dict] = []
    scale = HEAD_DIM**-0.5
    for batch, ctx in DECODE_SHAPES:
        k_cache, v_cache, tables = paged_pool(batch, ctx, device)
        meta = step_metadata([1] * batch, [ctx - 1] * batch, tables)
        q = torch.randn(batch, HQ, HEAD_DIM, device=device, dtype=DTYPE)
        kv_bytes = 2 * batch * ctx * HKV * HEAD_DIM * DTYPE.itemsize
        for cfg in DECODE_SWEEP:
            row = dict(kind="sweep-decode", case=f"batch {batch} ctx {ctx}", config=_name(cfg))
            row["default"] = cfg == decode_config(HEAD_DIM, DTYPE)
            fn = functools.partial(paged_decode_attention, q, k_cache, v_cache, meta, scale, config=cfg)
            _timed(rows, row, fn, nbytes=kv_bytes)
        k_cache = v_cache = None
    batch, n = PREFILL_SHAPE
    k_cache, v_cache, tables = paged_pool(batch, n, device)
    meta = step_metadata([n] * batch, [0] * batch, tables)
    q = torch.randn(batch * n, HQ, HEAD_DIM, device=device, dtype=DTYPE)
    flops = 4 * batch * HQ * HEAD_DIM * n * (n + 1) / 2
    for cfg in PREFILL_SWEEP:
        row = dict(kind="sweep-prefill", case=f"batch {batch} prompt {n}", config=_name(cfg))
        row["default"] = cfg == prefill_config(HEAD_DIM, DTYPE)
        fn = functools.partial(paged_prefill_attention, q, k_cache, v_cache, meta, scale, config=cfg)
        _timed(rows, row, fn, flops=flops)
    k_cache = v_cache = None
    for n_out, k_in in QUANT_SHAPES:
        w = random_quantized_weight(n_out, k_in, 4, device)
        weight_bytes = stored_bytes(w)
        for tokens, configs in QUANT_SWEEP.items():
            x = torch.randn(tokens, k_in, device=device, dtype=DTYPE)
            for cfg in configs:
                row = dict(kind="sweep-quant-w4", case=f"tokens {tokens} {n_out}x{k_in}", config=_name(cfg))
                row["default"] = cfg == quant_matmul_config(tokens, DTYPE, 4)
                fn = functools.partial(quantized_linear, x, w, config=cfg)
                _timed(rows, row, fn, nbytes=weight_bytes, flops=2 * tokens * n_out * k_in)
    return rows


def _name(cfg) -> str:
    return " ".join(f"{k}={v}" for k, v in vars(cfg).items())
