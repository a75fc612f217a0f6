"""The CPU quantized-matmul section of `folio bench kernels`: one SmolLM2 layer's
four projections kept as 4-bit groups of 32 (the bundled Q4_1 GGUF) in bfloat16,
through torch's int4 kernel and through the wide-batch path (the weight decoded
from torch's packed form, then fp32 or bf16 GEMMs: QuantizedWeight.int4pack_dense_matmul),
at each row count. kernels/reference.quantized_linear switches from the kernel to
the wide path at wide_path().rows rows, in wide_path().dtype; this is the
measurement that places both (bf16 GEMMs pay where AMX runs them).

Then the LM head: SmolLM2's 49152 x 576 tied embedding, 8-bit codes in groups of 32
(the GGUF's Q8_0), through torch's int4 kernel as two 4-bit terms and through a
dense bf16 copy (what an embedding table of wider codes keeps where the CPU multiplies
bf16 natively: QuantizedWeight._exact_bf16_copy), in folio's form (reference._bf16_copy_matmul:
torch.mv at one row, copy @ x^T up to BF16_COPY_TRANSPOSED_ROWS) and as oneDNN's
x @ copy^T.

Times are the best of seven rounds over the four projections, wall clock; the
paths alternate within each round, so a change in the machine's speed hits all.

    folio bench kernels          # on a machine without a GPU
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from folio.kernels import reference
from folio.kernels.quant import (
    QuantizedTensor,
    QuantizedWeight,
    int4pack_block_n,
    table_path,
    wide_path,
)

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # qkv, o, gate_up, down: (out, in)
ROWS = (1, 16, 64, 96, 128, 192, 256, 512)
HEAD_SHAPE = (49152, 576)
HEAD_ROWS = (1, 2, 4, 16, 32, 64)


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
    wide = wide_path()
    chosen = f"(wide from {wide.rows} rows, {str(wide.dtype).removeprefix('torch.')} GEMMs)"
    print(f"{'rows':>5} {'int4 kernel':>12} {'wide fp32':>10} {'wide bf16':>10} {'int4 / wide':>11}   {chosen}")
    paths = {  # each over the layer's four projections
        "int4": lambda xs: [w.int4pack_matmul(x) for w, x in zip(layer, xs)],
        "fp32": lambda xs: [w.int4pack_dense_matmul(x, torch.float32) for w, x in zip(layer, xs)],
        "bf16": lambda xs: [w.int4pack_dense_matmul(x, torch.bfloat16) for w, x in zip(layer, xs)],
    }
    rows = []
    with torch.inference_mode():
        for m in ROWS:
            xs = [torch.randn(m, k).bfloat16() for _, k in SHAPES]
            ms = _best_ms(paths, xs)
            chosen_ms = ms["fp32" if wide.dtype == torch.float32 else "bf16"]
            rows.append(dict(kind="cpu-int4", rows=m, int4_ms=ms["int4"], wide_ms=ms["fp32"], wide_bf16_ms=ms["bf16"]))
            times = " ".join(f"{ms[name]:>7.2f} ms" for name in ("fp32", "bf16"))
            print(f"{m:>5} {ms['int4']:>9.2f} ms {times} {ms['int4'] / chosen_ms:>10.2f}x", flush=True)
    return rows


def run_cpu_head_bench() -> list[dict]:
    n, k = HEAD_SHAPE
    g = torch.Generator().manual_seed(0)
    t = QuantizedTensor(
        torch.randint(0, 256, (n, k), generator=g).to(torch.uint8),
        torch.rand(n, k // 32, generator=g) * 0.002,
        torch.zeros(n, k // 32),
        8,
        32,
    )
    terms = QuantizedWeight(t, torch.float32, "cpu", int4pack_dtypes=(torch.float32,))
    copy = t.dequantize().bfloat16()
    path = table_path()
    used = ", ".join(f"{'the bf16 copy' if path.copy_for(m) else 'two int4 terms'} at {m}" for m in HEAD_ROWS)
    print(f"CPU LM head {n}x{k}, 8-bit codes in groups of 32, float32 model; folio uses, by rows, {used}")
    print(f"{'rows':>5} {'two int4 terms':>15} {'bf16 copy':>10} {'oneDNN x @ copy^T':>18}")
    paths = {
        "terms": lambda x: terms.int4pack_matmul(x),
        "copy": lambda x: reference._bf16_copy_matmul(x.bfloat16(), copy, torch.float32),
        "onednn": lambda x: torch.nn.functional.linear(x.bfloat16(), copy).float(),
    }
    rows = []
    with torch.inference_mode():
        for m in HEAD_ROWS:
            x = torch.randn(m, k)
            ms = _best_ms(paths, x)
            rows.append(
                dict(kind="cpu-lm-head", rows=m, terms_ms=ms["terms"], copy_ms=ms["copy"], onednn_ms=ms["onednn"])
            )
            print(f"{m:>5} {ms['terms']:>12.2f} ms {ms['copy']:>7.2f} ms {ms['onednn']:>15.2f} ms", flush=True)
    return rows


def _best_ms(paths: dict[str, Callable], arg, rounds: int = 7) -> dict[str, float]:
    """Each path's best wall time in ms on arg over `rounds` rounds; the paths alternate
    within a round, so a change in the machine's speed hits all of them."""
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(rounds):
        for name, path in paths.items():
            start = time.perf_counter()
            path(arg)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: t * 1e3 for name, t in best.items()}
