"""Decoders for Hugging Face quantized checkpoints: GPTQ, AWQ and compressed-tensors.

`hf_quantization(config.json)` (worker/hf_quant_config.py) reads the
checkpoint's `quantization_config`; `decode_hf_tensors` turns the stream of (name, tensor) pairs a safetensors
reader yields into the same stream with every quantized linear replaced by one
("<layer>.weight", QuantizedTensor), so the model places it like a dense weight.
Every layout below decodes to kernels/quant.py's one form

    w[n, k] = (q[n, k] - 2**(bits-1)) * scale[n, k // group] + zero[n, k // group]

with N = output features (rows of torch's Linear weight [out, in]) and K = input
features. All three formats store integer codes with a per-group zero point z
and compute w = (q - z) * s, so the decoders keep q and s and set
zero = (2**(bits-1) - z) * s. With fp16 or bf16 scales (what the tools write)
both products are exact in fp32, so decoding is bit-exact; with fp32 scales
the two sides may differ by fp32 rounding.

Packing words are int32; "LSB first" means element i of a word occupies bits
[i*bits, (i+1)*bits). Only 4- and 8-bit codes are read: they never straddle a
word (or a byte).

GPTQ (quant_method "gptq": AutoGPTQ, GPTQModel, optimum)
    <layer>.qweight  int32 [K*bits/32, N]  packed along K: word [r, n] holds input
                     features r*(32/bits) + i, i = 0.., LSB first
    <layer>.qzeros   int32 [G, N*bits/32]  packed along N the same way: word
                     [g, c] holds output features c*(32/bits) + i
    <layer>.scales   fp16  [G, N]
    <layer>.g_idx    int32 [K]             group of each input feature
    G = K/group_size (1 when group_size is -1). w[n, k] = (q[k, n] - z[g, n]) *
    s[g, n] with g = g_idx[k]. checkpoint_format "gptq" (v1) stores z - 1 (the
    AutoGPTQ convention, whose kernels add 1 to each unpacked zero; a stored
    15 therefore means 16); "gptq_v2" (GPTQModel) stores z itself. sym only
    changes what z is (2**(bits-1)), not where it is read from. desc_act
    (act-order) scatters each group's features over K (g_idx[k] = the place of
    feature k in activation order // group_size): the decoder sorts features
    by g_idx (stable) and records that order as perm. The reference dequantization
    (AutoGPTQ/GPTQModel's torch kernel: scales[g_idx] * (w - zeros[g_idx]))
    reads g_idx whatever desc_act says, and so does this decoder.

AWQ (quant_method "awq", version "gemm": AutoAWQ, GPTQModel)
    <layer>.qweight  int32 [K, N/8]  packed along N: word [k, c] holds output
                     features c*8 + AWQ_ORDER[i] in nibble i (LSB first), with
                     AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
    <layer>.qzeros   int32 [G, N/8]  packed the same way, z stored as is
    <layer>.scales   fp16  [G, N]
    4 bits only, G = K/group_size, w[n, k] = (q[k, n] - z[k//group, n]) *
    s[k//group, n]. gemv/gemv_fast/marlin/exllama versions have other layouts
    and are refused, as is zero_point false (AutoAWQ's GEMM layer cannot
    store it either).

compressed-tensors (quant_method "compressed-tensors": llm-compressor)
    format "pack-quantized" (W4A16, W8A16, asymmetric variants):
    <layer>.weight_packed      int32 [N, ceil(K*bits/32)]  packed along K, LSB
                               first, code u = q + 2**(bits-1) (q is signed)
    <layer>.weight_shape       int64 [2] = (N, K)
    <layer>.weight_scale       float [N, K/group] (group), [N, 1] (channel)
    <layer>.weight_zero_point  (asymmetric only) int32 [ceil(N*bits/32), K/group]
                               packed along N (dim 0), LSB first, stored
                               u_z = z + 2**(bits-1); checkpoints written before
                               compressed-tensors packed zero points (2025) hold
                               it as int8 [N, K/group], signed
    <layer>.weight_g_idx       (actorder "group", since removed from the
                               library) int32 [K], as GPTQ's g_idx
    w = (q - z) * s with signed q and z, i.e. (u - 2**(bits-1) - z) * s, so the
    codes are u as stored and zero = -z * s.
    format "int-quantized" / "naive-quantized" (W8A8 int8):
    <layer>.weight             int8 [N, K], signed q, unpacked
    <layer>.weight_scale       float [N, 1] (channel), [N, K/group] or [1] (tensor)
    <layer>.weight_zero_point  (asymmetric only) int8, shaped like the scale
    W8A8 also quantizes the input activations, dynamically per token at run
    time. folio does not: it multiplies the unquantized activations by the
    dequantized weight, which is closer to the original model than the int8 x
    int8 product (so outputs differ slightly from vLLM's int8 kernels);
    HFQuantization.dynamic_activations says so. Static
    activation scales, kv-cache schemes, float (FP8/FP4) types, sparsity and
    transforms are refused.
    Which layers are quantized: config_groups map targets (exact names,
    "re:" regexes matched from the start of the name, or class names such as
    "Linear") to schemes, most specific first (exact, then regex, then
    class), as compressed-tensors matches them; layers matching `ignore`
    (e.g. lm_head) stay dense and pass through.

Pieces of a layer may arrive in any order and in different shard files; only
layers with pieces still missing are held. Each layer's pieces are checked
against each other (dtypes, shapes, g_idx and code ranges, finite scales)
before anything is allocated from them, so a malformed checkpoint fails with
a ValueError naming the tensor, never an obscure error or a huge allocation.
"""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, Optional, Union

