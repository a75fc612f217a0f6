"""Decoders for Hugging Face quantized checkpoints: GPTQ, AWQ and compressed-tensors.

`hf_quantization(config.json)` reads the checkpoint's `quantization_config`;
`decode_hf_tensors` turns the stream of (name, tensor) pairs a safetensors
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

import re
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Union

import torch

from kernels.quant import QuantizedTensor

# AutoAWQ's GEMM interleave: nibble i of a word holds output feature 8c + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

GPTQ, GPTQ_V2, AWQ, CT_PACKED, CT_INT = "gptq", "gptq_v2", "awq", "ct-packed", "ct-int"
_INT_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class LinearScheme:
    """How one quantized linear layer is stored (see the module docstring)."""

    layout: str  # GPTQ, GPTQ_V2, AWQ, CT_PACKED or CT_INT
    bits: int
    group: int  # input features per scale; -1: one group spanning all K (per channel)
    symmetric: bool = True
    g_idx: bool = False  # compressed-tensors: weight_g_idx stored (GPTQ always stores g_idx)
    tensor_scale: bool = False  # compressed-tensors "tensor" strategy: one scale for the weight

    @property
    def pieces(self) -> frozenset[str]:
        """Suffixes of the tensors that make up one layer."""
        if self.layout in (GPTQ, GPTQ_V2):
            return frozenset(("qweight", "qzeros", "scales", "g_idx"))
        if self.layout == AWQ:
            return frozenset(("qweight", "qzeros", "scales"))
        names = {"weight_packed", "weight_shape"} if self.layout == CT_PACKED else {"weight"}
        names.add("weight_scale")
        if not self.symmetric:
            names.add("weight_zero_point")
        if self.g_idx:
            names.add("weight_g_idx")
        return frozenset(names)

    def describe(self) -> str:
        group = "per channel" if self.group == -1 else f"group {self.group}"
        if self.tensor_scale:
            group = "per tensor"
        sym = "symmetric" if self.symmetric else "asymmetric"
        return f"{self.layout} {self.bits}-bit {group} {sym}" + (" act-order" if self.g_idx else "")


@dataclass(frozen=True)
class HFQuantization:
    """A checkpoint's quantization: which scheme each quantized layer uses.

    groups: (targets, scheme) pairs; GPTQ and AWQ have one scheme for every
    layer whose pieces are in the checkpoint (targets ("Linear",)).
    ignore: compressed-tensors' layers that stay dense.
    dynamic_activations: the checkpoint was made to run with integer activations
    quantized per token at run time (W8A8); folio computes with unquantized
    activations instead (see the module docstring).
    """

    method: str  # "gptq", "awq" or "compressed-tensors"
    groups: tuple[tuple[tuple[str, ...], LinearScheme], ...]
    ignore: tuple[str, ...] = ()
    dynamic_activations: bool = False

    @property
    def piece_suffixes(self) -> frozenset[str]:
        """Every tensor suffix the method stores quantized layers under: one that the
        layer's scheme lacks (a zero point of a symmetric layer) is an error, not a
        dense tensor."""
        pieces = frozenset().union(*(scheme.pieces for _, scheme in self.groups))
        if self.method == "compressed-tensors":
            pieces |= _CT_PIECES
        return pieces

    def scheme_for(self, layer: str) -> Optional[LinearScheme]:
        """The scheme of `layer` (a module name, "model.layers.0.mlp.up_proj"), None when
        the config keeps it dense. Raises when no config group covers it."""
        # Ignore entries are names or regexes (class names there would need the model).
        if any(_name_matches(layer, target) for target in self.ignore):
            return None
        # compressed-tensors' priority: exact names, then regexes (each in sorted
        # order), then class names; the first match wins.
        targets = sorted(((t, s) for ts, s in self.groups for t in ts), key=lambda ts: ("re:" in ts[0], ts[0]))
        for target, scheme in targets:
            if _name_matches(layer, target):
                return scheme
        # A class-name target ("Linear": CamelCase, where module names are lower
        # case) matches by the module's class, which a tensor name does not tell;
        # the layer has quantized pieces, so some group quantized it: unambiguous
        # when the class-name groups share one scheme.
        classes = [(t, s) for t, s in targets if _is_class_name(t)]
        if len({s for _, s in classes}) == 1:
            return classes[0][1]
        if not classes:
            raise ValueError(f"{layer} has quantized tensors but no quantization config group targets it")
        raise ValueError(
            f"{layer} matches no config group by name, and the groups that target module classes "
            f"({sorted(t for t, _ in classes)}) use different schemes: which one applies cannot be "
            "told from the checkpoint's tensor names"
        )


def _is_class_name(target: str) -> bool:
    return not target.startswith("re:") and target[:1].isupper()


def _name_matches(name: str, target: str) -> bool:
    # compressed-tensors' match_name: "re:" targets are re.match'ed (anchored at the start).
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


# ---------------------------------------------------------------- config.json


def hf_quantization(config_json: dict) -> Optional[HFQuantization]:
    """The quantization a Hugging Face config.json declares; None for a dense checkpoint.

    Raises ValueError, saying why, for a method, format or option folio cannot
    decode exactly.
    """
    qc = config_json.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be an object, got {type(qc).__name__}")
    # GPTQModel names it "method", transformers and every other tool "quant_method".
    method = str(qc.get("quant_method", qc.get("method", ""))).lower()
    if method == "gptq":
        return _gptq_config(qc)
    if method == "awq":
        return _awq_config(qc)
    if method == "compressed-tensors":
        return _compressed_tensors_config(qc)
    raise ValueError(
        f"quantization method {method or None!r} is not supported: folio decodes GPTQ, AWQ (GEMM) "
        "and compressed-tensors (integer weights) Hugging Face checkpoints, and GGUF files"
    )


def _int(qc: dict, key: str, default: int, where: str) -> int:
    value = qc.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key} must be an integer, got {value!r}")
    return value


def _group_size(value: int, where: str) -> int:
    if value != -1 and value <= 0:
        raise ValueError(f"{where}: group_size must be positive or -1 (one group per row), got {value}")
    return value


def _gptq_config(qc: dict) -> HFQuantization:
    where = "GPTQ"
    bits = _int(qc, "bits", 4, where)
    if bits not in (4, 8):
        raise ValueError(
            f"{where}: {bits}-bit checkpoints are not supported, only 4 and 8 bits "
            "(3-bit codes straddle int32 words in a layout of their own)"
        )
    group = _group_size(_int(qc, "group_size", 128, where), where)
    # GPTQModel writes "format"; "checkpoint_format" is its older name, and transformers'.
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or GPTQ).lower()
    if fmt not in (GPTQ, GPTQ_V2):
        raise ValueError(
            f"{where}: checkpoint_format {fmt!r} is not supported (marlin, bitblas, planar gptq_p and the "
            "like repack the weights); folio reads 'gptq' and 'gptq_v2'"
        )
    if qc.get("is_marlin_format"):
        raise ValueError(f"{where}: Marlin-serialized checkpoints (is_marlin_format) are not supported")
    pack_dtype = str(qc.get("pack_dtype") or "int32").removeprefix("torch.")
    if pack_dtype != "int32":
        raise ValueError(f"{where}: pack_dtype {pack_dtype!r} is not supported, only int32 words")
    if qc.get("dynamic"):
        # GPTQModel's per-module overrides ({"+:regex": {"bits": 8}, "-:regex": {}}).
        raise ValueError(f"{where}: per-module overrides (dynamic) are not supported")
    if qc.get("activation"):
        raise ValueError(f"{where}: activation quantization ({qc['activation']!r}) is not supported")
    scheme = LinearScheme(fmt, bits, group, symmetric=bool(qc.get("sym", True)), g_idx=bool(qc.get("desc_act")))
    return HFQuantization("gptq", ((("Linear",), scheme),))


def _awq_config(qc: dict) -> HFQuantization:
    where = "AWQ"
    # transformers writes bits/group_size/version, AutoAWQ's own file w_bit/q_group_size,
    # GPTQModel bits/group_size/format.
    bits = _int(qc, "bits", _int(qc, "w_bit", 4, where), where)
    if bits != 4:
        raise ValueError(f"{where}: {bits}-bit checkpoints are not supported, only 4 bits")
    group = _int(qc, "group_size", _int(qc, "q_group_size", 128, where), where)
    if group <= 0:
        raise ValueError(f"{where}: group_size must be positive, got {group}")
    version = str(qc.get("version") or qc.get("format") or "gemm").lower()
    if version != "gemm":
        raise ValueError(
            f"{where}: version {version!r} is not supported: gemv and gemv_fast pack the weights "
            "differently; folio reads the GEMM layout"
        )
    if not qc.get("zero_point", True):
        raise ValueError(f"{where}: zero_point false is not supported (the GEMM layout stores zero points)")
    return HFQuantization("awq", ((("Linear",), LinearScheme(AWQ, 4, group, symmetric=False)),))


_CT_PIECES = frozenset(("weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight_g_idx"))
_CT_FORMATS = {"pack-quantized": CT_PACKED, "int-quantized": CT_INT, "naive-quantized": CT_INT}


def _compressed_tensors_config(qc: dict) -> HFQuantization:
    where = "compressed-tensors"
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(f"{where}: quantization_status {status!r}: folio reads compressed checkpoints only")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity and (not isinstance(sparsity, dict) or sparsity.get("format", "dense") != "dense"):
        raise ValueError(f"{where}: sparse checkpoints ({sparsity!r}) are not supported")
    if qc.get("transform_config"):
        raise ValueError(f"{where}: transforms (rotations such as SpinQuant/QuIP) are not supported")
    if qc.get("kv_cache_scheme"):
        raise ValueError(f"{where}: kv-cache quantization is not supported")
    groups_cfg = qc.get("config_groups")
    if not isinstance(groups_cfg, dict) or not groups_cfg:
        raise ValueError(f"{where}: config_groups must name at least one group")
    top_format = qc.get("format")
    groups, dynamic_activations = [], False
    for name, g in groups_cfg.items():
        at = f"{where} group {name!r}"
        if not isinstance(g, dict):
            raise ValueError(f"{at}: a preset reference ({g!r}) is not supported; expected a full scheme")
        targets = g.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"{at}: targets must be a non-empty list of names")
        fmt = g.get("format") or top_format
        if fmt not in _CT_FORMATS:
            raise ValueError(
                f"{at}: format {fmt!r} is not supported; folio reads pack-quantized and int-quantized (integer) "
                "weights, not float-quantized (FP8), nvfp4/mxfp4, marlin-24 or sparse formats"
            )
        if g.get("output_activations"):
            raise ValueError(f"{at}: output activation quantization is not supported")
        acts = g.get("input_activations")
        if acts:
            if not isinstance(acts, dict):
                raise ValueError(f"{at}: input_activations must be an object, got {acts!r}")
            # W8A8-style dynamic per-token activations: folio computes with the
            # activations unquantized (see the module docstring). Static scales would
            # come as input_scale tensors calibrated for a quantized product: refused.
            if acts.get("type", "int") != "int" or acts.get("dynamic") is not True:
                raise ValueError(
                    f"{at}: only dynamic integer input activations are supported (folio computes them "
                    f"unquantized), got {acts!r}"
                )
            dynamic_activations = True
        groups.append((tuple(targets), _ct_scheme(g.get("weights"), _CT_FORMATS[fmt], at)))
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
        raise ValueError(f"{where}: ignore must be a list of names")
    for target in [*ignore, *(t for ts, _ in groups for t in ts)]:
        if target.startswith("re:"):
            try:
                re.compile(target[3:])
            except re.error as e:
                raise ValueError(f"{where}: target {target!r} is not a valid regular expression: {e}") from None
    return HFQuantization("compressed-tensors", tuple(groups), tuple(ignore), dynamic_activations)


def _ct_scheme(w: Optional[dict], layout: str, at: str) -> LinearScheme:
    if not isinstance(w, dict):
        raise ValueError(f"{at}: a group without weight quantization is not supported")
    if w.get("type", "int") != "int":
        raise ValueError(f"{at}: {w.get('type')!r} weights are not supported, only integer weights")
    bits = _int(w, "num_bits", 8, at)
    if bits not in (4, 8) or (layout == CT_INT and bits != 8):
        raise ValueError(f"{at}: {bits}-bit weights are not supported ({layout}: 4 or 8 bits packed, 8 unpacked)")
    if w.get("dynamic"):
        raise ValueError(f"{at}: dynamically quantized weights are not supported")
    symmetric = bool(w.get("symmetric", True))
    strategy = w.get("strategy") or ("group" if (w.get("group_size") or 0) > 0 else "channel")
    actorder = w.get("actorder")
    # "weight"/"static" reorders only during calibration (same format); "group"/"dynamic"
    # (or true, its old spelling) stores weight_g_idx.
    g_idx = actorder is True or actorder in ("group", "dynamic")
    if actorder not in (None, False, True, "weight", "static", "group", "dynamic"):
        raise ValueError(f"{at}: actorder {actorder!r} is not supported")
    if strategy == "group":
        group = _int(w, "group_size", 0, at)
        if group <= 0:
            raise ValueError(f"{at}: group strategy needs a positive group_size, got {group}")
        return LinearScheme(layout, bits, group, symmetric, g_idx)
    if g_idx:
        raise ValueError(f"{at}: actorder {actorder!r} needs the group strategy, got {strategy!r}")
    if strategy == "channel":
        return LinearScheme(layout, bits, -1, symmetric)
    if strategy == "tensor" and symmetric:
        return LinearScheme(layout, bits, -1, symmetric, tensor_scale=True)
    raise ValueError(
        f"{at}: weight strategy {strategy!r}{'' if symmetric else ' (asymmetric)'} is not supported; "
        "folio reads group, channel and symmetric tensor strategies"
    )


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
