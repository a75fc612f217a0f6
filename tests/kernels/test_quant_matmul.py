"""The quantized matmul kernel (kernels/quant_matmul.py) in the Triton interpreter.

Every case is checked twice: against folio.kernels.quant.dequantized_linear (same
rounding of the weights to the compute dtype, so tolerances are tight), and
against an fp64 matmul of QuantizedTensor.dequantize() with an error bound
derived from the magnitudes of x and w, so that a kernel agreeing with a
wrong reference cannot pass either.

The data make layout mistakes loud: random codes over the whole range (an
even column and its odd neighbour almost never agree, so a swapped nibble
order changes most weights), and scales and zeros that differ from group to
group by up to 3x, so a wrong k // group picks a visibly wrong scale. N = 40
is a multiple of no N tile; T in {0, 1, 5, 37} covers the empty call, the
decode config and, for 37, the prefill config and several M tiles.
test_data_would_expose_layout_mistakes shows that those mistakes move the
result far outside the tolerances used here.

On a GPU machine test_gpu.py runs the compiled kernel in bf16/fp16 instead.
"""

from __future__ import annotations

import pytest
import torch

from folio.kernels import quant_matmul, reference
from folio.kernels.interface import REFERENCE_OPS
from folio.kernels.quant import QuantizedTensor, QuantizedWeight, dequantized_linear
from folio.kernels.quant_matmul import QuantMatmulConfig, quantized_linear

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests; test_gpu.py covers CUDA")

F32, F16 = torch.float32, torch.float16
N, K = 40, 256
TOKENS = (0, 1, 5, 37)
# Relative error of one weight rounded to the compute dtype (scale, zero and
# the result each round once), and of the fp32 accumulation.
WEIGHT_EPS = {F32: 1e-6, F16: 2.0**-9}