import torch

from folio.kernels.quant import QuantizedTensor
from folio.worker.hf_quant_config import AWQ, CT_INT, CT_PACKED, GPTQ, GPTQ_V2, HFQuantization, LinearScheme

# AutoAWQ's GEMM interleave: nibble i of a word holds output feature 8c + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

_INT_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------- tensors


def decode_hf_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], quant: HFQuantization
) -> Iterator[tuple[str, Union[torch.Tensor, QuantizedTensor]]]:
    """The checkpoint's tensors with each quantized linear's pieces replaced by one
    ("<layer>.weight", QuantizedTensor), yielded as soon as its last piece arrives;
    every other tensor passes through unchanged. Raises ValueError for a piece
    that does not fit its layer and, at the end, for layers left incomplete."""
    suffixes = quant.piece_suffixes
    pending: dict[str, tuple[LinearScheme, dict[str, torch.Tensor]]] = {}
    for name, tensor in tensors:
        layer, _, suffix = name.rpartition(".")
        # compressed-tensors' int-quantized weight keeps the dense name: its int8
        # dtype (never a dense checkpoint's) tells it apart.
        if not layer or suffix not in suffixes or (suffix == "weight" and tensor.dtype != torch.int8):
            yield name, tensor
            continue
        if layer in pending:
            scheme, parts = pending[layer]
        else:
            scheme = quant.scheme_for(layer)
            if scheme is None:
                raise ValueError(f"{name}: the quantization config keeps {layer} dense (ignore), yet it is quantized")
            parts = {}
            pending[layer] = (scheme, parts)
        if suffix not in scheme.pieces:
            raise ValueError(
                f"{name}: a {scheme.describe()} layer has no {suffix!r} tensor (it has {sorted(scheme.pieces)})"
            )
        if suffix in parts:
            raise ValueError(f"{name} appears twice in the checkpoint")
        parts[suffix] = tensor
        if len(parts) == len(scheme.pieces):
            del pending[layer]
            try:
                decoded = _DECODERS[scheme.layout](parts, scheme)
            except ValueError as e:
                raise ValueError(f"{layer} ({scheme.describe()}): {e}") from None
            yield f"{layer}.weight", decoded
    if pending:
        missing = [f"{layer} lacks {sorted(s.pieces - parts.keys())}" for layer, (s, parts) in sorted(pending.items())]
        more = f" (and {len(missing) - 4} more layers)" if len(missing) > 4 else ""
        raise ValueError(f"the checkpoint ends with quantized layers incomplete: {'; '.join(missing[:4])}{more}")


def _matrix(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...]) -> tuple[int, int]:
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty matrix, got shape {list(t.shape)}")
    return t.shape[0], t.shape[1]


def _expect(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...]) -> None:
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")


def _scales(t: torch.Tensor, name: str, shape: tuple[int, int]) -> torch.Tensor:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")
    s = t.float()
    if not torch.isfinite(s).all():
        raise ValueError(f"{name} holds non-finite values")
    return s


