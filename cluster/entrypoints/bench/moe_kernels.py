"""The fused-MoE section of `folio bench kernels` (GPU only): kernels/fused_moe.py
against the per-expert loop (kernels/reference.py::fused_moe, what ran before it).

One MoE layer of Mixtral-8x7B (hidden 4096, 8 experts of 14336, top 2) and of
Qwen3-30B-A3B (hidden 2048, 128 experts of 768, top 8), bf16, random router
logits, at decode, small-batch and prefill token counts. Reported: time, the
bytes of the experts that the step touches read per second (the bound at
decode) and TFLOP/s, both of the graph replay, and the loop's time on the same inputs.

Times are triton.testing.do_bench medians, launches included: the loop reads
the experts in use back to the host (torch.unique(...).tolist()), which a CUDA
graph cannot capture, and its launches and that sync are part of what the
fused kernels remove. The fused path has no host sync, so it is also timed as
a CUDA-graph replay ("graph"): the difference is the host's launch cost, which
graph capture of decode steps would remove.
"""

from __future__ import annotations

import functools

import torch

from folio.cluster.entrypoints.bench.gpu_layer import time_ms
from folio.kernels import reference
from folio.kernels.fused_moe import fused_moe

DTYPE = torch.bfloat16
MOE_SHAPES = (("mixtral-8x7b", 4096, 14336, 8, 2), ("qwen3-30b-a3b", 2048, 768, 128, 8))
MOE_TOKENS = (1, 16, 256, 2048)


def _launched_ms(fn) -> float:
    """Median time of one call launched from Python, launches and host syncs included."""
    import triton.testing

    fn()  # compile outside the timing
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, rep=50, return_mode="median")


def moe_rows(device) -> list[dict]:
    """One row per (model, tokens), printed as it is measured."""
    rows = []
    for model, hidden, inter, experts, top_k in MOE_SHAPES:
        w13 = torch.randn(experts, 2 * inter, hidden, device=device, dtype=DTYPE) * hidden**-0.5
        w2 = torch.randn(experts, hidden, inter, device=device, dtype=DTYPE) * inter**-0.5
        for t in MOE_TOKENS:
            x = torch.randn(t, hidden, device=device, dtype=DTYPE)
            probs = torch.softmax(torch.randn(t, experts, device=device), dim=-1)
            weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k] each
            args = (x, w13, w2, weights, ids)
            ms = _launched_ms(functools.partial(fused_moe, *args))
            graph_ms = time_ms(functools.partial(fused_moe, *args))
            loop_ms = _launched_ms(functools.partial(reference.fused_moe, *args))
            used = int(torch.unique(ids).numel())
            weight_bytes = used * 3 * hidden * inter * DTYPE.itemsize
            rows.append(
                dict(
                    kind="fused-moe",
                    model=model,
                    tokens=t,
                    experts_used=used,
                    ms=ms,
                    graph_ms=graph_ms,
                    gbps=weight_bytes / graph_ms / 1e6,
                    tflops=2 * 3 * t * top_k * hidden * inter / graph_ms / 1e9,
                    loop_ms=loop_ms,
                    time_vs_loop=ms / loop_ms,
                )
            )
            print(format_moe(rows[-1]), flush=True)
        w13 = w2 = None
    return rows


def format_moe(r: dict) -> str:
    return (
        f"{r['kind']:<15} {r['model']:<14} tokens {r['tokens']:>4} experts {r['experts_used']:>3}"
        f"  {r['ms'] * 1e3:9.1f} us, graph {r['graph_ms'] * 1e3:9.1f} us"
        f"  {r['gbps']:7.0f} GB/s  {r['tflops']:6.1f} TFLOP/s"
        f" | per-expert loop {r['loop_ms'] * 1e3:9.1f} us  ours/loop {r['time_vs_loop']:5.2f}"
    )
