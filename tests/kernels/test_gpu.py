"""The compiled kernels on a real GPU, bf16 and fp16 at serving sizes, against
the PyTorch references (run on CPU in fp32 math: reference.paged_attention
builds host-side index tensors). Skipped without CUDA.

    pytest tests/kernels/test_gpu.py --confcutdir=tests/kernels
"""

from __future__ import annotations

import pytest
import torch

from folio.kernels import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
TOL = {BF16: dict(atol=2e-2, rtol=2e-2), F16: dict(atol=4e-3, rtol=1e-2), F32: dict(atol=1e-4, rtol=1e-4)}


def _cpu(meta):
    """The same metadata with its tensors on the CPU, for the reference."""
    from dataclasses import replace

    return replace(
        meta,
        query_start_loc=meta.query_start_loc.cpu(),
        seq_lens=meta.seq_lens.cpu(),
        context_lens=meta.context_lens.cpu(),
        block_tables=meta.block_tables.cpu(),
        slot_mapping=meta.slot_mapping.cpu(),
    )


def _check_attention(case, dtype, window, got, softcap=None):
    expected = reference.paged_attention(
        case.q.cpu(), case.ref_k_cache.cpu(), case.ref_v_cache.cpu(), _cpu(case.meta), case.scale, window, softcap
    )
    assert not got.isnan().any()
    torch.testing.assert_close(got.cpu().float(), expected.float(), **TOL[dtype])


ATTENTION_CASES = [
    # dtype, block, head_dim, q heads, kv heads, window
    pytest.param(BF16, 16, 128, 32, 8, None, id="bf16-llama8b"),
    pytest.param(F16, 32, 128, 32, 8, None, id="fp16-llama8b-bs32"),
    pytest.param(BF16, 32, 64, 9, 3, None, id="bf16-smollm"),
    pytest.param(F16, 16, 64, 16, 16, 1000, id="fp16-mha-window"),
    pytest.param(BF16, 16, 128, 64, 8, 4096, id="bf16-gqa8-window"),
    pytest.param(F32, 16, 128, 8, 2, None, id="fp32-ieee-dots"),
]


@pytest.mark.parametrize("dtype,block_size,head_dim,hq,hkv,window", ATTENTION_CASES)
def test_decode_real_sizes(paged_case, dtype, block_size, head_dim, hq, hkv, window):
    from folio.kernels.triton_ops import TRITON_OPS

    contexts = [0, 1, 15, 16, 17, 511, 1000, 2047, 4095, 5000, 7, 300, 64, 3333, 8191, 12000]
    case = paged_case(
        [1] * len(contexts),
        contexts,
        block_size=block_size,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=head_dim,
        dtype=dtype,
        device="cuda",
    )
    got = TRITON_OPS.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale, window)
    _check_attention(case, dtype, window, got)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_decode_one_long_sequence_splits(paged_case, dtype):
    """Batch 1 at 32k: dozens of splits, merged by the reduce kernel."""
    from folio.kernels.triton_ops import TRITON_OPS

    case = paged_case(
        [1], [32767], block_size=16, num_q_heads=32, num_kv_heads=8, head_dim=128, dtype=dtype, device="cuda"
    )
    got = TRITON_OPS.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    _check_attention(case, dtype, None, got)


