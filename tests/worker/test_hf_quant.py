"""worker/hf_quant.py and hf_quant_config.py against checkpoints packed without them
(tests/quant_formats.py).

Exactness. GPTQ and AWQ store fp16 scales: (q - z) * s and the decoder's
(q - 2**(bits-1)) * s + (2**(bits-1) - z) * s are both exact in fp32, so the
decoded weight must equal the packed one bit for bit. compressed-tensors layers
here keep fp32 scales (as llm-compressor does for an fp32 model); the decoder's
two products then round separately, so those compare within a few fp32 ulps
(atol 1e-6 of the largest |w|); with bf16 scales they are exact again.

transformers on CPU: compressed-tensors checkpoints load with dequantize=True
and are compared weight by weight (its default, compressed route fails on
asymmetric pack-quantized checkpoints: it expects the zero points unpacked).
transformers 5 reads GPTQ and AWQ through gptqmodel, whose release needs torch
>= 2.14.1 where the CPU image pins 2.13, so those formats are checked against
the packers alone (tests/quant_formats.py tells how those were cross-checked).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from folio.kernels.quant import QuantizedTensor, QuantizedWeight, dequantized_linear
from folio.worker import hf_quant
from folio.worker.hf_quant import decode_hf_tensors
from folio.worker.hf_quant_config import AWQ, CT_INT, CT_PACKED, GPTQ, GPTQ_V2, LinearScheme, hf_quantization
from tests import quant_formats as qf

N, K = 64, 256  # K = 2 groups of 128, 8 of 32
LAYER = "model.layers.0.self_attn.q_proj"


def _decode_one(packed: qf.Packed, config: dict, layer: str = LAYER, shuffle_seed: int = 0) -> QuantizedTensor:
    """Stream one layer's pieces, shuffled, between two dense tensors; -> its QuantizedTensor."""
    quant = hf_quantization(config)
    pieces = [(f"{layer}.{suffix}", t) for suffix, t in packed.tensors.items()]
    random.Random(shuffle_seed).shuffle(pieces)
    norm = torch.ones(N)
    stream = [("model.norm.weight", norm), *pieces, (f"{layer}.bias", norm)]
    out = list(decode_hf_tensors(stream, quant))
    assert [name for name, _ in out] == ["model.norm.weight", f"{layer}.weight", f"{layer}.bias"]
    assert out[0][1] is norm and out[2][1] is norm  # dense tensors pass through untouched
    qt = out[1][1]
    assert isinstance(qt, QuantizedTensor) and qt.shape == tuple(packed.weight.shape)
    return qt


# ---------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_decodes_exactly(bits, group, desc_act, sym):
    w = qf.random_weight(N, K, seed=bits * 7 + group)
    packed = qf.pack_gptq(w, bits, group, sym, desc_act, seed=group)
    qt = _decode_one(packed, qf.gptq_config(bits, group, desc_act, sym))
    assert qt.bits == bits and qt.group == (K if group == -1 else group)
    # Act-order with several groups reorders the columns; one group (-1) needs no order.
    assert (qt.perm is not None) == (desc_act and group != -1)
    assert torch.equal(qt.dequantize(), packed.weight)
    assert (qt.dequantize() - w).abs().max() < 0.5  # and the packer did quantize w


@pytest.mark.parametrize(
    "bits,group,desc_act,sym", [(4, 128, True, False), (8, 32, False, False), (4, 32, False, True)]
)
def test_gptq_v2_zero_points_are_stored_without_offset(bits, group, desc_act, sym):
    w = qf.random_weight(N, K, seed=3)
    packed = qf.pack_gptq(w, bits, group, sym, desc_act, v2=True)
    qt = _decode_one(packed, qf.gptq_config(bits, group, desc_act, sym, v2=True))
    assert torch.equal(qt.dequantize(), packed.weight)
    # Read as v1 instead, every zero point is off by one: the format matters.
    v1 = _decode_one(packed, qf.gptq_config(bits, group, desc_act, sym, v2=False))
    assert not torch.equal(v1.dequantize(), packed.weight)


