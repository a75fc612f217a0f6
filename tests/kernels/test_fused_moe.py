"""The fused MoE kernels (kernels/fused_moe.py) in the Triton interpreter, against
kernels/reference.py::fused_moe, the per-expert loop the CPU runs.

The data make mistakes loud: router weights drawn from 0.2..1 (a kernel that
drops them, or applies one slot's weight to the other, moves the result far),
experts whose outputs differ, several tokens per tile and N, K and T that are
multiples of no tile, so a row landing in another expert's tile, a padding row
that writes, or a slot left out of the sum shows.
test_data_would_expose_mistakes checks that those mistakes, applied to the
reference, move the result far outside the tolerances used here.
moe_align_block_size is checked against a plain Python oracle.

On a GPU machine test_gpu.py runs the compiled kernels in bf16/fp16 instead.
"""

from __future__ import annotations

import pytest
import torch

from folio.kernels import fused_moe as fm
from folio.kernels import reference
from folio.kernels.fused_moe import FusedMoEConfig, fused_moe, moe_align_block_size
from folio.kernels.interface import REFERENCE_OPS
from folio.worker.parallel import split_range

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests; test_gpu.py covers CUDA")

F32, F16 = torch.float32, torch.float16
TOL = {F32: dict(atol=1e-5, rtol=1e-5), F16: dict(atol=4e-3, rtol=1e-2)}
SMALL = FusedMoEConfig(16, 16, 32, num_warps=4, num_stages=1)  # several N and K tiles at test sizes


