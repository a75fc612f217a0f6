"""Every Triton kernel against its PyTorch reference, in the Triton interpreter.

Shapes are small (the interpreter runs programs one by one in Python). The
cases sample the grid rather than take its product, but together they cover
every value of every axis: block size 16/32, head dim 64/128, GQA 1/4/8,
fp32/fp16, zero-context and single-token sequences, sequences idle this
step, lengths ending mid-block and on a block edge, prefixes of zero and
several blocks, sliding windows, split-K on and off, tiles small enough
that queries and keys cross tile edges, and soft-capped scores. The pool holds NaN wherever no
sequence has a token (conftest.build_paged_case), so an unmasked read fails.

On a GPU machine the same code runs compiled in test_gpu.py instead.
"""

from __future__ import annotations

import pytest
import torch

from folio.kernels import kv_write, paged_decode, paged_prefill, reference, triton_ops
from folio.kernels.norm_rope_act import rms_norm, rotary_embedding, silu_and_mul
from folio.kernels.ops import select_ops
from folio.kernels.paged_decode import DecodeConfig
from folio.kernels.paged_prefill import PrefillConfig

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests; test_gpu.py covers CUDA")

F32, F16 = torch.float32, torch.float16


def test_kernels_run_in_the_interpreter():
    assert type(paged_decode._decode_kernel).__name__ == "InterpretedFunction", (
        "folio.kernels.* was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1; "
        "set TRITON_INTERPRET=1 in the environment of a CPU test run"
    )


def assert_close(actual, expected, dtype):
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == F32 else dict(atol=4e-3, rtol=1e-2)
    assert not actual.isnan().any()
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


# ------------------------------------------------------------------ attention

DECODE_CASES = [
    # block, head_dim, group, kv heads, dtype, window, splits, context lens (each decodes 1 token)
    pytest.param(16, 64, 1, 2, F32, None, 1, [0, 5, 16, 47], id="bs16-d64-mha-f32-nosplit"),
    pytest.param(32, 128, 4, 1, F16, None, 3, [0, 31, 32, 100], id="bs32-d128-gqa4-f16-split3"),
    pytest.param(16, 128, 8, 1, F16, 24, 4, [3, 70, 129], id="bs16-d128-gqa8-f16-window-split4"),
    pytest.param(32, 64, 8, 2, F32, 40, 2, [1, 33, 90], id="bs32-d64-gqa8-f32-window-split2"),
    pytest.param(16, 64, 4, 2, F16, None, None, [200, 9], id="bs16-d64-gqa4-f16-heuristic"),
]


@pytest.mark.parametrize("block_size,head_dim,group,hkv,dtype,window,splits,contexts", DECODE_CASES)
def test_decode_matches_reference(paged_case, block_size, head_dim, group, hkv, dtype, window, splits, contexts):
    case = paged_case(
        [1] * len(contexts),
        contexts,
        block_size=block_size,
        num_q_heads=group * hkv,
        num_kv_heads=hkv,
        head_dim=head_dim,
        dtype=dtype,
    )
    expected = reference.paged_attention(case.q, case.ref_k_cache, case.ref_v_cache, case.meta, case.scale, window)
    got = paged_decode.paged_decode_attention(
        case.q,
        case.k_cache,
        case.v_cache,
        case.meta,
        case.scale,
        window,
        num_splits=splits,
        config=DecodeConfig(16, 4, 1),
    )
    assert_close(got, expected, dtype)


SMALL_TILES = PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)

GRID = [(bs, d, g, dt) for bs in (16, 32) for d in (64, 128) for g in (1, 4, 8) for dt in (F32, F16)]
GRID_IDS = [f"bs{bs}-d{d}-gqa{g}-{str(dt)[-7:]}" for bs, d, g, dt in GRID]