def _groups(k: int, group: int, what: str) -> tuple[int, int]:
    """-> (group size, number of groups) for K input features."""
    if group == -1:
        return k, 1
    if k % group:
        raise ValueError(f"{what}: group_size {group} does not divide {k} input features")
    return group, k // group


def _unpack(words: torch.Tensor, bits: int, order: Optional[tuple[int, ...]] = None, dim: int = -1) -> torch.Tensor:
    """int32 [R, C] -> uint8 codes, the packed dim 32/bits times longer. Element i
    of a word (bits [i*bits, (i+1)*bits)) goes to position order[i] (i without an
    order) among that word's codes: dim -1 gives [R, C*per], word [r, c]'s codes at
    columns c*per + ...; dim 0 gives [R*per, C], word [r, c]'s codes at rows
    r*per + ...  A transposed `words` unpacks straight into the transposed layout."""
    per, mask = 32 // bits, (1 << bits) - 1
    r, c = words.shape
    # A word's bits [8m, 8m + 8) are its byte m on a little-endian host, 3 - m on a
    # big-endian one; 4- and 8-bit codes never straddle a byte. Byte views are ~4x
    # faster than shifting whole int32 words.
    b = words.contiguous().view(-1).view(torch.uint8).view(r, c, 4)  # view(-1): unit stride
    little = sys.byteorder == "little"

    def element(i: int) -> torch.Tensor:
        m, shift = divmod(i * bits, 8)
        byte = b[:, :, m if little else 3 - m]
        return byte if bits == 8 else (byte >> shift) & mask

    src = list(range(per))
    for i, j in enumerate(order or range(per)):
        src[j] = i  # position j holds element src[j]
    parts = [element(i) for i in src]
    if dim == 0:
        return torch.stack(parts, dim=1).view(r * per, c)
    return torch.stack(parts, dim=-1).view(r, c * per)


