"""Compile every kernel ahead of time for a GPU target, on any machine.

No GPU is needed: triton.compile lowers a kernel to PTX and a cubin for a
GPUTarget, and the ptxas inside the triton wheel reports registers and spills.
A kernel that fails to compile, or spills, would fail or crawl on the GPU;
tests/kernels/test_aot_compile.py makes CI catch it.

The variants compiled are the ones the wrappers launch for the model shapes
folio serves: head dims 64 and 128, KV block sizes 16 and 32, bf16 and fp16,
attention with and without Gemma 2's score soft-capping,
4- and 8-bit quantized matmuls at decode and prefill batch sizes, the fused
MoE GEMMs on Mixtral- and Qwen-MoE-shaped experts (whole and TP-sliced),
with each wrapper's own config functions (decode_config, prefill_config,
rms_norm_warps, ...) so that what is checked is what runs. Pointer and stride
arguments carry the 16-divisibility hint that Triton's JIT would give them at
these shapes, so the code compiled here is the code the JIT would build.

    python -m folio.kernels.aot [--arch 80 90] [--json FILE]   # one line per variant

Run it in a process without TRITON_INTERPRET: under the interpreter
@triton.jit yields functions that cannot be compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource

from folio.kernels import fused_moe, kv_write, norm_rope_act, paged_decode, paged_prefill, quant_matmul

HEAD_DIMS = (64, 128, 256)  # 256: Gemma
BLOCK_SIZES = (16, 32)
DTYPES = ("bf16", "fp16")
NORM_SIZES = (1024, 4096, 8192)  # hidden sizes, rounded up to the power of two the norm tiles
# Quantized matmul: (bits, group, tokens). Tokens 1, 64 and 2048 reach the decode,
# middle and prefill configs; group 128 takes one scale per K step, group 16
# several, group 48 a lookup per element (quant_matmul.groups_per_step). A few,
# not the product: each compile costs seconds in CI.
QUANT_IN_FEATURES = 6144  # K / group a multiple of 16 for every group here, as the stride hints claim
QUANT_CASES = ((4, 128, 1), (4, 128, 2048))
QUANT_EXTRA_CASES = ((8, 128, 1), (8, 128, 2048), (4, 128, 64), (4, 16, 1), (4, 48, 1))  # first dtype only
# Fused MoE: (model, hidden, intermediate slice, experts, top-k, tokens). Mixtral-8x7B's
# experts halved by TP 2, Qwen3-30B-A3B's whole (768) and Qwen1.5-MoE-A2.7B's (1408);
# tokens 1 and 2048 reach the decode and prefill configs, 256 over 8 experts the middle.
MOE_CASES = (
    ("mixtral-tp2", 4096, 7168, 8, 2, 1),
    ("mixtral-tp2", 4096, 7168, 8, 2, 256),
    ("mixtral-tp2", 4096, 7168, 8, 2, 2048),
    ("qwen3-30b", 2048, 768, 128, 8, 1),
    ("qwen3-30b", 2048, 768, 128, 8, 2048),
)
# first dtype only; TP 4's 192-wide slice is a multiple of no 128-wide K step (EVEN_K off)
MOE_EXTRA_CASES = (("qwen1.5-moe", 2048, 1408, 60, 4, 2048), ("qwen3-30b-tp4", 2048, 192, 128, 8, 1))
ARCHS = (80, 90)

# Pointer arguments whose element type is fixed; every other *_ptr holds the model dtype.
_FIXED_POINTERS = {
    "slot_ptr": "*i64",
    "codes_ptr": "*u8",
    "pos_ptr": "*i64",
    "cs_ptr": "*fp32",
    "query_start_ptr": "*i32",
    "seq_lens_ptr": "*i32",
    "block_tables_ptr": "*i32",
    "part_acc_ptr": "*fp32",
    "part_m_ptr": "*fp32",
    "part_l_ptr": "*fp32",
    "topk_weights_ptr": "*fp32",
    "sorted_ids_ptr": "*i32",
    "expert_ids_ptr": "*i32",
    "num_padded_ptr": "*i32",
}
_FLOAT_ARGS = {"qk_scale", "softcap", "eps", "weight_offset"}


@dataclass(frozen=True)
class Variant:
    """One compiled form of one kernel: its constexprs and launch options."""

    label: str
    fn: object  # the @triton.jit function
    dtype: str  # element type of the model tensors ("bf16", "fp16")
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3

    def source(self) -> ASTSource:
        signature, attrs = {}, {}
        for i, p in enumerate(self.fn.params):
            name = p.name
            if p.is_constexpr:
                signature[name] = "constexpr"
                continue
            if name.endswith("_ptr"):
                signature[name] = _FIXED_POINTERS.get(name, "*" + self.dtype)
            else:
                signature[name] = "fp32" if name in _FLOAT_ARGS else "i32"
            if name.endswith("_ptr") or name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        return ASTSource(self.fn, signature, constexprs=dict(self.constexprs), attrs=attrs)


@dataclass(frozen=True)
class Report:
    label: str
    arch: int
    seconds: float
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    shared_bytes: Optional[int] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.spill_stores == 0 and self.spill_loads == 0


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def variants(head_dims=HEAD_DIMS, block_sizes=BLOCK_SIZES, dtypes=DTYPES, norm_sizes=NORM_SIZES) -> list[Variant]:
    """Every (kernel, constexprs, launch options) the wrappers use at these shapes."""
    out: list[Variant] = []
    for i, dt in enumerate(dtypes):
        tdt = _torch_dtype(dt)
        for d in head_dims:
            bd = triton.next_power_of_2(d)
            dc = paged_decode.decode_config(d, tdt)
            pc = paged_prefill.prefill_config(d, tdt)
            for bs in block_sizes:
                # Gemma 2's soft-capped scores: one dtype, one block size (the cap is a
                # few instructions on the score tile, alike at every other shape).
                for softcap in (False, True) if i == 0 and bs == block_sizes[0] else (False,):
                    out += _attention_variants(d, bs, dt, dc, pc, softcap)
            out.append(
                Variant(
                    f"decode-reduce d{d} {dt}",
                    paged_decode._reduce_kernel,
                    dt,
                    dict(HEAD_DIM=d, BLOCK_D=bd, SPLIT_CHUNK=paged_decode.SPLIT_CHUNK),
                )
            )
            out.append(
                Variant(f"write_kv d{d} {dt}", kv_write._write_kv_kernel, dt, dict(HEAD_DIM=d, BLOCK_D=bd), num_warps=1)
            )
            out.append(
                Variant(
                    f"rotary d{d} {dt}", norm_rope_act._rotary_kernel, dt, dict(HEAD_DIM=d, BLOCK_D=bd), num_warps=1
                )
            )
        for n in norm_sizes:
            for residual in (False, True):
                out.append(
                    Variant(
                        f"rms_norm n{n} {'residual' if residual else 'plain'} {dt}",
                        norm_rope_act._rms_norm_kernel,
                        dt,
                        dict(HAS_RESIDUAL=residual, BLOCK_N=triton.next_power_of_2(n)),
                        num_warps=norm_rope_act.rms_norm_warps(n),
                    )
                )
        out.append(
            Variant(f"silu_and_mul {dt}", norm_rope_act._silu_and_mul_kernel, dt, dict(BLOCK=norm_rope_act.SILU_BLOCK))
        )
        for bits, group, tokens in QUANT_CASES + (QUANT_EXTRA_CASES if i == 0 else ()):
            cfg = quant_matmul.quant_matmul_config(tokens, tdt, bits)
            # bias on the 8-bit variants, so that the epilogue with bias compiles too
            constexprs = quant_matmul.kernel_constexprs(bits, group, QUANT_IN_FEATURES, tdt, cfg, has_bias=bits == 8)
            out.append(
                Variant(
                    f"quant_matmul w{bits} g{group} t{tokens} {dt}",
                    quant_matmul._quant_matmul_kernel,
                    dt,
                    constexprs,
                    cfg.num_warps,
                    cfg.num_stages,
                )
            )
        for model, hidden, inter, experts, top_k, tokens in MOE_CASES + (MOE_EXTRA_CASES if i == 0 else ()):
            cfg = fused_moe.fused_moe_config(tokens * top_k, experts, tdt)
            # gate/up reads hidden-wide rows of x; down reads the intermediate slice
            for gemm, k_in in (("gate_up", hidden), ("down", inter)):
                out.append(
                    Variant(
                        f"fused_moe {gemm} {model} t{tokens} {dt}",
                        fused_moe._fused_moe_kernel,
                        dt,
                        fused_moe.kernel_constexprs(cfg, k_in, gemm == "gate_up", tdt),
                        cfg.num_warps,
                        cfg.num_stages,
                    )
                )
    return out


def _attention_variants(d: int, bs: int, dt: str, dc, pc, softcap: bool) -> list[Variant]:
    """The decode kernel (direct and split-K) and the prefill kernel at one shape."""
    tdt = _torch_dtype(dt)
    common = dict(
        BLOCK_SIZE=bs,
        HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(d),
        SOFTCAP=softcap,
        DOT_PRECISION=paged_decode.dot_precision(tdt),
    )
    tail = " softcap" if softcap else ""
    out = [
        Variant(
            f"decode d{d} bs{bs} {dt} {'split' if partials else 'direct'}{tail}",
            paged_decode._decode_kernel,
            dt,
            # every GQA group up to 16 heads shares the one 16-row tile
            dict(common, BLOCK_G=paged_decode.group_tile(1), BLOCK_N=dc.block_n, USE_PARTIALS=partials),
            dc.num_warps,
            dc.num_stages,
        )
        for partials in (False, True)
    ]
    out.append(
        Variant(
            f"prefill d{d} bs{bs} {dt}{tail}",
            paged_prefill._prefill_kernel,
            dt,
            dict(common, BLOCK_M=pc.block_m, BLOCK_N=pc.block_n),
            pc.num_warps,
            pc.num_stages,
        )
    )
    return out


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and shared memory that ptxas reports for a PTX module."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [
                get_ptxas(arch).path,
                "-v",
                f"--gpu-name={sm_arch_from_capability(arch)}",
                src,
                "-o",
                os.path.join(tmp, "k.cubin"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    log = res.stdout + res.stderr

    def num(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return dict(
        registers=num(r"Used (\d+) registers"),
        spill_stores=num(r"(\d+) bytes spill stores"),
        spill_loads=num(r"(\d+) bytes spill loads"),
        shared_bytes=num(r"(\d+) bytes smem"),
    )


def compile_variant(v: Variant, arch: int) -> Report:
    """Compile one variant for sm_<arch>; spills counted by ptxas -v on its PTX."""
    t0 = time.perf_counter()
    try:
        kernel = triton.compile(
            v.source(), target=GPUTarget("cuda", arch, 32), options=dict(num_warps=v.num_warps, num_stages=v.num_stages)
        )
        usage = ptxas_usage(kernel.asm["ptx"], arch)
        usage["shared_bytes"] = max(usage["shared_bytes"], kernel.metadata.shared)
    except Exception as e:  # report every failure; the test lists them all
        return Report(v.label, arch, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"[:2000])
    return Report(v.label, arch, time.perf_counter() - t0, **usage)


def compile_all(archs=ARCHS, **shape_kwargs) -> list[Report]:
    return [compile_variant(v, a) for a in archs for v in variants(**shape_kwargs)]


def format_report(r: Report) -> str:
    if r.error:
        return f"sm_{r.arch:<3} {r.label:<40} FAILED {r.error.splitlines()[0]}"
    return (
        f"sm_{r.arch:<3} {r.label:<40} {r.seconds:5.1f}s regs {r.registers:>3} "
        f"smem {r.shared_bytes:>6} spill st/ld {r.spill_stores}/{r.spill_loads}"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    ap.add_argument("--json", help="also write the reports to this file")
    args = ap.parse_args(argv)
    reports = []
    for arch in args.arch:
        for v in variants():
            reports.append(compile_variant(v, arch))
            print(format_report(reports[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=1)
    bad = [r for r in reports if not r.ok]
    print(f"{len(reports) - len(bad)} of {len(reports)} variants compiled without spills")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
