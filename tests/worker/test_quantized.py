"""Weights kept quantized: GGUF blocks decoded without dequantizing, the one
group-quantized form (kernels/quant.py), its CPU matmuls, tensor-parallel cuts,
and whole models that keep their weights quantized.

The references are independent of folio's decoding: gguf-py's own
dequantizers for the block layouts, an fp64 matmul of the dequantized weight
for the kernels, and folio's dense path (itself checked against transformers
in test_models.py) for whole models.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.quants import dequantize

from folio.kernels import quant, reference
from folio.kernels.interface import CPU_OPS, REFERENCE_OPS
from folio.kernels.quant import (
    QuantizedTensor,
    QuantizedWeight,
    dequantized_linear,
    int4pack_block_n,
    wide_path,
)
from folio.kernels.reference import quantized_linear
from folio.worker.gguf_quant import KEPT_QUANTIZED, quantized_tensor
from folio.worker.loader import keep_quantized, load_model
from folio.worker.parallel import PackedWeight, TPGroup
from folio.worker.worker import kv_cache_dtype
from tests.gguf_fixtures import make_tiny_quantized_gguf, random_gguf_blocks
from tests.model_fixtures import smollm2_path
from tests.worker.test_models import _Pool, _Seq

# ------------------------------------------------------------------ GGUF blocks


@pytest.mark.parametrize("qtype", KEPT_QUANTIZED)
def test_gguf_blocks_decode_to_gguf_py_values(qtype):
    """Every code, scale and zero lands where gguf-py's dequantizer puts it: the
    32-wide types to the bit, K-quants (whose scale and min combine in another
    order) to fp32 rounding."""
    t = gguf.GGMLQuantizationType[qtype]
    rows, cols = 24, 512
    blocks = random_gguf_blocks(t, rows, cols, np.random.default_rng(len(qtype)))
    want = torch.from_numpy(dequantize(blocks, t).reshape(rows, cols).astype(np.float32))
    got = quantized_tensor(blocks, t, rows, cols)
    assert got.shape == (rows, cols) and int(got.codes.max()) < (1 << got.bits)
    if qtype.endswith("_K"):
        torch.testing.assert_close(got.dequantize(), want, rtol=0, atol=want.abs().max().item() * 2**-22)
    else:
        assert torch.equal(got.dequantize(), want)


def test_gguf_blocks_of_the_wrong_size_are_refused():
    t = gguf.GGMLQuantizationType.Q4_K
    blocks = random_gguf_blocks(t, 4, 256, np.random.default_rng(0))
    with pytest.raises(ValueError, match="not \\[4, 512\\]"):
        quantized_tensor(blocks, t, 4, 512)
    assert quantized_tensor(blocks, gguf.GGMLQuantizationType.Q2_K, 4, 256) is None  # left to dequantize


# ------------------------------------------------------------------ the form and its matmul


def _random(
    bits: int, group: int, n: int = 64, k: int = 256, perm: bool = False, seed: int = 0, symmetric: bool = False
) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    return QuantizedTensor(
        torch.randint(0, 1 << bits, (n, k), generator=g).to(torch.uint8),
        torch.rand(n, k // group, generator=g) * 0.02,
        torch.randn(n, k // group, generator=g) * (0 if symmetric else 0.02),
        bits,
        group,
        torch.randperm(k, generator=g) if perm else None,
    )


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 32), (6, 16), (5, 64), (3, 32), (2, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 40, 200])  # 200: past every CPU's wide_path().rows
@pytest.mark.parametrize("ops", [REFERENCE_OPS, CPU_OPS], ids=lambda ops: ops.name)
def test_quantized_linear_matches_fp64_of_the_dequantized_weight(bits, group, dtype, rows, ops):
    t = _random(bits, group, perm=bits == 4 and group == 128)
    w = QuantizedWeight(t, dtype, "cpu", int4pack_dtypes=ops.int4pack_dtypes)
    # torch's int4 kernel takes every group that fits it, in bf16 and (CPU_OPS) in fp32
    # compute too; wider codes as two 4-bit terms, which must still centre each term.
    int4 = dtype in ops.int4pack_dtypes and group >= 32
    assert (w.int4pack is not None) == int4
    # torch's packed form carries the scales and zeros: nothing else of the weight is kept
    assert not int4 or (w.codes, w.scale, w.zero) == (None, None, None)
    assert rows < 200 or rows >= wide_path().rows
    g = torch.Generator().manual_seed(rows)  # fixed inputs: the bf16 bound holds for these, not for every draw
    x = torch.randn(rows, 256, generator=g)
    bias = torch.randn(64, generator=g)
    want = x.double() @ t.dequantize().double().T + bias.double()
    got = quantized_linear(x.to(dtype), w, bias.to(dtype))
    assert got.dtype == dtype
    # exact to fp32 rounding unless something rounds to bf16: the kernel's inputs, or bf16 compute
    tol = 1e-6 if dtype == torch.float32 and not int4 else 1e-2
    assert (got.double() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("gemm", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,rows", [(4, 96), (4, 32), (8, 64), (6, 32)])
def test_wide_batches_decode_torchs_packed_int4_weight(bits, rows, gemm):
    """From wide_path().rows rows a bf16 CPU matmul decodes torch's packed int4 form
    and runs fp32 GEMMs, or bf16 ones where AMX runs them: every code must come back
    to its row and column, where a wrong layout gives errors the size of the weights.
    4-bit codes: against fp64 with the same bf16 scales and zeros (in bf16: of the
    decoded weight rounded to bf16), exact to the GEMM's rounding. Wider codes (two
    4-bit terms): against the fp32 weight, to the bf16 rounding of their scales.
    Sizes span several of the dequantized slices."""
    assert int4pack_block_n() in (32, 64), "torch's packed int4 layout changed: wide batches fall back"
    t = _random(bits, 32, n=rows * 32, k=512)
    w = QuantizedWeight(t, torch.bfloat16, "cpu")
    x = torch.randn(163, 512, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = w.int4pack_dense_matmul(x, gemm)
    assert got.dtype == gemm and got.shape == (163, rows * 32)
    if bits == 4:
        scale, zero = w.int4pack_sz.double().unbind(-1)  # [K/32, N]: what the packed form decodes with
        dense = ((t.codes.double().view(-1, 16, 32) - 8) * scale.T[..., None] + zero.T[..., None]).view(-1, 512)
        # bf16: the weight's and the output's bf16 rounding, 2^-9 each
        want, tol = x.double() @ dense.to(gemm).double().T, 1e-5 if gemm == torch.float32 else 4e-3
    else:
        want, tol = x.double() @ t.dequantize().double().T, 1e-2
    assert (got.double() - want).abs().max() <= tol * want.abs().max()
    # through quantized_linear: the wide path agrees with the kernel's rows
    few = quantized_linear(x[:8], w).float()
    torch.testing.assert_close(quantized_linear(x, w)[:8].float(), few, rtol=0, atol=0.02 * few.abs().max().item())


def test_16_bit_cpu_gemms_see_rows_in_multiples_of_a_bucket():
    """oneDNN builds a kernel for each row count it meets (4 ms where the product takes
    0.4): past GEMM_ROW_BUCKET rows a 16-bit CPU GEMM gets its rows zero-padded to a
    multiple of it, and the product's first rows are the unpadded product's."""
    b = quant.GEMM_ROW_BUCKET
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * b + 5, 64, generator=g).bfloat16()
    padded = quant.gemm_rows(x)
    assert padded.shape == (3 * b, 64)
    assert torch.equal(padded[: x.shape[0]], x) and not padded[x.shape[0] :].any()
    for same in (x[:b], x[: 2 * b], x.float(), x.view(1, *x.shape)):  # few row counts, fp32 (MKL), not [T, K]
        assert quant.gemm_rows(same) is same
    w, bias = torch.randn(96, 64, generator=g).bfloat16(), torch.randn(96, generator=g).bfloat16()
    got = quant.linear(x, w, bias)
    assert got.shape == (x.shape[0], 96)
    want = x.double() @ w.double().T + bias.double()
    assert (got.double() - want).abs().max() <= 1e-2 * want.abs().max()  # bf16 output rounding


@pytest.mark.parametrize("bits,rows", [(4, 208), (8, 1040)])  # each ends in a part of a row block
def test_packing_a_slice_of_rows_at_a_time_gives_the_whole_weights_bytes(bits, rows, monkeypatch):
    """torch's packing op widens codes to int32: folio packs INT4PACK_ROWS rows at a time
    (SmolLM2's 8-bit embedding table would take 226 MB at once), which must give the bytes
    one call on the whole weight gives."""
    t = _random(bits, 32, n=rows)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    monkeypatch.setattr(quant, "INT4PACK_ROWS", 64)
    w = QuantizedWeight(t, torch.bfloat16, "cpu")
    if bits == 4:
        want = whole(t.codes.to(torch.int32), 1)
    else:  # two 4-bit terms, high codes re-centred (QuantizedWeight._pack_int4)
        want = whole(torch.cat((t.codes >> 4, t.codes & 15), dim=1).to(torch.int32), 1)
    assert w.int4pack_terms == (1 if bits == 4 else 2) and torch.equal(w.int4pack, want)


def test_embedding_rows_dequantize_exactly():
    t = _random(8, 32)
    w = QuantizedWeight(t, torch.float32, "cpu", gather=True)
    ids = torch.tensor([5, 0, 63, 5])
    assert torch.equal(w.dequantize(ids), t.dequantize()[ids])


_table_path = quant.table_path.__wrapped__  # under functools.cache; _as_cpu replaces it


def _as_cpu(monkeypatch, cpu: str) -> quant.TablePath:
    """Make folio's CPU probes answer as on `cpu` (amx, avx512_bf16, avx2 or avx512:
    AVX-512 without BF16) and return that CPU's table path."""
    monkeypatch.setattr(quant, "amx_granted", lambda: cpu == "amx")
    monkeypatch.setattr(reference, "amx_granted", lambda: cpu == "amx")
    monkeypatch.setattr(quant, "bf16_dot_products", lambda: cpu in ("amx", "avx512_bf16"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2" if cpu == "avx2" else "AVX512")
    path = _table_path()
    monkeypatch.setattr(quant, "table_path", lambda: path)
    monkeypatch.setattr(reference, "table_path", lambda: path)
    return path


CPUS = ["amx", "avx512_bf16", "avx2", "avx512"]


@pytest.mark.parametrize("cpu", CPUS)
@pytest.mark.parametrize("bits", [4, 8])
def test_a_float32_models_top_logits_are_float32_where_the_int4_kernel_rounds(bits, cpu, monkeypatch):
    """In a float32 model torch's int4 kernel still returns bf16 logits (a grid of
    0.125 at 20, where the top two often tie), as does the GEMM over an 8-bit head's
    bf16 copy (where bf16 is native); each row's top EXACT_TOP_LOGITS are recomputed
    from the dequantized rows, the rest keep the kernel's rounding."""
    from folio.worker.parallel import EXACT_TOP_LOGITS, VocabParallelEmbedding

    path = _as_cpu(monkeypatch, cpu)
    vocab, hidden, rows = 512, 256, 70  # 70 rows: more than one refined chunk
    t = _random(bits, 32, n=vocab, k=hidden, symmetric=True)  # as Q8_0
    head = VocabParallelEmbedding(vocab, hidden, TPGroup(), torch.float32, "cpu", CPU_OPS)
    head.load(0, "weight", t)
    assert head.weight.rounds_to_bf16()
    assert (head.weight.runs[0].bf16_copy is not None) == (bits == 8 and path.copy)
    h = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(1)) * 40
    got = head.logits(h)
    want = h.double() @ t.dequantize().double().T
    top = head.weight(h).float().topk(EXACT_TOP_LOGITS, dim=-1).indices  # the kernel's top
    torch.testing.assert_close(got.gather(1, top).double(), want.gather(1, top), rtol=1e-5, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    rest = torch.ones_like(got, dtype=torch.bool).scatter_(1, top, False)
    assert torch.equal(got[rest], head.weight(h).float()[rest])  # elsewhere the kernel's bf16


@pytest.mark.parametrize("cpu", CPUS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 32), (6, 64)])
def test_an_embedding_table_of_wide_codes_keeps_an_exact_bf16_copy_where_steps_multiply_faster_through_it(
    bits, group, dtype, cpu, monkeypatch
):
    """Codes wider than 4 bits cost torch's int4 kernel two terms. Where a bf16 GEMM is
    faster for some steps (table_path), an embedding table (kept codes for gathers, the
    packed form for the tied LM head's matmul) holds a bf16 copy in place of the codes
    and reads its rows back from it to the bit: with AMX the copy replaces the packed
    form too (no more bytes), with AVX512-BF16 alone the packed form stays for steps of
    up to INT4_TERMS_MAX_ROWS rows, with AVX2 the copy serves steps of up to
    BF16_GEMV_MAX_ROWS. Elsewhere, and for 4-bit codes, nothing changes."""
    path = _as_cpu(monkeypatch, cpu)
    monkeypatch.setattr(quant, "BF16_COPY_CHUNK", 3 * 256)  # made (and checked) a slice of rows at a time
    t = _random(bits, group, n=512, symmetric=True)  # as Q8_0, Q6_K and symmetric GPTQ
    t.scale[-3:] = 0  # vocabulary padding: zero rows whatever their codes
    t.zero[-3:] = 0
    want = quant._dequantize(t.codes, t.scale.to(dtype), t.zero.to(dtype), bits, None, dtype)

    w = QuantizedWeight(t, dtype, "cpu", gather=True, int4pack_dtypes=CPU_OPS.int4pack_dtypes)
    copied = bits > 4 and path.copy
    assert (w.bf16_copy is not None) == copied
    ids = torch.tensor([7, 0, 511, 7, 300])
    assert torch.equal(w.dequantize(ids), want[ids]) and torch.equal(w.dequantize(), want)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(4))
    exact = x.double() @ want.double().T
    for rows in (1, 5, 40):  # over a copy: torch.mv, the transposed product, oneDNN's GEMM
        got = quantized_linear(x[:rows], w)
        assert got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got.double(), exact[:rows], rtol=0, atol=0.01 * exact.abs().max().item())
    if not copied:
        return
    assert w.codes is None and torch.equal(w.bf16_copy, want.bfloat16())
    assert (w.int4pack is None) == (cpu == "amx")
    gemm = F.linear(x.bfloat16(), w.bf16_copy).to(dtype)  # each form's sums, rounded to bf16 once
    for rows in (1, 2, 3, 4, 5, 40):
        got = quantized_linear(x[:rows], w)
        if w.int4pack is not None and not path.copy_for(rows):
            assert torch.equal(got, w.int4pack_matmul(x[:rows]))  # the packed form's terms
        else:
            torch.testing.assert_close(got, gemm[:rows], rtol=2**-7, atol=1e-6)
    _as_cpu(monkeypatch, "avx512")
    plain = QuantizedWeight(t, dtype, "cpu", gather=True, int4pack_dtypes=CPU_OPS.int4pack_dtypes)
    assert plain.bf16_copy is None and plain.codes is not None
    if cpu == "amx":  # the copy in place of the codes and the packed form, in no more bytes
        assert _bytes(w) <= _bytes(plain)
    else:  # the copy (two bytes a weight) in place of the codes (one)
        assert _bytes(w) - _bytes(plain) == w.bf16_copy.numel()
    assert QuantizedWeight(t, dtype, "cpu", int4pack_dtypes=CPU_OPS.int4pack_dtypes).bf16_copy is None  # not a table