def make_weight(bits: int, group: int, n: int, k: int, *, perm: bool, seed: int) -> QuantizedTensor:
    """Codes over the whole range; scales 0.5..1.5 of a size that keeps
    outputs near 1, zeros of either sign, both different in every group."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    unit = 1.0 / ((1 << (bits - 1)) * k**0.5)
    scale = (torch.rand(n, k // group, generator=gen) + 0.5) * unit
    zero = torch.randn(n, k // group, generator=gen) * unit
    order = torch.randperm(k, generator=gen) if perm else None
    return QuantizedTensor(codes, scale, zero, bits, group, order)


def nan_padded(t: torch.Tensor) -> torch.Tensor:
    """t as a view into a larger NaN-filled tensor (a row and a few columns more),
    so that a kernel reading past its rows or columns returns NaN."""
    big = torch.full([d + 3 for d in t.shape], float("nan"), dtype=t.dtype)
    view = big[tuple(slice(0, d) for d in t.shape)]
    view.copy_(t)
    return view


def device_weight(qt: QuantizedTensor, dtype) -> QuantizedWeight:
    w = QuantizedWeight(qt, dtype, "cpu")
    w.scale, w.zero = nan_padded(w.scale), nan_padded(w.zero)
    return w


def inputs(t: int, k: int, n: int, dtype, *, bias: bool, seed: int):
    gen = torch.Generator().manual_seed(seed + 1000)
    x = nan_padded(torch.randn(t, k, generator=gen).to(dtype))
    b = nan_padded((torch.randn(n, generator=gen) * 0.1).to(dtype)) if bias else None
    return x, b


def assert_matches(got: torch.Tensor, qt: QuantizedTensor, w: QuantizedWeight, x, bias, dtype):
    """got against the same-dtype reference and against fp64 within an error bound."""
    assert got.dtype == dtype and got.shape == (x.shape[0], qt.shape[0])
    assert not got.isnan().any()
    expected = dequantized_linear(x, w, bias)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == F32 else dict(atol=4e-3, rtol=1e-2)
    torch.testing.assert_close(got, expected, **tol)

    # fp64: |error| <= eps * (|x| @ (|q - mid| |s| + |z|)^T) + output rounding.
    exact = qt.dequantize().double()
    y64 = x.double() @ exact.T + (bias.double() if bias is not None else 0.0)
    mid = 1 << (qt.bits - 1)
    mag = (qt.codes.double() - mid).abs().view(qt.shape[0], -1, qt.group) * qt.scale.double().abs().unsqueeze(-1)
    mag = (mag + qt.zero.double().abs().unsqueeze(-1)).view(qt.shape)
    if qt.perm is not None:
        unpermuted = torch.empty_like(mag)
        unpermuted[:, qt.perm] = mag
        mag = unpermuted
    out_eps = 1e-7 if dtype == F32 else 2.0**-11
    bound = WEIGHT_EPS[dtype] * (x.double().abs() @ mag.T) + out_eps * y64.abs() + 1e-6
    err = (got.double() - y64).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


# (bits, group) over every bit width x every group; bias and perm vary with the
# case so that each bit width and each group meets both with and without.
GRID = [(bits, group) for bits in (4, 8, 6, 3) for group in (16, 32, 128, K)]


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("bits,group", GRID, ids=[f"{b}bit-g{g}" for b, g in GRID])
def test_matches_references(bits, group, dtype):
    i = GRID.index((bits, group))
    bias, perm = (i + bits) % 2 == 0, (i // 2 + bits) % 2 == 0
    qt = make_weight(bits, group, N, K, perm=perm, seed=i)
    w = device_weight(qt, dtype)
    assert w.codes is not None and w.codes.shape[1] == (K // 2 if bits == 4 else K)
    for t in TOKENS:
        x, b = inputs(t, K, N, dtype, bias=bias, seed=i)
        assert_matches(quantized_linear(x, w, b), qt, w, x, b, dtype)


@pytest.mark.parametrize(
    "bits,group,k,dtype,config",
    [
        # 48: groups start mid-step (per-element lookup), and K = 144 is a
        # multiple of no K step (the masked last step).
        pytest.param(4, 48, 144, F32, None, id="4bit-g48-k144-f32"),
        pytest.param(5, 48, 144, F16, QuantMatmulConfig(16, 16, 64, 4, 1), id="5bit-g48-k144-f16-small-tiles"),
        # 96 = 3 x 32: the step narrows to 32 and K = 192 takes 6 of them.
        pytest.param(4, 96, 192, F16, None, id="4bit-g96-step-narrowed"),
        # two groups per 128-wide step
        pytest.param(4, 64, 256, F16, QuantMatmulConfig(16, 32, 128, 4, 1), id="4bit-g64-two-groups-per-step"),
        # group 16, several M and N tiles at once, 2-bit codes.
        pytest.param(2, 16, 64, F32, QuantMatmulConfig(16, 16, 32, 4, 1), id="2bit-g16-many-tiles"),
        pytest.param(7, 32, 96, F16, QuantMatmulConfig(16, 16, 64, 4, 1), id="7bit-g32-k96-f16"),
    ],
)
def test_groups_across_tile_edges(bits, group, k, dtype, config):
    for seed, (perm, bias) in enumerate(((False, True), (True, False))):
        qt = make_weight(bits, group, N, k, perm=perm, seed=seed)
        w = device_weight(qt, dtype)
        for t in (1, 37):
            x, b = inputs(t, k, N, dtype, bias=bias, seed=seed)
            assert_matches(quantized_linear(x, w, b, config=config), qt, w, x, b, dtype)


def test_block_k_and_group_path():
    def path(block_k, k, group):
        bk = quant_matmul.block_k_for(block_k, k, group)
        return bk, quant_matmul.groups_per_step(group, bk)

    assert path(128, 4096, 128) == (128, 1)  # one scale per step
    assert path(128, 4096, 4096) == (128, 1)
    assert path(128, 4096, 32) == (128, 4)  # whole groups per step
    assert path(64, 4096, 16) == (64, 4)
    assert path(128, 144, 48) == (64, 0)  # groups start mid-step: lookup, step at most 64
    assert path(128, 192, 96) == (32, 1)  # 96 = 3 x 32: narrowed to one scale per step
    assert path(128, 64, 64) == (64, 1)  # never wider than K


def test_data_would_expose_layout_mistakes():
    """What a kernel with the nibbles swapped or a wrong group index would
    return (the reference on weights altered the same way) lies far outside
    the tolerances above, at the bit widths and groups the tests use."""
    cols = torch.arange(K)
    x, _ = inputs(5, K, N, F32, bias=False, seed=0)
    for bits in (4, 3, 8):
        for group in (16, 32, 128):
            qt = make_weight(bits, group, N, K, perm=False, seed=bits + group)
            right = dequantized_linear(x, QuantizedWeight(qt, F32, "cpu"))
            wrong_groups = [(cols // group + 1) % (K // group)]  # the next group over
            if group < 128:
                wrong_groups.append(cols // 128 * (128 // group))  # one group per 128-wide step
            # group 1 gives every column its own scale: any column -> group map
            wrong = [QuantizedTensor(qt.codes, qt.scale[:, g], qt.zero[:, g], bits, 1) for g in wrong_groups]
            if bits == 4:
                swapped = torch.stack((qt.codes[:, 1::2], qt.codes[:, 0::2]), dim=-1).view(N, K)
                wrong.append(QuantizedTensor(swapped, qt.scale, qt.zero, bits, group))
            for bad in wrong:
                off = dequantized_linear(x, QuantizedWeight(bad, F32, "cpu"))
                assert (off - right).abs().max() > 0.1 * right.abs().max() > 0.1


def test_shapes_and_empty_batches():
    qt = make_weight(4, 32, N, 64, perm=True, seed=3)
    w = QuantizedWeight(qt, F16, "cpu")
    x = torch.randn(2, 3, 64).to(F16)
    got = quantized_linear(x, w)
    assert got.shape == (2, 3, N)
    torch.testing.assert_close(got, dequantized_linear(x, w), atol=4e-3, rtol=1e-2)
    assert quantized_linear(torch.empty(0, 64, dtype=F16), w).shape == (0, N)
    # x in another float dtype is cast to the weight's, as the reference does
    x32 = torch.randn(4, 64)
    torch.testing.assert_close(quantized_linear(x32, w), dequantized_linear(x32, w), atol=4e-3, rtol=1e-2)


def test_rejects_bad_inputs():
    qt = make_weight(4, 32, N, 64, perm=False, seed=4)
    w = QuantizedWeight(qt, F16, "cpu")
    x = torch.randn(3, 64).to(F16)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 64\]"):
        quantized_linear(x[:, :32], w)
    with pytest.raises(ValueError, match="floating point"):
        quantized_linear(x.to(torch.int32), w)
    with pytest.raises(ValueError, match="bias"):
        quantized_linear(x, w, torch.zeros(N + 1, dtype=F16))
    with pytest.raises(ValueError, match="bias"):
        quantized_linear(x, w, torch.zeros(N, dtype=F32))
    with pytest.raises(ValueError, match="one device"):
        quantized_linear(x.to("meta"), w)
    with pytest.raises(ValueError, match="QuantizedWeight"):
        quantized_linear(x, qt)
    # CPU bf16 at an int4pack group keeps only torch's packed form: nothing for the kernel.
    packed = QuantizedWeight(make_weight(4, 32, 48, 64, perm=False, seed=5), torch.bfloat16, "cpu")
    assert packed.codes is None
    with pytest.raises(ValueError, match="int4pack"):
        quantized_linear(x.bfloat16(), packed)


def test_kernel_tables():
    from folio.kernels.triton_ops import TRITON_OPS

    assert TRITON_OPS.quantized_linear is quantized_linear
    assert REFERENCE_OPS.quantized_linear is reference.quantized_linear
    assert type(quant_matmul._quant_matmul_kernel).__name__ == "InterpretedFunction"