@pytest.mark.parametrize("block_size,head_dim,group,dtype", GRID, ids=GRID_IDS)
def test_decode_grid(paged_case, block_size, head_dim, group, dtype):
    """The full product of the shape axes, on one ragged batch: zero context,
    mid-block, on a block edge, several blocks; split-K and window alternate."""
    i = GRID.index((block_size, head_dim, group, dtype))
    contexts = [0, block_size - 3, 2 * block_size, 3 * block_size + 5]
    window = (None, block_size + 2)[i % 2]
    case = paged_case(
        [1] * 4,
        contexts,
        block_size=block_size,
        num_q_heads=group,
        num_kv_heads=1,
        head_dim=head_dim,
        dtype=dtype,
        seed=i,
    )
    expected = reference.paged_attention(case.q, case.ref_k_cache, case.ref_v_cache, case.meta, case.scale, window)
    got = paged_decode.paged_decode_attention(
        case.q,
        case.k_cache,
        case.v_cache,
        case.meta,
        case.scale,
        window,
        num_splits=(1, 3)[i // 2 % 2],
        config=DecodeConfig(16, 4, 1),
    )
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("block_size,head_dim,group,dtype", GRID, ids=GRID_IDS)
def test_prefill_grid(paged_case, block_size, head_dim, group, dtype):
    """The full product of the shape axes, on one ragged mixed batch: a fresh
    prompt ending mid-block, a single-token prompt, a chunk after a prefix of
    several blocks, a decode row; window and tile sizes alternate."""
    i = GRID.index((block_size, head_dim, group, dtype))
    qlens = [block_size + 7, 1, 19, 1]
    contexts = [0, 0, 2 * block_size, block_size + 1]
    window = (None, 11)[i % 2]
    config = (SMALL_TILES, None)[i // 2 % 2]
    case = paged_case(
        qlens,
        contexts,
        block_size=block_size,
        num_q_heads=2 * group,
        num_kv_heads=2,
        head_dim=head_dim,
        dtype=dtype,
        seed=i,
    )
    expected = reference.paged_attention(case.q, case.ref_k_cache, case.ref_v_cache, case.meta, case.scale, window)
    got = paged_prefill.paged_prefill_attention(
        case.q, case.k_cache, case.v_cache, case.meta, case.scale, window, config=config
    )
    assert_close(got, expected, dtype)


# A cap of 1.5 bends this test's scores (|q.k| * scale up to ~4) hard: a kernel that
# ignored it, or capped after masking (hidden keys at -1.5, not -inf), fails.
SOFTCAP = 1.5
SOFTCAP_CASES = [
    # kernel, block, head_dim, group, kv heads, dtype, window, splits or tiles, query lens, context lens
    pytest.param("decode", 16, 64, 4, 2, F32, None, 1, [1] * 4, [0, 5, 16, 47], id="decode-f32-direct"),
    pytest.param("decode", 32, 128, 8, 1, F16, 24, 3, [1] * 3, [3, 70, 129], id="decode-f16-window-split3"),
    pytest.param("prefill", 16, 64, 4, 2, F32, 19, SMALL_TILES, [40, 1, 12], [0, 7, 50], id="prefill-f32-window"),
    pytest.param("prefill", 32, 128, 1, 2, F16, None, None, [20, 9, 1], [64, 0, 33], id="prefill-f16-prefix"),
]


@pytest.mark.parametrize("kernel,block_size,head_dim,group,hkv,dtype,window,tiling,qlens,contexts", SOFTCAP_CASES)
def test_softcap_matches_reference(
    paged_case, kernel, block_size, head_dim, group, hkv, dtype, window, tiling, qlens, contexts
):
    """Gemma 2's attention logit soft-capping, in both kernels."""
    case = paged_case(
        qlens,
        contexts,
        block_size=block_size,
        num_q_heads=group * hkv,
        num_kv_heads=hkv,
        head_dim=head_dim,
        dtype=dtype,
    )
    args = (case.q, case.k_cache, case.v_cache, case.meta, case.scale, window, SOFTCAP)
    if kernel == "decode":
        got = paged_decode.paged_decode_attention(*args, num_splits=tiling, config=DecodeConfig(16, 4, 1))
    else:
        got = paged_prefill.paged_prefill_attention(*args, config=tiling)
    ref = (case.q, case.ref_k_cache, case.ref_v_cache, case.meta, case.scale, window)
    expected = reference.paged_attention(*ref, SOFTCAP)
    assert_close(got, expected, dtype)
    assert (expected - reference.paged_attention(*ref)).abs().max() > 0.1, "the cap was meant to matter"


def test_decode_skips_idle_sequences(paged_case):
    """A step where some sequences bring no token is still a decode step."""
    case = paged_case([1, 0, 1], [20, 7, 0], block_size=16, num_q_heads=4, num_kv_heads=1, head_dim=64, dtype=F32)
    assert case.meta.is_pure_decode
    expected = reference.paged_attention(case.q, case.ref_k_cache, case.ref_v_cache, case.meta, case.scale)
    got = paged_decode.paged_decode_attention(
        case.q, case.k_cache, case.v_cache, case.meta, case.scale, num_splits=2, config=DecodeConfig(16, 4, 1)
    )
    assert_close(got, expected, F32)


PREFILL_CASES = [
    # block, head_dim, group, kv heads, dtype, window, config, query lens, context lens
    pytest.param(
        16, 64, 1, 2, F32, None, SMALL_TILES, [37, 1, 16], [0, 0, 0], id="fresh-prompts-mid-block-single-token"
    ),
    pytest.param(32, 128, 4, 1, F16, None, SMALL_TILES, [20, 9], [64, 96], id="prefix-cache-hit-several-blocks"),
    pytest.param(
        16, 128, 8, 1, F16, None, None, [25, 1, 0, 13], [21, 40, 5, 0], id="chunked-mixed-with-decode-and-idle"
    ),
    pytest.param(32, 64, 4, 2, F32, 19, SMALL_TILES, [40, 12], [0, 50], id="sliding-window"),
    pytest.param(16, 64, 8, 1, F32, 7, None, [1, 30], [33, 18], id="window-shorter-than-tile"),
]


@pytest.mark.parametrize("block_size,head_dim,group,hkv,dtype,window,config,qlens,contexts", PREFILL_CASES)
def test_prefill_matches_reference(
    paged_case, block_size, head_dim, group, hkv, dtype, window, config, qlens, contexts
):
    case = paged_case(
        qlens,
        contexts,
        block_size=block_size,
        num_q_heads=group * hkv,
        num_kv_heads=hkv,
        head_dim=head_dim,
        dtype=dtype,
    )
    expected = reference.paged_attention(case.q, case.ref_k_cache, case.ref_v_cache, case.meta, case.scale, window)
    got = paged_prefill.paged_prefill_attention(
        case.q, case.k_cache, case.v_cache, case.meta, case.scale, window, config=config
    )
    assert_close(got, expected, dtype)


def test_triton_ops_picks_decode_or_prefill(paged_case, monkeypatch):
    """Each step goes to the kernel its query lengths call for, window and softcap passed on."""
    calls = []
    for name in ("paged_decode_attention", "paged_prefill_attention"):
        real = getattr(triton_ops, name)
        monkeypatch.setattr(
            triton_ops, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)
        )
    assert select_ops("cuda") is triton_ops.TRITON_OPS
    for qlens, expect in (([1, 1], "paged_decode_attention"), ([3, 1], "paged_prefill_attention")):
        case = paged_case(qlens, [17, 4], block_size=16, num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=F32)
        got = triton_ops.TRITON_OPS.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale, 9, 2.0)
        expected = reference.paged_attention(case.q, case.ref_k_cache, case.ref_v_cache, case.meta, case.scale, 9, 2.0)
        assert calls[-1] == expect
        assert_close(got, expected, F32)