def test_gptq_act_order_permutation_matches_the_kernel_convention():
    """perm sorts input features by group: column j of the codes is feature perm[j]."""
    w = qf.random_weight(N, K, seed=5)
    packed = qf.pack_gptq(w, 4, 32, sym=False, desc_act=True, seed=9)
    qt = _decode_one(packed, qf.gptq_config(4, 32, True, False))
    g_idx = packed.tensors["g_idx"].long()
    assert torch.equal(qt.perm, torch.argsort(g_idx, stable=True))
    assert torch.equal(g_idx[qt.perm], torch.arange(K) // 32)  # groups contiguous after sorting
    x = torch.randn(3, K)
    ref = x @ packed.weight.t()
    got = x[:, qt.perm] @ qt.dequantize()[:, qt.perm].t()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- AWQ


@pytest.mark.parametrize("group", [32, 128])
def test_awq_gemm_decodes_exactly(group):
    w = qf.random_weight(N, K, seed=group)
    packed = qf.pack_awq(w, group)
    qt = _decode_one(packed, qf.awq_config(group))
    assert qt.bits == 4 and qt.group == group and qt.perm is None
    assert torch.equal(qt.dequantize(), packed.weight)
    assert (qt.dequantize() - w).abs().max() < 0.5


def test_awq_interleave_is_not_sequential():
    """Packed in plain order instead of AWQ's [0, 2, 4, 6, 1, 3, 5, 7], the output rows come out shuffled."""
    w = qf.random_weight(N, K, seed=1)
    packed = qf.pack_awq(w, 32)
    q, _, _ = qf._minmax(w, 4, 32, sym=False)
    packed.tensors["qweight"] = qf.pack_along_columns(q.t(), 4)
    assert not torch.equal(_decode_one(packed, qf.awq_config(32)).dequantize(), packed.weight)


# ---------------------------------------------------------------- compressed-tensors


CT_CASES = {
    # name: (weight args, format, W8A8 dynamic activations)
    "W4A16-group128": (qf.ct_args(4, "group", 128), "pack-quantized", False),
    "W4A16-group32-asym": (qf.ct_args(4, "group", 32, symmetric=False), "pack-quantized", False),
    "W4A16-channel": (qf.ct_args(4, "channel"), "pack-quantized", False),
    "W4A16-channel-asym": (qf.ct_args(4, "channel", symmetric=False), "pack-quantized", False),
    "W8A16-group128": (qf.ct_args(8, "group", 128), "pack-quantized", False),
    "W8A16-channel": (qf.ct_args(8, "channel"), "pack-quantized", False),
    "W8A16-group32-asym": (qf.ct_args(8, "group", 32, symmetric=False), "pack-quantized", False),
    "W8A8-int-channel": (qf.ct_args(8, "channel"), "int-quantized", True),
    "W8A8-int-channel-asym": (qf.ct_args(8, "channel", symmetric=False), "int-quantized", True),
}


def _ct_case(name: str, k: int = K):
    args, fmt, acts = CT_CASES[name]
    scheme = qf.ct_scheme(args, dynamic_int8_activations=acts)
    w = qf.random_weight(N, k, seed=len(name))
    return w, scheme, fmt, qf.ct_config({"group_0": scheme}, fmt)


@pytest.mark.parametrize("case", sorted(CT_CASES))
def test_compressed_tensors_decodes_like_the_library(case):
    w, scheme, fmt, config = _ct_case(case)
    packed = qf.pack_ct(w, scheme, fmt)
    expected_pieces = {"weight_packed", "weight_shape"} if fmt == "pack-quantized" else {"weight"}
    expected_pieces |= {"weight_scale"} | (set() if scheme.weights.symmetric else {"weight_zero_point"})
    assert set(packed.tensors) == expected_pieces  # the library wrote the layout the decoder expects
    qt = _decode_one(packed, config)
    assert qt.bits == scheme.weights.num_bits
    assert qt.group == (scheme.weights.group_size if scheme.weights.strategy == "group" else K)
    torch.testing.assert_close(qt.dequantize(), packed.weight, rtol=0, atol=1e-6 * packed.weight.abs().max().item())
    assert hf_quantization(config).dynamic_activations == (fmt == "int-quantized")


def test_compressed_tensors_bf16_scales_decode_exactly():
    w, scheme, fmt, config = _ct_case("W4A16-group32-asym")
    packed = qf.pack_ct(w, scheme, fmt, scale_dtype=torch.bfloat16)
    assert packed.tensors["weight_scale"].dtype == torch.bfloat16
    assert torch.equal(_decode_one(packed, config).dequantize(), packed.weight)


def test_compressed_tensors_k_not_a_multiple_of_the_packing():
    """Channel strategy, K = 100: the last int32 word of each row is partly padding."""
    w, scheme, fmt, config = _ct_case("W4A16-channel-asym", k=100)
    packed = qf.pack_ct(w, scheme, fmt)
    assert packed.tensors["weight_packed"].shape == (N, 13)
    qt = _decode_one(packed, config)
    assert qt.shape == (N, 100)
    torch.testing.assert_close(qt.dequantize(), packed.weight, rtol=0, atol=1e-6 * packed.weight.abs().max().item())


def test_compressed_tensors_unpacked_int8_zero_points():
    """Checkpoints from before compressed-tensors packed zero points hold them as int8 [N, G]."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    w, scheme, fmt, config = _ct_case("W4A16-group32-asym")
    packed = qf.pack_ct(w, scheme, fmt)
    zp = packed.tensors["weight_zero_point"]
    packed.tensors["weight_zero_point"] = unpack_from_int32(zp, 4, torch.Size([N, K // 32]), packed_dim=0)
    assert packed.tensors["weight_zero_point"].dtype == torch.int8
    torch.testing.assert_close(
        _decode_one(packed, config).dequantize(), packed.weight, rtol=0, atol=1e-6 * packed.weight.abs().max().item()
    )


def test_compressed_tensors_act_order_group():
    """actorder "group" (weight_g_idx), which the current library no longer writes: config by hand."""
    w = qf.random_weight(N, K, seed=11)
    packed = qf.pack_ct_actorder(w, 4, 32)
    config = qf.ct_config({"group_0": qf.ct_scheme(qf.ct_args(4, "group", 32))}, "pack-quantized")
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    qt = _decode_one(packed, config)
    assert qt.perm is not None
    assert torch.equal(qt.dequantize(), packed.weight)


def test_compressed_tensors_groups_targets_and_ignore():
    """Two groups (attention W4A16 by regex, the rest of the Linears W8A16 by class),
    lm_head ignored: each layer decodes with its group's scheme, lm_head stays dense."""
    attn = qf.ct_scheme(qf.ct_args(4, "group", 32), targets=["re:.*self_attn\\..*"])
    rest = qf.ct_scheme(qf.ct_args(8, "channel"), targets=["Linear"])
    config = qf.ct_config({"group_0": attn, "group_1": rest}, "pack-quantized", ignore=["lm_head"])
    quant = hf_quantization(config)
    assert quant.scheme_for("model.layers.1.self_attn.o_proj") == LinearScheme(CT_PACKED, 4, 32)
    assert quant.scheme_for("model.layers.1.mlp.down_proj") == LinearScheme(CT_PACKED, 8, -1)
    assert quant.scheme_for("lm_head") is None

    w_attn, w_mlp, head = qf.random_weight(N, K, 1), qf.random_weight(N, K, 2), torch.randn(384, K)
    p_attn, p_mlp = qf.pack_ct(w_attn, attn, "pack-quantized"), qf.pack_ct(w_mlp, rest, "pack-quantized")
    stream = [("lm_head.weight", head)]
    stream += [(f"model.layers.0.self_attn.k_proj.{s}", t) for s, t in p_attn.tensors.items()]
    stream += [(f"model.layers.0.mlp.up_proj.{s}", t) for s, t in p_mlp.tensors.items()]
    out = dict(decode_hf_tensors(stream, quant))
    assert out["lm_head.weight"] is head
    assert out["model.layers.0.self_attn.k_proj.weight"].bits == 4
    assert out["model.layers.0.mlp.up_proj.weight"].bits == 8
    for name, p in (("self_attn.k_proj", p_attn), ("mlp.up_proj", p_mlp)):
        got = out[f"model.layers.0.{name}.weight"].dequantize()
        torch.testing.assert_close(got, p.weight, rtol=0, atol=1e-6 * p.weight.abs().max().item())

    # The same pieces under an ignored name contradict the config.
    with pytest.raises(ValueError, match="keeps lm_head dense"):
        list(decode_hf_tensors([(f"lm_head.{s}", t) for s, t in p_mlp.tensors.items()], quant))


def test_compressed_tensors_target_priority():
    """Exact names beat regexes, regexes beat class names (compressed-tensors' match_targets)."""
    exact = qf.ct_scheme(qf.ct_args(8, "channel"), targets=["model.layers.0.mlp.down_proj"])
    regex = qf.ct_scheme(qf.ct_args(4, "group", 128), targets=["re:.*mlp.*"])
    cls = qf.ct_scheme(qf.ct_args(4, "group", 32), targets=["Linear"])
    quant = hf_quantization(qf.ct_config({"a": cls, "b": regex, "c": exact}, "pack-quantized", ignore=[]))
    assert quant.scheme_for("model.layers.0.mlp.down_proj").bits == 8
    assert quant.scheme_for("model.layers.1.mlp.down_proj").group == 128
    assert quant.scheme_for("model.layers.1.self_attn.q_proj").group == 32


# ---------------------------------------------------------------- folio's kernels


@pytest.mark.parametrize(
    "make",
    [
        lambda w: (qf.pack_gptq(w, 4, 32, sym=False, desc_act=True), qf.gptq_config(4, 32, True, False)),
        lambda w: (qf.pack_gptq(w, 8, 128, sym=True, desc_act=True), qf.gptq_config(8, 128, True, True)),
        lambda w: (qf.pack_awq(w, 128), qf.awq_config(128)),
        lambda w: (
            qf.pack_ct(w, qf.ct_scheme(qf.ct_args(4, "group", 32, symmetric=False)), "pack-quantized"),
            qf.ct_config({"g": qf.ct_scheme(qf.ct_args(4, "group", 32, symmetric=False))}, "pack-quantized"),
        ),
    ],
    ids=["gptq4-act-order", "gptq8-act-order", "awq", "ct-w4a16-asym"],
)
def test_decoded_weights_run_through_folio_kernels(make):
    """QuantizedWeight takes what the decoder yields: the fp32 dequantize path and, in
    bfloat16, torch's int4pack kernel (perm applied to x) compute x @ w.T."""
    w = qf.random_weight(N, K, seed=21)
    packed, config = make(w)
    qt = _decode_one(packed, config)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(0))
    ref = x @ packed.weight.t()
    torch.testing.assert_close(dequantized_linear(x, QuantizedWeight(qt, torch.float32, "cpu")), ref)
    wbf = QuantizedWeight(qt, torch.bfloat16, "cpu")
    assert wbf.int4pack is not None
    xs = x if qt.perm is None else x.index_select(-1, qt.perm)
    got = wbf.int4pack_matmul(xs).float()
    torch.testing.assert_close(got, ref, rtol=0, atol=0.03 * ref.abs().max().item())