@pytest.mark.parametrize("dtype,block_size,head_dim,hq,hkv,window", ATTENTION_CASES)
def test_prefill_real_sizes(paged_case, dtype, block_size, head_dim, hq, hkv, window):
    from folio.kernels.triton_ops import TRITON_OPS

    # fresh prompt, prefix-cache hit, chunk after a mid-block prefix, decode rows, idle, single token
    qlens = [1500, 700, 513, 1, 1, 0, 1, 129]
    contexts = [0, 2048, 1000, 3000, 0, 50, 0, 7]
    case = paged_case(
        qlens,
        contexts,
        block_size=block_size,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=head_dim,
        dtype=dtype,
        device="cuda",
    )
    got = TRITON_OPS.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale, window)
    _check_attention(case, dtype, window, got)


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize(
    "qlens,contexts",
    [([1] * 6, [0, 17, 511, 4095, 5000, 300]), ([700, 1, 129, 1], [2048, 3000, 7, 0])],
    ids=["decode", "prefill"],
)
def test_softcap_real_sizes(paged_case, dtype, qlens, contexts):
    """Gemma 2's soft-capped scores at Gemma-2-27B's heads (32 of 128, 16 KV), with
    its 4096-token window; a cap of 1.5 bends scores of this size (Gemma 2's 50 would not)."""
    from folio.kernels.triton_ops import TRITON_OPS

    case = paged_case(
        qlens, contexts, block_size=16, num_q_heads=32, num_kv_heads=16, head_dim=128, dtype=dtype, device="cuda"
    )
    got = TRITON_OPS.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale, 4096, 1.5)
    _check_attention(case, dtype, 4096, got, 1.5)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_write_kv_real_sizes(dtype):
    from folio.kernels.kv_write import write_kv

    T, hkv, d, bs, blocks = 3000, 8, 128, 16, 400
    kv = torch.randn(T, 2, hkv, d, device="cuda", dtype=dtype)
    slots = torch.randperm(blocks * bs, device="cuda")[:T]
    expected = [torch.randn(blocks, bs, hkv, d, device="cuda", dtype=dtype) for _ in range(2)]
    got = [c.clone() for c in expected]
    reference.write_kv(kv[:, 0], kv[:, 1], *expected, slots)
    write_kv(kv[:, 0], kv[:, 1], *got, slots)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("n,offset", [(4096, 0.0), (576, 0.0), (8192, 1.0)])
def test_rms_norm_real_sizes(dtype, n, offset):
    from folio.kernels.norm_rope_act import rms_norm

    x = torch.randn(1000, n, device="cuda", dtype=dtype)
    res = torch.randn_like(x)
    w = torch.randn(n, device="cuda", dtype=dtype)
    out, new_res = rms_norm(x, w, 1e-5, res, offset)
    exp_out, exp_res = reference.rms_norm(x, w, 1e-5, res, offset)
    assert torch.equal(new_res, exp_res)
    torch.testing.assert_close(out, exp_out, **TOL[dtype])


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("head_dim,rot_dim", [(128, 128), (64, 32)])
def test_rotary_real_sizes(dtype, head_dim, rot_dim):
    from folio.kernels.norm_rope_act import rotary_embedding

    T, hq, hkv = 2048, 32, 8
    qkv = torch.randn(T, (hq + 2 * hkv) * head_dim, device="cuda", dtype=dtype)
    q = qkv[:, : hq * head_dim].view(T, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(T, hkv, head_dim)
    pos = torch.randint(0, 8192, (T,), device="cuda")
    inv = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, device="cuda").float() / rot_dim))
    ang = torch.arange(8192, device="cuda").float()[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], dim=-1)
    for g, e in zip(rotary_embedding(pos, q, k, cos_sin), reference.rotary_embedding(pos, q, k, cos_sin)):
        torch.testing.assert_close(g, e, **TOL[dtype])


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_silu_and_mul_real_sizes(dtype):
    from folio.kernels.norm_rope_act import silu_and_mul

    x = torch.randn(512, 2 * 14336, device="cuda", dtype=dtype)
    torch.testing.assert_close(silu_and_mul(x), reference.silu_and_mul(x), **TOL[dtype])


QUANT_CASES = [
    # dtype, bits, group, N, K, act-order: Llama-3-8B projections and GGUF/GPTQ layouts
    pytest.param(BF16, 4, 128, 28672, 4096, False, id="bf16-w4-g128-gate-up"),
    pytest.param(F16, 4, 32, 4096, 14336, True, id="fp16-w4-g32-act-order-down"),
    pytest.param(BF16, 8, 128, 6144, 4096, False, id="bf16-w8-g128-qkv"),
    pytest.param(F16, 6, 16, 4096, 4096, False, id="fp16-6bit-g16-q6k"),
    pytest.param(BF16, 5, 48, 1000, 4608, False, id="bf16-5bit-g48-lookup"),
]