def test_paged_attention_rejects_bad_inputs(paged_case):
    case = paged_case([2], [3], block_size=16, num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=F32)
    attend = triton_ops.TRITON_OPS.paged_attention
    with pytest.raises(ValueError, match="dtype"):
        attend(case.q.half(), case.k_cache, case.v_cache, case.meta, case.scale)
    with pytest.raises(ValueError, match="rows"):
        attend(case.q[:1], case.k_cache, case.v_cache, case.meta, case.scale)
    with pytest.raises(ValueError, match="heads"):
        attend(case.q[:, :3], case.k_cache, case.v_cache, case.meta, case.scale)


# ------------------------------------------------------------------ KV write


@pytest.mark.parametrize(
    "block_size,head_dim,src_dtype,cache_dtype", [(16, 64, F32, F32), (32, 128, F16, F16), (16, 128, F32, F16)]
)
def test_write_kv_matches_reference(block_size, head_dim, src_dtype, cache_dtype):
    gen = torch.Generator().manual_seed(1)
    T, hkv, num_blocks = 11, 2, 4
    # Non-contiguous K/V, as the model slices them out of one qkv projection.
    kv = torch.randn(T, 3, hkv, head_dim, generator=gen).to(src_dtype)
    k, v = kv[:, 0], kv[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T]
    expected = [torch.randn(num_blocks, block_size, hkv, head_dim, generator=gen).to(cache_dtype) for _ in range(2)]
    got = [c.clone() for c in expected]
    reference.write_kv(k, v, *expected, slots)
    kv_write.write_kv(k, v, *got, slots)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# ------------------------------------------------------------------ norm, rope, act


@pytest.mark.parametrize(
    "dtype,n,with_residual,offset",
    [(F32, 64, False, 0.0), (F16, 200, True, 0.0), (F16, 128, True, 1.0), (F32, 300, True, 1.0)],
)
def test_rms_norm_matches_reference(dtype, n, with_residual, offset):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, n, generator=gen).to(dtype)
    residual = torch.randn(2, 3, n, generator=gen).to(dtype) if with_residual else None
    w = torch.randn(n, generator=gen).to(dtype)
    out, res = rms_norm(x, w, 1e-6, residual, offset)
    exp_out, exp_res = reference.rms_norm(x, w, 1e-6, residual, offset)
    assert out.dtype == exp_out.dtype and out.shape == exp_out.shape
    assert torch.equal(res, exp_res)
    torch.testing.assert_close(out, exp_out, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype,head_dim,rot_dim", [(F32, 64, 64), (F16, 128, 128), (F16, 64, 32)])
def test_rotary_matches_reference(dtype, head_dim, rot_dim):
    gen = torch.Generator().manual_seed(3)
    T, hq, hkv = 5, 4, 2
    qkv = torch.randn(T, (hq + 2 * hkv) * head_dim, generator=gen).to(dtype)
    q = qkv[:, : hq * head_dim].view(T, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(T, hkv, head_dim)
    cos_sin = torch.randn(64, rot_dim, generator=gen)
    positions = torch.randint(0, 64, (T,), generator=gen)
    got = rotary_embedding(positions, q, k, cos_sin)
    expected = reference.rotary_embedding(positions, q, k, cos_sin)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-3 if dtype == F16 else 1e-6, rtol=1e-3)


@pytest.mark.parametrize("dtype,inter", [(F32, 48), (F16, 1500)])
def test_silu_and_mul_matches_reference(dtype, inter):
    x = torch.randn(2, 3, 2 * inter, generator=torch.Generator().manual_seed(4)).to(dtype)
    torch.testing.assert_close(silu_and_mul(x), reference.silu_and_mul(x), atol=1e-3, rtol=1e-3)