def _group_perm(g_idx: torch.Tensor, group: int, groups: int, name: str) -> Optional[torch.Tensor]:
    """perm (argsort of g_idx, stable) when g_idx is not simply k // group, else None."""
    g = g_idx.long()
    k = g.numel()
    if g.min() < 0 or g.max() >= groups:
        raise ValueError(f"{name} must lie in [0, {groups}), got values in [{int(g.min())}, {int(g.max())}]")
    if torch.equal(g, torch.arange(k) // group):
        return None
    counts = torch.bincount(g, minlength=groups)
    if (counts != group).any():
        bad = int((counts != group).nonzero()[0])
        raise ValueError(f"{name} puts {int(counts[bad])} input features in group {bad}, not {group}")
    return torch.argsort(g, stable=True)


def _decode_gptq(p: dict[str, torch.Tensor], s: LinearScheme) -> QuantizedTensor:
    per = 32 // s.bits
    rows, n = _matrix(p["qweight"], "qweight", (torch.int32,))
    k = rows * per
    group, groups = _groups(k, s.group, "qweight")
    if n % per:
        raise ValueError(f"{n} output features do not pack into qzeros' {per} per int32 word")
    _expect(p["qzeros"], "qzeros", (torch.int32,), (groups, n // per))
    _expect(p["g_idx"], "g_idx", _INT_DTYPES, (k,))
    scale = _scales(p["scales"], "scales", (groups, n)).t()
    zeros = _unpack(p["qzeros"], s.bits).t().float()  # [N, G]
    if s.layout == GPTQ:
        zeros += 1  # v1 stores z - 1, per element (AutoGPTQ's kernels add 1 after unpacking)
    zero = (float(1 << (s.bits - 1)) - zeros) * scale
    perm = _group_perm(p["g_idx"], group, groups, "g_idx")
    codes = _unpack(p["qweight"].t(), s.bits)  # [N, K]: qweight packs along K, dim 0
    if perm is not None:
        codes = codes[:, perm]
    return QuantizedTensor(codes.contiguous(), scale.contiguous(), zero.contiguous(), s.bits, group, perm)


def _decode_awq(p: dict[str, torch.Tensor], s: LinearScheme) -> QuantizedTensor:
    k, cols = _matrix(p["qweight"], "qweight", (torch.int32,))
    n = cols * 8
    group, groups = _groups(k, s.group, "qweight")
    _expect(p["qzeros"], "qzeros", (torch.int32,), (groups, cols))
    scale = _scales(p["scales"], "scales", (groups, n)).t()
    zeros = _unpack(p["qzeros"], 4, AWQ_ORDER).t().float()
    codes = _unpack(p["qweight"].t(), 4, AWQ_ORDER, dim=0)  # [N/8, K] words: [N, K] codes
    zero = (8.0 - zeros) * scale
    return QuantizedTensor(codes, scale.contiguous(), zero.contiguous(), 4, group)


def _ct_scale_zero(p: dict[str, torch.Tensor], s: LinearScheme, n: int, k: int) -> tuple[torch.Tensor, ...]:
    """-> (scale [N, G] fp32, zero [N, G] fp32, group) of a compressed-tensors layer."""
    group, groups = _groups(k, s.group, "weight")
    if s.tensor_scale:
        t = p["weight_scale"]
        scale = _scales(t.reshape(1, 1), "weight_scale", (1, 1)) if t.numel() == 1 else None
        if scale is None:
            raise ValueError(f"weight_scale of the tensor strategy must hold one value, got shape {list(t.shape)}")
        scale = scale.expand(n, 1)
    else:
        scale = _scales(p["weight_scale"], "weight_scale", (n, groups))
    if s.symmetric:
        return scale, torch.zeros_like(scale), group
    zp = p["weight_zero_point"]
    mid = 1 << (s.bits - 1)
    if zp.dtype == torch.int32 and s.layout == CT_PACKED:
        # Packed along N (dim 0), stored z + 2**(bits-1).
        per = 32 // s.bits
        _expect(zp, "weight_zero_point", (torch.int32,), (-(-n // per), groups))
        z = _unpack(zp, s.bits, dim=0)[:n].float() - mid
    else:
        _expect(zp, "weight_zero_point", (torch.int8,), (n, groups))
        lo, hi = int(zp.min()), int(zp.max())  # python ints: 128 does not fit int8
        if lo < -mid or hi >= mid:
            raise ValueError(f"weight_zero_point must lie in [{-mid}, {mid}), got [{lo}, {hi}]")
        z = zp.float()
    return scale, -z * scale, group


def _weight_shape(t: torch.Tensor, rows: int, words: int, bits: int) -> int:
    """K from weight_shape, checked against weight_packed [N, ceil(K*bits/32)]."""
    if t.dtype not in _INT_DTYPES or t.shape != (2,):
        raise ValueError(f"weight_shape must be 2 integers, got {t.dtype} of shape {list(t.shape)}")
    n, k = (int(v) for v in t.tolist())
    if n != rows or k <= 0 or -(-k * bits // 32) != words:
        raise ValueError(f"weight_shape {[n, k]} does not fit weight_packed [{rows}, {words}] of {bits}-bit codes")
    return k


def _decode_ct_packed(p: dict[str, torch.Tensor], s: LinearScheme) -> QuantizedTensor:
    n, words = _matrix(p["weight_packed"], "weight_packed", (torch.int32,))
    k = _weight_shape(p["weight_shape"], n, words, s.bits)
    scale, zero, group = _ct_scale_zero(p, s, n, k)
    perm = None
    if s.g_idx:
        _expect(p["weight_g_idx"], "weight_g_idx", _INT_DTYPES, (k,))
        perm = _group_perm(p["weight_g_idx"], group, scale.shape[1], "weight_g_idx")
    codes = _unpack(p["weight_packed"], s.bits)[:, :k]  # stored u = q + 2**(bits-1): our codes
    if perm is not None:
        codes = codes[:, perm]
    return QuantizedTensor(codes.contiguous(), scale.contiguous(), zero.contiguous(), s.bits, group, perm)


def _decode_ct_int(p: dict[str, torch.Tensor], s: LinearScheme) -> QuantizedTensor:
    w = p["weight"]
    n, k = _matrix(w, "weight", (torch.int8,))  # int8 holds every 8-bit signed code
    scale, zero, group = _ct_scale_zero(p, s, n, k)
    codes = (w.to(torch.int16) + (1 << (s.bits - 1))).to(torch.uint8)
    return QuantizedTensor(codes, scale.contiguous(), zero.contiguous(), s.bits, group)


_DECODERS = {
    GPTQ: _decode_gptq,
    GPTQ_V2: _decode_gptq,
    AWQ: _decode_awq,
    CT_PACKED: _decode_ct_packed,
    CT_INT: _decode_ct_int,
}
