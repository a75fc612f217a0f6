"""Which scheme each linear layer of a Hugging Face quantized checkpoint is stored in.

`hf_quantization(config.json)` reads the checkpoint's `quantization_config`
(GPTQ, AWQ or compressed-tensors) into an HFQuantization: one LinearScheme per
config group and the layers it targets. A method, format or option folio cannot
decode exactly is refused here, at load, with the reason. The on-disk layouts
these schemes name, and their decoders, are in worker/hf_quant.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

GPTQ, GPTQ_V2, AWQ, CT_PACKED, CT_INT = "gptq", "gptq_v2", "awq", "ct-packed", "ct-int"


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

    def fits_int4pack(self) -> bool:
        """Whether torch's CPU int4 kernel takes every scheme's groups (per-channel and
        per-tensor scales it does not)."""
        from folio.kernels.quant import INT4PACK_GROUPS

        return all(s.group in INT4PACK_GROUPS and not s.tensor_scale for _, s in self.groups)

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