@pytest.mark.parametrize("dtype,bits,group,n,k,perm", QUANT_CASES)
def test_quantized_linear_real_sizes(dtype, bits, group, n, k, perm):
    """The kernel at decode, small-batch and prefill row counts (its three
    configs) against the reference path and against fp32 math on the same
    dtype-rounded weights."""
    import torch.nn.functional as F

    from folio.kernels.quant import QuantizedTensor, QuantizedWeight
    from folio.kernels.triton_ops import TRITON_OPS

    gen = torch.Generator().manual_seed(bits + group)
    unit = 1.0 / ((1 << (bits - 1)) * k**0.5)  # outputs of order 1
    qt = QuantizedTensor(
        torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=gen),
        (torch.rand(n, k // group, generator=gen) + 0.5) * unit,
        torch.randn(n, k // group, generator=gen) * unit,
        bits,
        group,
        torch.randperm(k, generator=gen) if perm else None,
    )
    w = QuantizedWeight(qt, dtype, "cuda")
    bias = (torch.randn(n, device="cuda") * 0.1).to(dtype)
    w32 = w.dequantize().float()
    for t in (1, 33, 600):
        x = torch.randn(t, k, device="cuda", dtype=dtype)
        got = TRITON_OPS.quantized_linear(x, w, bias)
        assert got.dtype == dtype and got.shape == (t, n) and not got.isnan().any()
        xs = x.index_select(-1, w.perm) if perm else x
        expected = F.linear(xs.float(), w32, bias.float())
        torch.testing.assert_close(got.float(), expected, **TOL[dtype])
        torch.testing.assert_close(got, reference.quantized_linear(x, w, bias), **TOL[dtype])


MOE_CASES = [
    # dtype, hidden, intermediate slice, experts, top-k: Mixtral-8x7B under TP 2, Qwen3-30B-A3B, Qwen1.5-MoE
    pytest.param(BF16, 4096, 7168, 8, 2, id="bf16-mixtral-tp2"),
    pytest.param(F16, 2048, 768, 128, 8, id="fp16-qwen3-30b"),
    pytest.param(BF16, 2048, 1408, 60, 4, id="bf16-qwen1.5-moe"),
    pytest.param(BF16, 2048, 192, 128, 8, id="bf16-qwen3-30b-tp4-uneven-k"),
]


@pytest.mark.parametrize("dtype,hidden,inter,experts,top_k", MOE_CASES)
def test_fused_moe_real_sizes(dtype, hidden, inter, experts, top_k):
    """The fused MoE kernels at decode, small-batch and prefill token counts
    (their three configs) against the per-expert loop in the same dtype and
    against fp32 math on the same weights."""
    from folio.kernels.triton_ops import TRITON_OPS

    gen = torch.Generator(device="cuda").manual_seed(hidden + experts)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=gen) * inter**-0.5 * 2).to(dtype)
    for t in (1, 33, 600):
        x = torch.randn(t, hidden, device="cuda", dtype=dtype, generator=gen)
        logits = torch.randn(t, experts, device="cuda", generator=gen)
        weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)  # [T, k] each
        weights /= weights.sum(-1, keepdim=True)  # renormalized, as Mixtral does: outputs of order 1
        got = TRITON_OPS.fused_moe(x, w13, w2, weights, ids)
        assert got.dtype == dtype and got.shape == (t, hidden) and not got.isnan().any()
        torch.testing.assert_close(got, reference.fused_moe(x, w13, w2, weights, ids), **TOL[dtype])
        expected = reference.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)
        torch.testing.assert_close(got.float(), expected, **TOL[dtype])