def test_unpack_reads_words_by_value_whatever_the_byte_order(monkeypatch):
    """Codes are bits of the int32 value: the same on a big-endian host, whose bytes lie reversed."""
    words = torch.randint(-(2**31), 2**31 - 1, (3, 5), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    for bits in (4, 8):
        shifts = torch.arange(0, 32, bits, dtype=torch.int32)
        expected = ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(3, -1)
        assert torch.equal(hf_quant._unpack(words, bits), expected)
        reversed_bytes = words.view(torch.uint8).view(3, 5, 4).flip(-1).contiguous().view(torch.int32).view(3, 5)
        with monkeypatch.context() as m:
            m.setattr(hf_quant.sys, "byteorder", "big")
            assert torch.equal(hf_quant._unpack(reversed_bytes, bits), expected)


# ---------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tests.model_fixtures import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("hf_quant"))


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("case", ["W4A16-group32-asym", "W8A16-channel", "W8A8-int-channel"])
def test_transformers_dequantizes_compressed_tensors_the_same(tiny_llama, tmp_path, case):
    """A tiny Llama quantized and saved by compressed-tensors (lm_head ignored), loaded by
    transformers with dequantize=True on CPU: every weight matches the decoded one."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from folio.worker.loader import _safetensors_tensors

    args, fmt, acts = CT_CASES[case]
    out = qf.make_ct_checkpoint(
        tiny_llama, str(tmp_path / case), qf.ct_scheme(args, dynamic_int8_activations=acts), fmt
    )
    with open(f"{out}/config.json") as f:
        quant = hf_quantization(json.load(f))
    ours = dict(decode_hf_tensors(_safetensors_tensors(out), quant))
    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    theirs = model.state_dict()
    assert set(ours) == set(theirs)
    quantized = [name for name, t in ours.items() if isinstance(t, QuantizedTensor)]
    assert len(quantized) == 3 * 7 and "lm_head.weight" not in quantized
    for name, t in ours.items():
        mine = t.dequantize() if isinstance(t, QuantizedTensor) else t
        ref = theirs[name].detach()
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6 * ref.abs().max().item(), msg=name)


# ---------------------------------------------------------------- malformed checkpoints


def _gptq_pieces(**replace):
    w = qf.random_weight(N, K, seed=0)
    packed = qf.pack_gptq(w, 4, 32, sym=False, desc_act=True)
    tensors = {**packed.tensors, **replace}
    return [(f"{LAYER}.{s}", t) for s, t in tensors.items() if t is not None], qf.gptq_config(4, 32, True, False)


@pytest.mark.parametrize(
    "replace,message",
    [
        ({"qzeros": None}, r"incomplete: model.layers.0.self_attn.q_proj lacks \['qzeros'\]"),
        ({"scales": torch.ones(8, N + 1, dtype=torch.float16)}, r"scales must be \[8, 64\]"),
        ({"scales": torch.ones(8, N, dtype=torch.int32)}, "scales must be floating point"),
        ({"scales": torch.full((8, N), float("nan"), dtype=torch.float16)}, "non-finite"),
        ({"qweight": torch.zeros(K // 8, N)}, "qweight must be torch.int32"),
        ({"qweight": torch.zeros(K // 8, N, 2, dtype=torch.int32)}, "qweight must be a non-empty matrix"),
        ({"qweight": torch.zeros(0, N, dtype=torch.int32)}, "qweight must be a non-empty matrix"),
        ({"qweight": torch.zeros(K // 8 + 1, N, dtype=torch.int32)}, "group_size 32 does not divide 264"),
        ({"qzeros": torch.zeros(8, 9, dtype=torch.int32)}, r"qzeros must be \[8, 8\]"),
        ({"g_idx": torch.arange(K, dtype=torch.int32)}, r"g_idx must lie in \[0, 8\)"),
        ({"g_idx": torch.zeros(K, dtype=torch.int32)}, "puts 256 input features in group 0, not 32"),
        ({"g_idx": torch.zeros(K - 1, dtype=torch.int32)}, r"g_idx must be \[256\]"),
    ],
)
def test_malformed_gptq_layer(replace, message):
    stream, config = _gptq_pieces(**replace)
    with pytest.raises(ValueError, match=message):
        list(decode_hf_tensors(stream, hf_quantization(config)))


def test_duplicate_and_unexpected_pieces():
    stream, config = _gptq_pieces()
    quant = hf_quantization(config)
    with pytest.raises(ValueError, match="appears twice"):
        list(decode_hf_tensors(stream[:1] + stream, quant))
    # A zero point beside a symmetric compressed-tensors layer is an error, not a dense tensor.
    w, scheme, fmt, config = _ct_case("W4A16-group128")
    pieces = [(f"{LAYER}.{s}", t) for s, t in qf.pack_ct(w, scheme, fmt).tensors.items()]
    stray = (f"{LAYER}.weight_zero_point", torch.zeros(N // 8, 2, dtype=torch.int32))
    with pytest.raises(
        ValueError, match=r"q_proj.weight_zero_point: a ct-packed 4-bit group 128 symmetric layer has no"
    ):
        list(decode_hf_tensors([stray] + pieces, hf_quantization(config)))


def test_only_incomplete_layers_are_held():
    """A finished layer is yielded before the next layer's pieces are read."""
    stream, config = _gptq_pieces()
    seen = []

    def source():
        for layer in ("a", "b"):
            for name, t in stream:
                seen.append(layer)
                yield name.replace(LAYER, layer), t

    out = decode_hf_tensors(source(), hf_quantization(config))
    assert next(out)[0] == "a.weight" and seen == ["a"] * 4
    assert next(out)[0] == "b.weight" and seen == ["a"] * 4 + ["b"] * 4


@pytest.mark.parametrize(
    "replace,message",
    [
        ({"weight_shape": torch.tensor([N, 10**12])}, r"weight_shape \[64, 1000000000000\] does not fit"),
        ({"weight_shape": torch.tensor([N, K, 1])}, "weight_shape must be 2 integers"),
        ({"weight_shape": torch.tensor([N + 1, K])}, "does not fit weight_packed"),
        ({"weight_zero_point": torch.zeros(N // 8, 3, dtype=torch.int32)}, r"weight_zero_point must be \[8, 8\]"),
        ({"weight_zero_point": torch.full((N, 8), 9, dtype=torch.int8)}, r"weight_zero_point must lie in \[-8, 8\)"),
        ({"weight_scale": torch.ones(N, 8, dtype=torch.float16)[:, :7]}, r"weight_scale must be \[64, 8\]"),
        ({"weight_packed": torch.zeros(N, K // 8, dtype=torch.int64)}, "weight_packed must be torch.int32"),
    ],
)
def test_malformed_compressed_tensors_layer(replace, message):
    w, scheme, fmt, config = _ct_case("W4A16-group32-asym")
    packed = qf.pack_ct(w, scheme, fmt)
    stream = [(f"{LAYER}.{s}", t) for s, t in {**packed.tensors, **replace}.items()]
    with pytest.raises(ValueError, match=message):
        list(decode_hf_tensors(stream, hf_quantization(config)))


def test_int8_weights_out_of_a_layer_scheme():
    """int-quantized: an int8 weight with no config group for its layer is refused, a float one passes."""
    w, scheme, fmt, config = _ct_case("W8A8-int-channel")
    config["quantization_config"]["config_groups"]["group_0"]["targets"] = ["re:.*mlp.*"]
    quant = hf_quantization(config)
    packed = qf.pack_ct(w, scheme, fmt)
    dense = torch.randn(N, K)
    assert list(decode_hf_tensors([(f"{LAYER}.weight", dense)], quant)) == [(f"{LAYER}.weight", dense)]
    with pytest.raises(ValueError, match="no quantization config group targets it"):
        list(decode_hf_tensors([(f"{LAYER}.{s}", t) for s, t in packed.tensors.items()], quant))


# ---------------------------------------------------------------- configs


def _ct(**changes) -> dict:
    config = qf.ct_config({"group_0": qf.ct_scheme(qf.ct_args(4, "group", 128))}, "pack-quantized")
    config["quantization_config"].update(changes)
    return config


def _ct_weights(**changes) -> dict:
    config = _ct()
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(changes)
    return config


@pytest.mark.parametrize(
    "config,message",
    [
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "'bitsandbytes' is not supported"),
        ({"quantization_config": {"quant_method": "fp8"}}, "'fp8' is not supported"),
        ({"quantization_config": "gptq"}, "must be an object"),
        (lambda: qf.gptq_config(3, 128, False, True), "3-bit checkpoints are not supported"),
        (lambda: qf.gptq_config(2, 128, False, True), "2-bit checkpoints are not supported"),
        ({"quantization_config": {"quant_method": "gptq", "bits": "4"}}, "bits must be an integer"),
        ({"quantization_config": {"quant_method": "gptq", "group_size": 0}}, "group_size must be positive or -1"),
        ({"quantization_config": {"quant_method": "gptq", "checkpoint_format": "marlin"}}, "'marlin' is not supp"),
        ({"quantization_config": {"quant_method": "gptq", "format": "gptq_p"}}, "'gptq_p' is not supported"),
        ({"quantization_config": {"quant_method": "gptq", "is_marlin_format": True}}, "is_marlin_format"),
        ({"quantization_config": {"quant_method": "gptq", "pack_dtype": "int16"}}, "pack_dtype 'int16'"),
        ({"quantization_config": {"quant_method": "gptq", "dynamic": {"-:.*": {}}}}, "per-module overrides"),
        (lambda: qf.awq_config(128, version="gemv", format="gemv"), "version 'gemv' is not supported"),
        (lambda: qf.awq_config(128, version="gemv_fast", format="gemv_fast"), "'gemv_fast' is not supported"),
        (lambda: qf.awq_config(128, bits=8), "8-bit checkpoints are not supported"),
        (lambda: qf.awq_config(128, zero_point=False), "zero_point false"),
        (lambda: qf.awq_config(-1), "group_size must be positive"),
        (lambda: _ct(format="float-quantized"), "'float-quantized' is not supported"),
        (lambda: _ct(format="marlin-24"), "'marlin-24' is not supported"),
        (lambda: _ct(quantization_status="frozen"), "compressed checkpoints only"),
        (lambda: _ct(kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv-cache"),
        (lambda: _ct(sparsity_config={"format": "sparse-24-bitmask"}), "sparse checkpoints"),
        (lambda: _ct(transform_config={"config_groups": {"u": {}}}), "transforms"),
        (lambda: _ct(config_groups={"W4A16": ["Linear"]}), "preset reference"),
        (lambda: _ct(config_groups={}), "at least one group"),
        (lambda: _ct(ignore=["re:lm_head("]), "'re:lm_head\\(' is not a valid regular expression"),
        (lambda: _ct_weights(num_bits=2), "2-bit weights are not supported"),
        (lambda: _ct_weights(type="float", num_bits=8), "'float' weights are not supported"),
        (lambda: _ct_weights(strategy="block", block_structure=[128, 128]), "strategy 'block'"),
        (lambda: _ct_weights(strategy="tensor", group_size=None, symmetric=False), "strategy 'tensor' \\(asym"),
        (lambda: _ct_weights(strategy="channel", group_size=None, actorder="group"), "needs the group strategy"),
        (lambda: _ct_weights(dynamic=True), "dynamically quantized weights"),
    ],
)
def test_unsupported_configs_say_why(config, message):
    config = config() if callable(config) else config
    with pytest.raises(ValueError, match=message):
        hf_quantization(config)


def test_static_activation_scales_are_refused():
    config = _ct()
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
        "num_bits": 8,
        "type": "int",
        "strategy": "tensor",
        "dynamic": False,
        "symmetric": True,
    }
    with pytest.raises(ValueError, match="only dynamic integer input activations"):
        hf_quantization(config)


def test_configs_read():
    assert hf_quantization({"architectures": ["LlamaForCausalLM"]}) is None
    gptq = hf_quantization(qf.gptq_config(8, -1, True, False, v2=True))
    assert gptq.method == "gptq" and gptq.groups[0][1] == LinearScheme(GPTQ_V2, 8, -1, False, True)
    assert hf_quantization(qf.gptq_config(4, 128, False, True)).groups[0][1].layout == GPTQ
    # GPTQModel's own spelling: method/format instead of quant_method/checkpoint_format.
    spelled = hf_quantization(
        {"quantization_config": {"method": "gptq", "bits": 4, "group_size": 64, "format": "gptq"}}
    )
    assert spelled.groups[0][1] == LinearScheme(GPTQ, 4, 64, True, False)
    # AutoAWQ's own names.
    awq = hf_quantization(
        {"quantization_config": {"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "version": "GEMM"}}
    )
    assert awq.groups[0][1] == LinearScheme(AWQ, 4, 64, symmetric=False)
    w8a8 = hf_quantization(_ct_case("W8A8-int-channel")[3])
    assert w8a8.groups[0][1] == LinearScheme(CT_INT, 8, -1) and w8a8.dynamic_activations
    assert w8a8.ignore == ("lm_head",)


@pytest.mark.parametrize(
    "config,fits",
    [
        (qf.gptq_config(4, 32, desc_act=True, sym=False), True),
        (qf.gptq_config(8, 128, desc_act=False, sym=True), True),
        (qf.gptq_config(8, -1, desc_act=False, sym=True), False),  # per channel
        (qf.awq_config(64), True),
        *((_ct_case(name)[3], name.split("-")[1].startswith("group")) for name in sorted(CT_CASES)),
    ],
)
def test_torchs_int4_kernel_takes_group_scales_only(config, fits):
    """What decides whether a float32 model on CPU keeps the weights quantized by
    default (worker/loader.py keep_quantized): every scheme's groups fit the kernel."""
    assert hf_quantization(config).fits_int4pack() == fits
