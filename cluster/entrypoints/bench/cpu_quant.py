"""The CPU quantized-matmul section of `folio bench kernels`: one SmolLM2 layer's
four projections kept as 4-bit groups of 32 (the bundled Q4_1 GGUF) in bfloat16,
through torch's int4 kernel and through the wide-batch path (the weight decoded
from torch's packed form, then fp32 GEMMs: QuantizedWeight.int4pack_dense_matmul),
at each row count. kernels/reference.quantized_linear switches from the first to
the second at WIDE_ROWS rows; this is the measurement that places it.

Times are the best of seven rounds over the four projections, wall clock; the two
paths alternate within each round, so a change in the machine's speed hits both.

    folio bench kernels          # on a machine without a GPU
"""

from __future__ import annotations

import time

import torch

from folio.kernels.quant import WIDE_ROWS, QuantizedTensor, QuantizedWeight, int4pack_block_n

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # qkv, o, gate_up, down: (out, in)
ROWS = (1, 16, 64, 128, 192, 256, 512)


def _layer() -> list[QuantizedWeight]:
    g = torch.Generator().manual_seed(0)
    weights = []
    for n, k in SHAPES:
        t = QuantizedTensor(
            torch.randint(0, 16, (n, k), generator=g).to(torch.uint8),
            torch.rand(n, k // 32, generator=g) * 0.02,
            torch.randn(n, k // 32, generator=g) * 0.02,
            4,
            32,
        )
        weights.append(QuantizedWeight(t, torch.bfloat16, "cpu"))
    return weights


def run_cpu_quant_bench() -> list[dict]:
    block = int4pack_block_n()
    print(f"CPU int4 matmul, one SmolLM2 layer (4 projections), bf16, groups of 32; packed block {block}")
    if block is None:
        print("torch's packed int4 layout is not one folio unpacks here: the wide path is off")
        return []
    layer = _layer()
    print(f"{'rows':>5} {'int4 kernel':>12} {'wide path':>10} {'int4 / wide':>11}   (wide from {WIDE_ROWS} rows)")
    rows = []
    with torch.inference_mode():
        for m in ROWS:
            xs = [torch.randn(m, k).bfloat16() for _, k in SHAPES]
            int4 = wide = float("inf")
            for _ in range(7):
                start = time.perf_counter()
                for w, x in zip(layer, xs):
                    w.int4pack_matmul(x)
                middle = time.perf_counter()
                for w, x in zip(layer, xs):
                    w.int4pack_dense_matmul(x).bfloat16()
                int4, wide = min(int4, middle - start), min(wide, time.perf_counter() - middle)
            rows.append(dict(kind="cpu-int4", rows=m, int4_ms=int4 * 1e3, wide_ms=wide * 1e3))
            print(f"{m:>5} {int4 * 1e3:>9.2f} ms {wide * 1e3:>7.2f} ms {int4 / wide:>10.2f}x", flush=True)
    return rows
