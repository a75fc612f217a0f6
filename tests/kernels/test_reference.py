"""The PyTorch references against plain per-token arithmetic in fp64.

The references are the CPU serving path as well as the Triton kernels' ground
truth, so their shortcuts (a decode plan shared by every layer, q and k
rotated as one tensor) are checked here against code that takes none.
"""

from __future__ import annotations

import math

import pytest
import torch

from folio.kernels import reference
from folio.kernels.interface import CPU_OPS
from folio.kernels.quant import amx_granted

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TOL = {F32: dict(atol=1e-5, rtol=1e-5), BF16: dict(atol=2e-2, rtol=2e-2)}


def _attention_per_token(case, window, softcap=None):
    """Each new token's softmax over the keys it may see, one token at a time, in fp64;
    with softcap, each visible key's scaled score capped at softcap * tanh(score / softcap)."""
    meta, bs = case.meta, case.ref_k_cache.shape[1]
    hq, hkv = case.q.shape[1], case.ref_k_cache.shape[2]
    out = torch.zeros(case.q.shape, dtype=torch.float64)
    starts = meta.query_start_loc.tolist()
    for i, (n, s) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
        table = meta.block_tables[i].tolist()
        keys = [(table[j // bs], j % bs) for j in range(s)]
        k = torch.stack([case.ref_k_cache[b, o] for b, o in keys]).double()  # [s, hkv, d]
        v = torch.stack([case.ref_v_cache[b, o] for b, o in keys]).double()
        for t in range(n):
            pos = s - n + t
            visible = [j for j in range(pos + 1) if window is None or pos - j < window]
            for h in range(hq):
                g = h // (hq // hkv)
                scores = torch.stack([case.q[starts[i] + t, h].double() @ k[j, g] * case.scale for j in visible])
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                w = torch.softmax(scores, 0)
                out[starts[i] + t, h] = (w[:, None] * v[visible, g]).sum(0)
    return out


# A cap of 1.5 bends scores of this test's size (|q.k| * scale up to ~4) hard, so
# ignoring it, or capping after the mask (hidden keys at -1.5, not -inf), fails.
SOFTCAP = 1.5


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize(
    "query_lens,context_lens,window,softcap",
    [
        pytest.param([1, 1, 1, 1], [5, 16, 17, 40], None, None, id="pure-decode"),
        pytest.param([1, 1, 1], [3, 90, 20], None, None, id="decode-length-groups"),
        pytest.param([1, 7, 1, 3], [30, 0, 2, 12], None, None, id="decode-and-prefill"),
        pytest.param([1, 1, 5], [50, 9, 20], 12, None, id="sliding-window"),
        pytest.param([1, 1, 1], [3, 90, 20], None, SOFTCAP, id="softcap-pure-decode"),
        pytest.param([1, 7, 1, 3], [30, 0, 2, 12], None, SOFTCAP, id="softcap-decode-and-prefill"),
        pytest.param([1, 1, 5], [50, 9, 20], 12, SOFTCAP, id="softcap-sliding-window"),
    ],
)
def test_paged_attention_matches_per_token_softmax(paged_case, dtype, query_lens, context_lens, window, softcap):
    case = paged_case(query_lens, context_lens, block_size=8, num_q_heads=6, num_kv_heads=2, head_dim=16, dtype=dtype)
    got = reference.paged_attention(case.q, case.ref_k_cache, case.ref_v_cache, case.meta, case.scale, window, softcap)
    assert got.dtype == dtype and got.shape == case.q.shape
    torch.testing.assert_close(got.double(), _attention_per_token(case, window, softcap), **TOL[dtype])


def test_softcap_changes_attention_and_must_be_positive(paged_case):
    """The capped cases above are not vacuous: the cap moves the outputs."""
    case = paged_case([1, 7], [30, 0], block_size=8, num_q_heads=6, num_kv_heads=2, head_dim=16, dtype=F32)
    attend = lambda softcap: reference.paged_attention(  # noqa: E731
        case.q, case.ref_k_cache, case.ref_v_cache, case.meta, case.scale, None, softcap
    )
    assert (attend(SOFTCAP) - attend(None)).abs().max() > 0.1
    with pytest.raises(ValueError, match="softcap"):
        attend(0.0)


def test_bf16_decode_rounds_once(paged_case):
    """A bf16 pool's decode rows compute in fp32 and round only the output:
    nearly every element equals the fp64 answer rounded to bf16. (torch's bf16
    SDPA, which rounds the softmax weights too, matched on about two thirds.)"""
    case = paged_case(
        [1, 1, 1, 1], [5, 16, 17, 40], block_size=8, num_q_heads=6, num_kv_heads=2, head_dim=16, dtype=BF16
    )
    got = reference.paged_attention(case.q, case.ref_k_cache, case.ref_v_cache, case.meta, case.scale)
    exact = _attention_per_token(case, None).to(BF16)
    assert (got == exact).float().mean() > 0.99


@pytest.mark.parametrize("pool_dtype,compute_dtype", [(BF16, F32), (BF16, BF16), (F16, F32)])
@pytest.mark.parametrize(
    "query_lens,context_lens,window",
    [
        pytest.param([1, 1, 1, 1], [5, 16, 17, 40], None, id="pure-decode"),
        pytest.param([1, 1, 1], [3, 90, 20], None, id="decode-length-groups"),
        pytest.param([1, 7, 1, 3], [30, 0, 2, 12], None, id="decode-and-prefill"),
        pytest.param([1, 1, 5], [50, 9, 20], 12, id="sliding-window"),
    ],
)
def test_a_float32_model_over_a_16_bit_pool(paged_case, pool_dtype, compute_dtype, query_lens, context_lens, window):
    """A 16-bit pool beside a float32 model: fp32 queries over bf16 or fp16 K/V, the
    attention in fp32, or over bf16 K/V in bf16 (where the CPU has AMX), the output in
    fp32 and within the compute dtype's rounding of the exact answer over the pool's
    (rounded) K/V."""
    case = paged_case(query_lens, context_lens, block_size=8, num_q_heads=6, num_kv_heads=2, head_dim=16, dtype=F32)
    case.ref_k_cache, case.ref_v_cache = case.ref_k_cache.to(pool_dtype), case.ref_v_cache.to(pool_dtype)
    got = reference.paged_attention(
        case.q, case.ref_k_cache, case.ref_v_cache, case.meta, case.scale, window, compute_dtype=compute_dtype
    )
    assert got.dtype == F32 and got.shape == case.q.shape
    expected = _attention_per_token(case, window)
    torch.testing.assert_close(got.double(), expected, **TOL[compute_dtype])
    # Softcapped scores are computed in fp32 whatever the compute dtype.
    capped = reference.paged_attention(
        case.q, case.ref_k_cache, case.ref_v_cache, case.meta, case.scale, window, SOFTCAP, compute_dtype=compute_dtype
    )
    torch.testing.assert_close(capped.double(), _attention_per_token(case, window, SOFTCAP), **TOL[F32])


def test_an_fp16_pool_strays_less_from_the_unrounded_kv_than_a_bf16_pool(paged_case):
    """Why a kept-quantized float32 model's CPU pool is fp16 where attention computes in
    fp32 (worker.kv_cache_dtype): bf16's bytes, three more mantissa bits, so attention
    over it strays several times less from attention over the unrounded K/V."""
    case = paged_case([1, 1, 5], [40, 90, 20], block_size=8, num_q_heads=6, num_kv_heads=2, head_dim=16, dtype=F32)
    exact = _attention_per_token(case, None)
    errors = {}
    for pool_dtype in (BF16, F16):
        k, v = case.ref_k_cache.to(pool_dtype), case.ref_v_cache.to(pool_dtype)
        got = reference.paged_attention(case.q, k, v, case.meta, case.scale, compute_dtype=F32)
        errors[pool_dtype] = (got.double() - exact).abs().mean().item()
    assert errors[F16] < errors[BF16] / 4, errors


@pytest.mark.parametrize("pool_dtype", [F32, BF16, F16])
def test_cpu_attention_computes_a_bf16_pool_in_bf16_only_where_the_cpu_has_amx(paged_case, pool_dtype):
    """folio's CPU kernels (CPU_OPS) attend over a bf16 pool in bf16 where torch runs it on
    AMX, and over every other pool (fp16 included) in fp32: exactly the reference in the
    dtype so chosen."""
    case = paged_case([1, 1, 4], [20, 33, 9], block_size=8, num_q_heads=4, num_kv_heads=2, head_dim=16, dtype=F32)
    k, v = case.ref_k_cache.to(pool_dtype), case.ref_v_cache.to(pool_dtype)
    got = reference.cpu_paged_attention(case.q, k, v, case.meta, case.scale)
    chosen = BF16 if pool_dtype == BF16 and amx_granted() else F32
    attend = lambda dt: reference.paged_attention(case.q, k, v, case.meta, case.scale, compute_dtype=dt)  # noqa: E731
    torch.testing.assert_close(got, attend(chosen), rtol=0, atol=0)
    if pool_dtype == BF16:  # the two dtypes differ, so the equality above says which one ran
        assert not torch.equal(attend(BF16), attend(F32))
    torch.testing.assert_close(CPU_OPS.paged_attention(case.q, k, v, case.meta, case.scale), got, rtol=0, atol=0)


def test_decode_plan_is_built_once_per_step_and_per_window(paged_case):
    """Every layer passes the same metadata: the gather indices and masks are
    derived once and reused, and a layer with another window gets its own."""
    case = paged_case([1, 1, 1], [4, 20, 33], block_size=8, num_q_heads=4, num_kv_heads=2, head_dim=8, dtype=F32)
    attend = lambda window: reference.paged_attention(  # noqa: E731
        case.q, case.ref_k_cache, case.ref_v_cache, case.meta, case.scale, window
    )
    first = attend(None)
    assert len(case.meta.derived) == 1
    (plan,) = case.meta.derived.values()
    torch.testing.assert_close(attend(None), first, rtol=0, atol=0)
    assert next(iter(case.meta.derived.values())) is plan
    attend(10)
    assert len(case.meta.derived) == 2


def test_layers_sharing_a_plan_gather_into_its_buffers_and_each_sees_its_own_cache(paged_case):
    """The plan's gather buffers are reused by every layer of the step: a second layer
    (another cache, same metadata) must read its own K/V, not what the first left there,
    and the first layer's output must not change when the buffers are overwritten."""
    case = paged_case([1, 1, 1], [4, 20, 33], block_size=8, num_q_heads=4, num_kv_heads=2, head_dim=8, dtype=F32)
    other_k, other_v = torch.randn_like(case.ref_k_cache), torch.randn_like(case.ref_v_cache)
    first = reference.paged_attention(case.q, case.ref_k_cache, case.ref_v_cache, case.meta, case.scale)
    kept = first.clone()
    second = reference.paged_attention(case.q, other_k, other_v, case.meta, case.scale)
    (plan,) = case.meta.derived.values()
    assert all(g.scratch is not None for g in plan)
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    torch.testing.assert_close(first, _attention_per_token(case, None).float(), **TOL[F32])
    case.ref_k_cache, case.ref_v_cache = other_k, other_v
    torch.testing.assert_close(second, _attention_per_token(case, None).float(), **TOL[F32])


def _rope_per_element(positions, x, cos_sin_cache):
    """Hugging Face's rotate-half formula, spelled out per feature pair in fp64."""
    half = cos_sin_cache.shape[-1] // 2
    out = x.double().clone()
    for t, p in enumerate(positions.tolist()):
        for j in range(half):
            c, s = cos_sin_cache[p, j].double(), cos_sin_cache[p, half + j].double()
            a, b = x[t, :, j].double(), x[t, :, half + j].double()
            out[t, :, j], out[t, :, half + j] = a * c - b * s, b * c + a * s
    return out


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("rot_dim", [16, 8], ids=["full", "partial"])
@pytest.mark.parametrize("T", [5, 1], ids=["tokens", "one-token"])
def test_rotary_on_a_fused_qkv_output_matches_separate_heads(dtype, rot_dim, T):
    """q and k cut from one fused projection are rotated as one tensor; the
    result equals rotating contiguous copies, and the per-element formula."""
    gen = torch.Generator().manual_seed(0)
    hq, hkv, d = 6, 2, 16
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=gen).to(dtype)
    q, k, _ = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
    q, k = q.view(T, hq, d), k.view(T, hkv, d)
    # one token's views have different row strides (torch picks any for a size-1 dim)
    assert reference._adjacent_heads(q, k) is not None
    positions = torch.tensor([0, 3, 17, 4, 63])[-T:]
    freqs = torch.arange(rot_dim // 2) / (rot_dim // 2)
    angles = torch.arange(64)[:, None] * 10000.0 ** (-freqs)[None, :]
    cache = torch.cat((angles.cos(), angles.sin()), dim=-1)

    fused_q, fused_k = reference.rotary_embedding(positions, q, k, cache)
    apart_q, apart_k = reference.rotary_embedding(positions, q.clone(), k.clone(), cache)
    assert reference._adjacent_heads(q.clone(), k.clone()) is None
    torch.testing.assert_close(fused_q, apart_q, rtol=0, atol=0)
    torch.testing.assert_close(fused_k, apart_k, rtol=0, atol=0)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == F32 else dict(atol=4e-2, rtol=1e-2)
    for got, x in ((fused_q, q), (fused_k, k)):
        expected = _rope_per_element(positions, x, cache)
        torch.testing.assert_close(got.double(), expected, **tol)
        # features past rot_dim pass through untouched
        torch.testing.assert_close(got[..., rot_dim:], x[..., rot_dim:], rtol=0, atol=0)


def test_rms_norm_matches_the_formula():
    gen = torch.Generator().manual_seed(1)
    x, res, w = (torch.randn(3, 32, generator=gen) for _ in range(3))
    w = w[0]
    normed, new_res = reference.rms_norm(x, w, 1e-6, res)
    h = (x + res).double()
    expected = w.double() * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(new_res, x + res, rtol=0, atol=0)
    torch.testing.assert_close(normed.double(), expected, atol=1e-5, rtol=1e-5)
    assert not math.isnan(normed.sum().item())