def make_case(t, h, inter, e, k, dtype, *, seed, ids=None, weights_dtype=F32):
    """x, w13, w2 with outputs of order 1; ids top-k-like (distinct per row) unless given."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen).to(dtype)
    w13 = (torch.randn(e, 2 * inter, h, generator=gen) * h**-0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=gen) * inter**-0.5 * 2).to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) if t else torch.empty(0, k)
    ids = ids.long()
    weights = (torch.rand(ids.shape, generator=gen) * 0.8 + 0.2).to(weights_dtype)
    return x, w13, w2, weights, ids


def check(x, w13, w2, weights, ids, config=None):
    got = fused_moe(x, w13, w2, weights, ids, config=config)
    expected = reference.fused_moe(x, w13, w2, weights, ids)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), **TOL[x.dtype])
    return got


def oracle_align(ids: torch.Tensor, e: int, bm: int) -> tuple[list[int], list[int]]:
    """The sorted list and tile experts, by loops: expert by expert, flat ids in order, padded."""
    flat = ids.flatten().tolist()
    listed, experts = [], []
    for x in range(e):
        rows = [i for i, v in enumerate(flat) if v == x]
        rows += [len(flat)] * (-len(rows) % bm)
        listed += rows
        experts += [x] * (len(rows) // bm)
    return listed, experts


@pytest.mark.parametrize(
    "t,k,e,bm",
    [(1, 2, 8, 16), (5, 2, 4, 4), (37, 2, 8, 16), (64, 8, 16, 16), (300, 2, 8, 64), (3, 4, 64, 16), (6, 2, 4, 1)],
)
def test_align_block_size_matches_oracle(t, k, e, bm):
    gen = torch.Generator().manual_seed(t * k + e)
    ids = torch.randint(0, e, (t, k), generator=gen)
    ids[:, 0] = ids[:, 0] % max(e // 2, 1)  # some experts get many rows, others none
    sorted_ids, expert_ids, num_padded = moe_align_block_size(ids, e, bm)
    listed, experts = oracle_align(ids, e, bm)
    n = int(num_padded)
    assert sorted_ids.dtype == expert_ids.dtype == num_padded.dtype == torch.int32
    assert n == len(listed) and sorted_ids.numel() == fm.padded_capacity(t * k, e, bm) >= n
    assert sorted_ids[:n].tolist() == listed
    assert (sorted_ids[n:] == t * k).all()  # the capacity past the used prefix is padding only
    assert expert_ids[: n // bm].tolist() == experts
    assert ((expert_ids >= 0) & (expert_ids < e)).all()


def test_align_block_size_duplicates_and_empty():
    ids = torch.tensor([[2, 2], [2, 0], [0, 0]])  # expert 1 and 3 empty; experts repeated within a token
    sorted_ids, expert_ids, num_padded = moe_align_block_size(ids, 4, 4)
    assert sorted_ids[: int(num_padded)].tolist() == [3, 4, 5, 6, 0, 1, 2, 6]
    assert expert_ids[:2].tolist() == [0, 2]
    ids = torch.empty(0, 2, dtype=torch.long)
    sorted_ids, _, num_padded = moe_align_block_size(ids, 4, 16)
    assert int(num_padded) == 0 and sorted_ids.numel() == 0


CASES = [
    # t, hidden, intermediate, experts, top-k, config
    pytest.param(1, 64, 32, 4, 2, None, id="decode-t1"),
    pytest.param(5, 48, 40, 8, 2, SMALL, id="t5-8experts-some-empty"),
    pytest.param(37, 80, 24, 4, 2, SMALL, id="t37-many-tiles"),
    pytest.param(300, 64, 32, 4, 2, None, id="t300-prefill"),
    pytest.param(9, 64, 16, 6, 4, SMALL, id="top4"),
]


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("t,h,inter,e,k,config", CASES)
def test_matches_reference(t, h, inter, e, k, config, dtype):
    i = t + h + inter + e + k
    # Qwen's routers hand back weights in the model dtype, Mixtral's in fp32: both are taken.
    case = make_case(t, h, inter, e, k, dtype, seed=i, weights_dtype=dtype if i % 2 else F32)
    check(*case, config=config)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
def test_same_expert_twice_and_unused_experts(dtype):
    """A token routed to one expert in both slots (top-k never does this; the
    kernel must still count it twice), and 3 of 6 experts without rows."""
    ids = torch.tensor([[1, 1], [4, 1], [4, 4], [1, 4], [0, 0]] * 4)
    check(*make_case(20, 64, 32, 6, 2, dtype, seed=7, ids=ids), config=SMALL)


def test_padding_rows_never_write():
    """Both GEMMs write exactly the routed rows' outputs: a destination one row
    longer than T*k (the sentinel's row) and NaN-filled stays NaN there."""
    t, k, e, inter = 7, 2, 4, 24
    x, w13, w2, weights, ids = make_case(t, 48, inter, e, k, F32, seed=3)
    aligned = moe_align_block_size(ids, e, SMALL.block_m)
    assert int(aligned[2]) > t * k, "the case was meant to need padding rows"
    flat_w = weights.flatten()
    cache = torch.full((t * k + 1, inter), float("nan"))
    fm.moe_gemm(x, w13, cache, flat_w, aligned, k, True, SMALL)
    out = torch.full((t * k + 1, 48), float("nan"))
    fm.moe_gemm(cache[: t * k], w2, out, flat_w, aligned, k, False, SMALL)
    assert cache[-1].isnan().all() and out[-1].isnan().all()
    assert not cache[:-1].isnan().any() and not out[:-1].isnan().any()
    torch.testing.assert_close(out[:-1].view(t, k, 48).sum(1), reference.fused_moe(x, w13, w2, weights, ids))


def test_tensor_parallel_slices_sum_to_the_whole():
    """Each rank's slice of the intermediate dim (11 of 32, not a tile
    multiple) gives a partial sum; the partials add up to the full layer."""
    x, w13, w2, weights, ids = make_case(13, 64, 32, 4, 2, F32, seed=5)
    total = torch.zeros_like(x)
    for rank in range(3):
        s, n = split_range(32, 3, rank)
        w13_r = torch.cat([w13[:, s : s + n], w13[:, 32 + s : 32 + s + n]], dim=1)  # [E, 2n, H]
        w2_r = w2[:, :, s : s + n].contiguous()  # [E, H, n]
        total += check(x, w13_r, w2_r, weights, ids, config=SMALL)
    torch.testing.assert_close(total, reference.fused_moe(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


def test_data_would_expose_mistakes():
    """What a kernel with a missed router weight, a dropped or doubled slot, or
    rows computed by the wrong expert would return lies far outside TOL."""
    x, w13, w2, weights, ids = make_case(37, 64, 32, 4, 2, F32, seed=1)
    right = reference.fused_moe(x, w13, w2, weights, ids)
    wrong = [
        reference.fused_moe(x, w13, w2, torch.ones_like(weights), ids),  # router weight missed
        reference.fused_moe(x, w13, w2, weights.flip(1), ids),  # the other slot's weight
        reference.fused_moe(x, w13, w2, weights[:, :1], ids[:, :1]),  # one slot summed
        reference.fused_moe(x, w13, w2, weights, (ids + 1) % 4),  # rows in the wrong expert's tile
    ]
    for bad in wrong:
        assert (bad - right).abs().max() > 0.1 * right.abs().max() > 0.1


def test_shapes_and_empty_batches():
    x, w13, w2, weights, ids = make_case(0, 32, 16, 4, 2, F16, seed=2)
    assert fused_moe(x, w13, w2, weights, ids).shape == (0, 32)
    x, w13, w2, weights, ids = make_case(3, 32, 16, 4, 2, F16, seed=2)
    # int32 ids, fp16 weights and a non-contiguous x (a row stride of 64) are taken
    wide = torch.zeros(3, 64, dtype=F16)
    wide[:, :32] = x
    check(wide[:, :32], w13, w2, weights.half(), ids.int())


def test_rejects_bad_inputs():
    x, w13, w2, weights, ids = make_case(3, 32, 16, 4, 2, F16, seed=4)
    with pytest.raises(ValueError, match="do not fit"):
        fused_moe(x, w13[:, :-1], w2, weights, ids)
    with pytest.raises(ValueError, match="do not fit"):
        fused_moe(x[:, :16], w13, w2, weights, ids)
    with pytest.raises(ValueError, match="share one of"):
        fused_moe(x.float(), w13, w2, weights, ids)
    with pytest.raises(ValueError, match="topk_ids and topk_weights"):
        fused_moe(x, w13, w2, weights[:, :1], ids)
    with pytest.raises(ValueError, match="integers"):
        fused_moe(x, w13, w2, weights, ids.float())
    with pytest.raises(ValueError, match="one device"):
        fused_moe(x, w13, w2, weights, ids.to("meta"))
    with pytest.raises(ValueError, match="contiguous rows"):
        fused_moe(x, w13.transpose(1, 2).contiguous().transpose(1, 2), w2, weights, ids)


def test_kernel_tables():
    from folio.kernels.triton_ops import TRITON_OPS

    assert TRITON_OPS.fused_moe is fused_moe
    assert REFERENCE_OPS.fused_moe is reference.fused_moe
    assert type(fm._fused_moe_kernel).__name__ == "InterpretedFunction"