def test_a_bf16_copy_whose_codes_do_not_read_back_is_not_kept(monkeypatch):
    """Far from zero (an asymmetric 8-bit scheme's large zero point), bf16's 8 significant
    bits no longer pin the code: the table keeps its codes and packed form."""
    monkeypatch.setattr(quant, "amx_granted", lambda: True)
    t = _random(8, 32, n=64, symmetric=True)
    t.zero.fill_(1000.0 * t.scale.max().item())
    w = QuantizedWeight(t, torch.float32, "cpu", gather=True, int4pack_dtypes=CPU_OPS.int4pack_dtypes)
    assert w.bf16_copy is None and w.codes is not None and w.int4pack is not None
    assert torch.equal(w.dequantize(), t.dequantize())


def test_tensor_parallel_column_cuts_keep_whole_groups():
    t = _random(4, 32)
    right = t.columns(128, 128)
    assert torch.equal(right.dequantize(), t.dequantize()[:, 128:])
    with pytest.raises(ValueError, match="cuts quantization groups of 32"):
        t.columns(0, 112)


def test_act_order_columns_follow_their_permutation():
    t = _random(4, 32, perm=True)
    x = torch.randn(3, 256)
    w = QuantizedWeight(t, torch.float32, "cpu")
    torch.testing.assert_close(dequantized_linear(x, w), x @ t.dequantize().T, rtol=0, atol=1e-5)
    # Groups spread over all features cannot be cut by a row-parallel split...
    with pytest.raises(ValueError, match="desc_act"):
        t.columns(0, 128)
    # ...unless the permutation keeps each half's groups inside it.
    halves = torch.cat([torch.randperm(128), 128 + torch.randperm(128)])
    t = QuantizedTensor(t.codes, t.scale, t.zero, 4, 32, halves)
    assert torch.equal(t.columns(128, 128).dequantize(), t.dequantize()[:, 128:])


