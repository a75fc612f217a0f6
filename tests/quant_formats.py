"""Quantized Hugging Face checkpoints for tests, made without worker/hf_quant.py.

Each packer takes a float weight [N, K] (torch Linear layout: N outputs, K
inputs), quantizes it (min/max per group, or absmax when symmetric), writes the
tensors one layer has on disk, and returns them with the fp32 weight that the
packing represents, computed from the stored integers and scales directly:

- GPTQ (pack_gptq) and AWQ GEMM (pack_awq) are packed here, from the layouts
  AutoGPTQ/GPTQModel and AutoAWQ write. The maintained packer, gptqmodel
  (7.7), needs torch >= 2.14.1 where the CPU image pins 2.13, and AutoGPTQ
  (last release 0.7.1) and AutoAWQ (deprecated by its authors) are no longer
  maintained, so none is a test dependency. Checked once by
  hand: AutoGPTQ 0.7.1's QuantLinear.pack (qlinear_cuda, CPU path) and AutoAWQ
  0.2.9's WQLinear_GEMM.from_linear, given the same scales and zeros, write
  tensors identical to these for every variant the tests use (but gptq_v2,
  which AutoGPTQ does not write), and their own torch dequantization gives
  these weights (AutoAWQ's, in fp16, to fp16 rounding);
- compressed-tensors layers (pack_ct) are quantized and packed by the
  compressed-tensors package's own compressors, and the weight they represent
  is the package's own decompression; whole checkpoints (make_ct_checkpoint)
  go through its ModelCompressor, as llm-compressor saves them;
- the compressed-tensors act-order variant (weight_g_idx), which the package
  no longer writes, is packed with the package's pack_to_int32 and grouped here.

Configs come from the tools too: transformers' GPTQConfig/AwqConfig and
compressed-tensors' ModelCompressor.update_config.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble i of a word holds output 8c + AWQ_ORDER[i]


@dataclass
class Packed:
    tensors: dict[str, torch.Tensor]  # one layer's on-disk tensors, by suffix ("qweight", ...)
    weight: torch.Tensor  # fp32 [N, K]: what the stored integers and scales represent


def random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """A weight with rows and groups of different magnitudes and offsets, so
    scales and zero points differ everywhere."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen).add(0.1)
    return w + 0.3 * torch.randn(n, -(-k // 8), generator=gen).repeat_interleave(8, 1)[:, :k]


def _minmax(w: torch.Tensor, bits: int, group: int, sym: bool, min_zero: int = 0):
    """Unsigned codes of w [N, K], groups of `group` consecutive columns:
    -> q [N, K], scale [N, G] (rounded to fp16, as stored), zero [N, G]; w ~ (q - zero) * scale."""
    n, k = w.shape
    wg = w.reshape(n, k // group, group).float()
    maxq = (1 << bits) - 1
    if sym:  # GPTQ's symmetric grid: zero in the middle
        scale = (2 * wg.abs().amax(-1) / maxq).clamp(min=1e-6)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = ((hi - lo) / maxq).clamp(min=1e-6)
        zero = torch.round(-lo / scale).clamp(min_zero, maxq)
    scale = scale.half().float()
    q = (torch.round(wg / scale[..., None]) + zero[..., None]).clamp(0, maxq)
    return q.reshape(n, k).long(), scale, zero.long()


def _expand(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.repeat_interleave(group, dim=1)


def _int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (in int64) as the int32 bit patterns files hold."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_along_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] -> int32 [R*bits/32, C]: word [r, c] holds codes[r*per + i, c] at bits i*bits (LSB first)."""
    per = 32 // bits
    words = torch.zeros(codes.shape[0] // per, codes.shape[1], dtype=torch.int64)
    for i in range(per):
        words |= codes[i::per].long() << (bits * i)
    return _int32(words)


def pack_along_columns(codes: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """[R, C] -> int32 [R, C*bits/32]: word [r, c] holds codes[r, c*per + order[i]] at bits i*bits."""
    per = 32 // bits
    order = order or range(per)
    words = torch.zeros(codes.shape[0], codes.shape[1] // per, dtype=torch.int64)
    for i, j in enumerate(order):
        words |= codes[:, j::per].long() << (bits * i)
    return _int32(words)


# ---------------------------------------------------------------- GPTQ, AWQ


def pack_gptq(
    w: torch.Tensor, bits: int, group: int, sym: bool, desc_act: bool, v2: bool = False, seed: int = 0
) -> Packed:
    """AutoGPTQ's QuantLinear.pack layout (checkpoint_format "gptq"), or GPTQModel's "gptq_v2".

    qweight int32 [K*bits/32, N] (codes transposed to [K, N], packed along K),
    qzeros int32 [G, N*bits/32] (packed along N; v1 stores zero - 1), scales fp16
    [G, N], g_idx int32 [K]. With desc_act the features are quantized in a random
    "activation" order perm, the groups are consecutive runs of that order, and
    g_idx[k] = invperm[k] // group, as AutoGPTQ's fasterquant computes it.
    """
    n, k = w.shape
    g = k if group == -1 else group
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if desc_act else torch.arange(k)
    invperm = torch.argsort(perm)
    # v1 cannot store zero 0 (z - 1 = -1 would spill into the neighbouring codes
    # of its word, AutoGPTQ's asymmetric bug that gptq_v2 fixed): keep zero >= 1.
    q, scale, zero = _minmax(w[:, perm], bits, g, sym, min_zero=0 if v2 else 1)
    weight = ((q - _expand(zero, g)) * _expand(scale, g))[:, invperm]
    tensors = {
        "qweight": pack_along_rows(q[:, invperm].t(), bits),
        "qzeros": pack_along_columns((zero if v2 else zero - 1).t(), bits),
        "scales": scale.t().half().contiguous(),
        "g_idx": (torch.arange(k) // g)[invperm].to(torch.int32),
    }
    return Packed(tensors, weight)


def pack_awq(w: torch.Tensor, group: int) -> Packed:
    """AutoAWQ's WQLinear_GEMM.from_linear layout: qweight int32 [K, N/8] and qzeros
    int32 [G, N/8] packed along N in AWQ_ORDER, zero stored as is; scales fp16 [G, N]."""
    q, scale, zero = _minmax(w, 4, group, sym=False)
    weight = (q - _expand(zero, group)) * _expand(scale, group)
    tensors = {
        "qweight": pack_along_columns(q.t(), 4, AWQ_ORDER),
        "qzeros": pack_along_columns(zero.t(), 4, AWQ_ORDER),
        "scales": scale.t().half().contiguous(),
    }
    return Packed(tensors, weight)


def gptq_config(bits: int, group: int, desc_act: bool, sym: bool, v2: bool = False) -> dict:
    """config.json's quantization_config as transformers' GPTQConfig writes it."""
    from transformers import GPTQConfig

    fmt = "gptq_v2" if v2 else "gptq"
    cfg = GPTQConfig(bits=bits, group_size=group, desc_act=desc_act, sym=sym, checkpoint_format=fmt)
    return {"quantization_config": json.loads(cfg.to_json_string())}  # as config.json holds it


def awq_config(group: int, **overrides) -> dict:
    """config.json's quantization_config as transformers' AwqConfig writes it."""
    from transformers import AwqConfig

    cfg = json.loads(AwqConfig(bits=4, group_size=group, version="gemm", zero_point=True).to_json_string())
    return {"quantization_config": {**cfg, **overrides}}


# ---------------------------------------------------------------- compressed-tensors


def ct_args(bits: int, strategy: str, group: int | None = None, symmetric: bool = True) -> dict:
    return dict(num_bits=bits, type="int", strategy=strategy, group_size=group, symmetric=symmetric)


def ct_scheme(weights: dict, targets=("Linear",), dynamic_int8_activations: bool = False, fmt: str | None = None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    acts = None
    if dynamic_int8_activations:  # W8A8: int8 per-token activations, computed at run time
        acts = QuantizationArgs(num_bits=8, type="int", strategy="token", dynamic=True, symmetric=True)
    return QuantizationScheme(
        targets=list(targets), weights=QuantizationArgs(**weights), input_activations=acts, format=fmt
    )


def _ct_qparams(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max scale and signed int8 zero point, in compressed-tensors' convention
    w ~ (q - zp) * scale with q in [-2**(bits-1), 2**(bits-1) - 1]."""
    n, k = w.shape
    group = args.group_size if args.strategy == "group" else k
    wg = w.reshape(n, k // group, group).float()
    qmin, qmax = -(1 << (args.num_bits - 1)), (1 << (args.num_bits - 1)) - 1
    if args.symmetric:
        return (wg.abs().amax(-1) / ((qmax - qmin) / 2)).clamp(min=1e-6), None
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-6)
    zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zp.to(torch.int8)


def pack_ct(w: torch.Tensor, scheme, fmt: str, scale_dtype: torch.dtype = torch.float32) -> Packed:
    """One layer through compressed-tensors' own compressor for `fmt`
    ("pack-quantized", "int-quantized"); the weight is its own decompression."""
    from compressed_tensors.compressors import BaseCompressor

    scale, zp = _ct_qparams(w, scheme.weights)
    state = {"weight": w, "weight_scale": scale.to(scale_dtype)}
    if zp is not None:
        state["weight_zero_point"] = zp
    compressor = BaseCompressor.get_value_from_registry(fmt)
    tensors = compressor.compress(state, scheme)
    # Decompressed with fp32 scales: (q - zp) * s exactly, not rounded to scale_dtype.
    restored = compressor.decompress({**tensors, "weight_scale": tensors["weight_scale"].float()}, scheme)
    return Packed(dict(tensors), restored["weight"].float())


def pack_ct_actorder(w: torch.Tensor, bits: int, group: int, seed: int = 0) -> Packed:
    """pack-quantized with actorder "group" (weight_g_idx), symmetric: codes in feature
    order packed by compressed-tensors' pack_to_int32, groups formed in a random
    activation order as GPTQ's act-order forms them."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    n, k = w.shape
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    invperm = torch.argsort(perm)
    wp = w[:, perm].reshape(n, k // group, group)
    half = 1 << (bits - 1)
    scale = (wp.abs().amax(-1) / (half - 0.5)).clamp(min=1e-6)
    q = torch.round(wp / scale[..., None]).clamp(-half, half - 1).reshape(n, k)
    weight = (q * _expand(scale, group))[:, invperm]
    tensors = {
        "weight_packed": pack_to_int32(q[:, invperm].to(torch.int8), bits),
        "weight_scale": scale,
        "weight_shape": torch.tensor([n, k]),
        "weight_g_idx": (torch.arange(k) // group)[invperm].to(torch.int32),
    }
    return Packed(tensors, weight)


def ct_config(groups: dict, fmt: str, ignore=("lm_head",)) -> dict:
    """config.json's quantization_config exactly as compressed-tensors' ModelCompressor writes it.
    groups: {name: QuantizationScheme}."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qcfg = QuantizationConfig(config_groups=groups, format=fmt, quantization_status="compressed", ignore=list(ignore))
    with tempfile.TemporaryDirectory() as d:
        ModelCompressor(quantization_config=qcfg).update_config(d)
        with open(os.path.join(d, "config.json")) as f:
            return json.load(f)


def make_ct_checkpoint(src: str, out: str, scheme, fmt: str, ignore=("lm_head",)) -> str:
    """The Hugging Face checkpoint in `src` quantized as llm-compressor saves it:
    compressed-tensors applies `scheme` to every Linear but `ignore`, the scales
    are min/max (see _ct_qparams), its ModelCompressor compresses the model in
    place, and save_pretrained + update_config write it. Reused when present."""
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config
    from compressed_tensors.quantization.utils import is_module_quantized
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    qcfg = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=list(ignore))
    apply_quantization_config(model, qcfg)
    with torch.no_grad():
        for _, module in model.named_modules():
            if is_module_quantized(module):
                scale, zp = _ct_qparams(module.weight, module.quantization_scheme.weights)
                module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
                if zp is not None:
                    module.weight_zero_point.copy_(zp.reshape(module.weight_zero_point.shape))
                module.quantization_status = QuantizationStatus.FROZEN
    qcfg.quantization_status = QuantizationStatus.COMPRESSED
    compressor = ModelCompressor(quantization_config=qcfg)
    compressor.compress_model(model)
    tmp = out + ".partial"
    model.save_pretrained(tmp)
    compressor.update_config(tmp)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- whole checkpoints

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_packed_checkpoint(src: str, out: str, method: str, **options) -> tuple[str, str]:
    """The Hugging Face checkpoint in `src` with every decoder-layer linear packed
    as `method` ("gptq": pack_gptq(**options); "awq": pack_awq(**options)), and
    beside it (out + "-dense") the same model with the weights those packings
    represent, which transformers loads as the reference. -> (packed, dense)."""
    from safetensors.torch import load_file, save_file

    dense = out + "-dense"
    if os.path.isfile(os.path.join(out, "config.json")):
        return out, dense
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if method == "gptq":
        config |= gptq_config(options["bits"], options["group"], options["desc_act"], options["sym"])
    else:
        config |= awq_config(options["group"])
    packed, represented = {}, {}
    for i, (name, w) in enumerate(sorted(load_file(os.path.join(src, "model.safetensors")).items())):
        module, _, kind = name.rpartition(".")
        if kind == "weight" and module.rpartition(".")[2] in _LINEARS:
            p = pack_gptq(w, seed=i, **options) if method == "gptq" else pack_awq(w, **options)
            packed |= {f"{module}.{suffix}": t.contiguous() for suffix, t in p.tensors.items()}
            represented[name] = p.weight
        else:
            packed[name] = represented[name] = w
    for folder, tensors, cfg in ((out, packed, config), (dense, represented, None)):
        os.makedirs(folder + ".partial", exist_ok=True)
        save_file(tensors, os.path.join(folder + ".partial", "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(folder + ".partial", "config.json"), "w") as f:
            json.dump(cfg or {k: v for k, v in config.items() if k != "quantization_config"}, f)
        os.replace(folder + ".partial", folder)
    return out, dense
