"""Every kernel variant the wrappers launch compiles for sm_80 and sm_90
without register spills (kernels/aot.py), on a machine without a GPU.

The compiles run in subprocesses, one per architecture side by side: the
kernels imported in this process are interpreter functions when
TRITON_INTERPRET is set (tests/kernels/conftest.py), and those cannot be
compiled. Cold, the two took about 40 s on two cores before the quantized
matmul's 9 variants per architecture, which add about a fifth (12 of 65 s
for sm_90 on a loaded machine); Triton's cache makes reruns faster. The fused
MoE's 26 variants per architecture share a few sets of constexprs, so most
hit that cache: about 24 s of compiling cold, both architectures summed. Head
dim 256 (Gemma) took the whole test from 40 to 60 s cold on two cores (AVX2 VM).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from folio.kernels.aot import ARCHS

REPO = Path(__file__).resolve().parents[2]
KINDS = (
    "decode",
    "decode-reduce",
    "prefill",
    "write_kv",
    "rotary",
    "rms_norm",
    "silu_and_mul",
    "quant_matmul",
    "fused_moe",
)


@pytest.mark.slow
def test_every_variant_compiles_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        arch: subprocess.Popen(
            [sys.executable, "-m", "folio.kernels.aot", "--arch", str(arch), "--json", str(tmp_path / f"{arch}.json")],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for arch in ARCHS
    }
    logs = {arch: p.communicate(timeout=900)[0] for arch, p in procs.items()}
    reports = []
    for arch in ARCHS:
        path = tmp_path / f"{arch}.json"
        assert path.exists(), f"sm_{arch} compile run crashed:\n{logs[arch][-4000:]}"
        reports += json.loads(path.read_text())
    labels = {r["label"] for r in reports}
    for kind in KINDS:
        assert any(label.split()[0] == kind for label in labels), f"no {kind} variant compiled"
    bad = [r for r in reports if r["error"] or r["spill_stores"] or r["spill_loads"]]
    assert not bad, "variants that failed or spilled:\n" + "\n".join(
        f"sm_{r['arch']} {r['label']}: {r['error'] or ''} spills {r['spill_stores']}/{r['spill_loads']}" for r in bad
    )