def test_parts_of_different_layouts_get_their_own_matmuls():
    """A fused q/k/v whose v is 6-bit in groups of 16 beside 4-bit q/k: two runs."""
    parts = [_random(4, 32, n=32, seed=1), _random(4, 32, n=16, seed=2), _random(6, 16, n=16, seed=3)]
    packed = PackedWeight(3, REFERENCE_OPS, torch.float32, "cpu")
    for i, p in enumerate(parts):
        packed.put(i, p)
    assert [r.bits for r in packed.runs] == [4, 6] and [r.out_features for r in packed.runs] == [48, 16]
    x = torch.randn(5, 256)
    want = x @ torch.cat([p.dequantize() for p in parts]).T
    torch.testing.assert_close(packed(x), want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the decision


def test_keep_quantized_decides_by_device_dtype_and_request():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert keep_quantized("auto", "gguf", cpu, torch.float32) is None  # no fast exact fp32 kernel
    assert keep_quantized("auto", "gguf", cpu, torch.float32, int4pack=True) == "gguf"  # CPU_OPS: torch's int4
    assert keep_quantized("auto", "gguf", cpu, torch.bfloat16) == "gguf"
    assert keep_quantized("auto", "gptq", cuda, torch.float16) == "gptq"
    assert keep_quantized("gguf", "gguf", cpu, torch.float32) == "gguf"  # asked for: low memory, exact
    assert keep_quantized("none", "awq", cuda, torch.float16) is None
    assert keep_quantized("auto", None, cpu, torch.float32) is None
    with pytest.raises(ValueError, match="the checkpoint is gguf"):
        keep_quantized("gptq", "gguf", cpu, torch.float32)
    with pytest.raises(ValueError, match="not quantized"):
        keep_quantized("awq", None, cpu, torch.float32)
    with pytest.raises(ValueError, match="quantization must be one of"):
        keep_quantized("int3", "gguf", cpu, torch.float32)


def test_cpu_default_keeps_a_gguf_quantized_where_torchs_int4_kernel_takes_every_weight(model_dir):
    """float32 on CPU: the bundled SmolLM2 (Q4_1, Q8_0) stays quantized, every weight
    packed for torch's int4 kernel (CPU_OPS); with the exact kernels it is dequantized
    at load. A file with Q6_K tensors (16 inputs per scale) is dequantized at load
    unless its scheme is asked for."""
    from folio.worker.gguf_loader import gguf_fits_int4pack, read_gguf

    mixed = make_tiny_quantized_gguf(model_dir)
    assert gguf_fits_int4pack(read_gguf(smollm2_path())) and not gguf_fits_int4pack(read_gguf(mixed))
    model, cfg = load_model(smollm2_path())
    weights = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    assert cfg.quantization == "gguf" and len(weights) == 30 * 4 + 1  # qkv, o, gate_up, down; the embedding
    assert all(w.dtype == torch.float32 for w in weights)
    assert all(w.int4pack is not None for w in weights[1:])
    # the Q8_0 embedding (the tied head): a bf16 copy and packed terms as this CPU's table path says
    path = quant.table_path()
    assert weights[0].bf16_copy is not None if path.copy else weights[0].codes is not None
    assert (weights[0].int4pack is None) == (not path.terms)
    assert load_model(smollm2_path(), ops=REFERENCE_OPS)[1].quantization is None
    assert load_model(mixed)[1].quantization is None
    assert load_model(mixed, quantization="gguf")[1].quantization == "gguf"


# ------------------------------------------------------------------ whole models


def _bytes(model: torch.nn.Module) -> int:
    return _bytes_of(*model.parameters(), *model.buffers())


def _bytes_of(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.fixture(scope="module")
def smollm2_dense(gguf_parsed_once):
    return load_model(smollm2_path(), dtype=torch.float32, quantization="none")


@pytest.mark.slow
def test_smollm2_kept_quantized_in_fp32_computes_the_dense_model(smollm2_dense):
    """Q4_1 layers and the Q8_0 tied embedding kept quantized, computed in fp32 by
    dequantizing each layer as it runs: the dense model's logits (the weights are
    bit-identical), in under a quarter of its memory."""
    dense, cfg = smollm2_dense
    model, qcfg = load_model(smollm2_path(), dtype=torch.float32, quantization="gguf", ops=REFERENCE_OPS)
    assert qcfg.quantization == "gguf" and cfg.quantization is None
    assert _bytes(dense) / _bytes(model) > 4.0
    tokens = torch.randint(3, cfg.vocab_size, (21,), generator=torch.Generator().manual_seed(0))
    (want,) = _Pool(cfg).step(dense, [(_Seq(tokens), 21)])
    seq, pool = _Seq(tokens), _Pool(cfg)
    got = torch.cat([pool.step(model, [(seq, n)])[0] for n in (13, 1, 7)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
def test_smollm2_kept_quantized_is_as_close_to_fp32_as_dense_bf16(smollm2_dense):
    """torch's int4 kernel on bf16 activations, bf16 scales, in a bf16 model and
    (CPU_OPS, folio's CPU default) in an fp32 one: on real text the next-token
    logprobs of each stray from the fp32 model's no more than 1.5x as far as the
    dense bf16 model's do, and each keeps more than 3x less memory. The text is one
    prefill of more than wide_path().rows tokens: the wide path's GEMMs (bf16 ones
    where AMX runs them) compute it. The fp32 model over the 16-bit KV pool that
    --kv-cache-dtype auto gives it (bf16 where AMX attends to it in bf16, else fp16)
    decodes the text's last 16 tokens one step at a time, so decode attention over
    that pool counts too."""
    dense, cfg = smollm2_dense
    from folio.worker.loader import load_tokenizer

    bf16, fp32 = torch.bfloat16, torch.float32

    text = (
        "The history of the city begins with a small settlement by the river, where traders met "
        "to exchange grain, salt and cloth. Over the centuries the market grew into a town"
        " with stone walls, a bridge and a cathedral whose bells could be heard across the valley. "
        "Merchants from distant ports brought spices, silk and news of the world, and the town's "
        "guilds of weavers, smiths and masons built halls around the square. When the railway "
        "arrived, the old quarter was joined by factories and rows of brick houses for the workers, "
        "and the population doubled within a generation. Today the river is crossed by six bridges, "
        "the market still opens every Saturday, and visitors climb the cathedral tower to look out "
        "over the roofs, the fields and the hills that the first traders saw when they came by boat. "
        "In the archives of the town hall the old charters are kept in oak chests, and every spring "
        "the schools send their pupils to read them, so that each generation learns how the river, "
        "the road and the market made the place what it is, and why the bridges carry the names of "
        "the guilds that paid for them."
    )
    tokens = torch.tensor(load_tokenizer(smollm2_path()).encode(text))
    assert len(tokens) >= wide_path().rows
    (truth,) = _Pool(cfg).step(dense, [(_Seq(tokens), len(tokens))])
    truth = truth.log_softmax(-1)
    errors = {}
    one_prefill, then_decode = [len(tokens)], [len(tokens) - 16] + [1] * 16
    for name, dtype, q, pool_dtype, steps in [
        ("dense bf16", bf16, "none", bf16, one_prefill),
        ("kept bf16", bf16, "gguf", bf16, one_prefill),
        ("kept fp32", fp32, "gguf", fp32, one_prefill),
        ("kept fp32, 16-bit pool", fp32, "gguf", kv_cache_dtype("auto", fp32, "cpu", True), then_decode),
    ]:
        model, qcfg = load_model(smollm2_path(), dtype=dtype, quantization=q, ops=CPU_OPS)
        seq, pool = _Seq(tokens), _Pool(cfg, dtype=pool_dtype)
        out = torch.cat([pool.step(model, [(seq, n)])[0] for n in steps])
        out = out.float().log_softmax(-1)
        top = truth.argmax(-1, keepdim=True)
        errors[name] = (out.gather(1, top) - truth.gather(1, top)).abs().mean().item()
        assert (out.argmax(-1) == truth.argmax(-1)).float().mean() > 0.9
        if q == "gguf":
            # Without AMX the 8-bit head keeps its packed form (28 MB) beside its bf16 copy
            # for the steps the terms serve faster (table_path): a trade made on purpose, left out.
            beside = sum(
                _bytes_of(w.int4pack, w.int4pack_sz)
                for w in model.modules()
                if isinstance(w, QuantizedWeight) and w.bf16_copy is not None
            )
            assert qcfg.quantization == "gguf" and _bytes(dense) / (_bytes(model) - beside) > 3.0
    assert errors["kept bf16"] < 1.5 * errors["dense bf16"], errors
    assert errors["kept fp32"] < 1.5 * errors["dense bf16"], errors
    assert errors["kept fp32, 16-bit pool"] < 1.5 * errors["dense bf16"], errors


def test_mixed_block_types_match_transformers_gguf_loader(model_dir):
    """Every kept block type in one model (Q4_K q/k beside Q6_K v, ...), against
    transformers reading the same file through gguf-py."""
    import os

    from transformers import AutoModelForCausalLM

    path = make_tiny_quantized_gguf(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model, cfg = load_model(path, dtype=torch.float32, quantization="gguf", ops=REFERENCE_OPS)
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    assert [r.bits for r in qkv.runs] == [4, 6]  # Q4_K q/k, Q6_K v
    tokens = torch.randint(3, cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(3))
    seq, pool = _Seq(tokens), _Pool(cfg)
    got = torch.cat([pool.step(model, [(seq, n)])[0] for n in (11, 1, 18)])
    with torch.inference_mode():
        want = hf(tokens[None]).logits[0].float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_a_rank_keeps_only_its_shard_of_the_packed_weights(model_dir):
    path = make_tiny_quantized_gguf(model_dir)
    whole, _ = load_model(path, dtype=torch.float32, quantization="gguf")
    halves = [load_model(path, dtype=torch.float32, quantization="gguf", tp=TPGroup(r, 2))[0] for r in (0, 1)]
    for model in halves:
        down = model.model.layers[0].mlp.down_proj.weight.runs[0]
        assert (down.out_features, down.in_features) == (256, 256)  # 512 input features split
    # Norms are replicated; every packed byte is split.
    assert sum(_bytes(m) for m in halves) < 1.1 * _bytes(whole)
