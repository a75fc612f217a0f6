"""Read a llama.cpp GGUF file's tensors by Hugging Face name (its config: worker/gguf_config.py).

Tensors come out one at a time, renamed to Hugging Face names so the model's
load_weight places them exactly as it places safetensors: kept quantized
(QuantizedTensor, worker/gguf_quant.py) when the model keeps its weights so and
the block type is one folio computes with, else dequantized to fp32 by gguf-py
(Q4_1, Q8_0, K-quants, F16, ...).

Where llama.cpp's converter changed a tensor, gguf_tensors undoes it:
- Llama's (and Mixtral's) q and k rows: inside each head the two rotary halves
  are interleaved (row i, row i + D/2, row i+1, ...) because llama.cpp rotates
  adjacent pairs, while folio (like HF) rotates halves. Other archs are converted
  without reordering (Falcon's q/k/v regrouping is read as ModelConfig.qkv_layout).
- Gemma's norm weights are stored as 1 + weight, the factor Gemma's norm
  applies; folio keeps weight, as transformers does, and subtracts the 1.
- Experts are stacked, [experts, rows, cols] per projection (ffn_*_exps); they
  are yielded per expert, dense: folio's expert kernels take no quantized
  weights, so quantized experts are dequantized at load while the file's other
  layers may stay quantized.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from folio.kernels.quant import QuantizedTensor, int4pack_fits, map_rows
from folio.worker.config import ModelConfig
from folio.worker.gguf_config import gguf_config
from folio.worker.gguf_file import GGUFFile, read_gguf
from folio.worker.gguf_quant import KEPT_QUANTIZED, block_group, quantized_tensor

__all__ = ["gguf_config", "gguf_quantized", "gguf_tensors", "read_gguf"]

log = logging.getLogger(__name__)


# GGUF tensor name inside blk.N -> Hugging Face name inside model.layers.N
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3's and Gemma 3's per-head norms
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate",  # the MoE router
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",  # Qwen2-MoE's shared expert
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Gemma 2 and 3 normalize each block's input and output, so ffn_norm is the MLP's input norm.
_SANDWICH_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 stores q/k/v fused, and gate/up fused in ffn_up.
_PHI3_NAMES = {**_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_FALCON_NAMES = {
    "attn_norm": "ln_attn",  # input_layernorm where one norm serves both (7B)
    "attn_norm_2": "ln_mlp",
    "attn_qkv": "self_attention.query_key_value",
    "attn_output": "self_attention.dense",
    "ffn_up": "mlp.dense_h_to_4h",
    "ffn_down": "mlp.dense_4h_to_h",
}
_LAYER_TABLES = {
    "gemma2": _SANDWICH_NAMES,
    "gemma3_text": _SANDWICH_NAMES,
    "phi3": _PHI3_NAMES,
    "falcon": _FALCON_NAMES,
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_FALCON_TOP = {"token_embd": "transformer.word_embeddings", "output_norm": "transformer.ln_f", "output": "lm_head"}
# Stacked experts -> the projection each expert's slice is (Mixtral's own names beside).
_EXPERTS = {
    "ffn_gate_exps": ("gate_proj", "w1"),
    "ffn_up_exps": ("up_proj", "w3"),
    "ffn_down_exps": ("down_proj", "w2"),
}
# Architectures whose q/k rows llama.cpp interleaved for its pairwise rope.
_PERMUTED_ARCHS = ("llama", "mixtral")
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3_text")
# Folded into the config (rope_freqs: Llama 3.1's divisors; Phi-3's LongRoPE factors).
_CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def gguf_quantized(reader: GGUFFile) -> bool:
    """Whether any weight is stored in a block type folio can keep quantized."""
    return any(t.tensor_type.name in KEPT_QUANTIZED for t in reader.tensors)


def gguf_fits_int4pack(reader: GGUFFile) -> bool:
    """Whether torch's CPU int4 kernel takes every quantized weight of the file kept
    quantized (kernels/quant.py int4pack_fits). A Q4_K_M file's Q6_K
    tensors (16 inputs per scale) do not: kept in bfloat16 they would be dequantized
    at every call."""
    plain = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
    quantized = [t for t in reader.tensors if t.tensor_type not in plain]
    # gguf-py's shapes list the input features first.
    return bool(quantized) and all(
        len(t.shape) == 2 and int4pack_fits(block_group(t.tensor_type), t.shape[1]) for t in quantized
    )


def gguf_tensors(
    reader: GGUFFile, config: ModelConfig, keep_quantized: bool = False
) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """(Hugging Face name, tensor) for every weight, one at a time: fp32, or with
    keep_quantized a QuantizedTensor for each 2-D weight in a block type folio keeps."""
    arch = config.architecture
    dequantized_experts = False
    for t in reader.tensors:
        if t.name in _CONFIG_TENSORS:
            continue
        base, _, kind = t.name.rpartition(".")
        part = base.split(".", 2)[-1]
        if part in _EXPERTS:
            dequantized_experts |= t.tensor_type.name in KEPT_QUANTIZED
            yield from _experts(t, config)
            reader.release(t)
            continue
        name = _hf_name(t.name, config)
        tensor = None
        # Phi-3's fused projections are cut into blocks by its model, dense only.
        fused = arch == "phi3" and part in ("attn_qkv", "ffn_up")
        if keep_quantized and len(t.shape) == 2 and not fused:
            tensor = quantized_tensor(t.data, t.tensor_type, rows=int(t.shape[1]), cols=int(t.shape[0]))
        if tensor is None:
            tensor = _dense(t)
        if arch in _GEMMA_ARCHS and name.endswith("norm.weight"):
            tensor = tensor - 1.0  # stored as 1 + weight
        if part == "ffn_gate_inp_shexp":
            tensor = tensor.reshape(1, -1)  # a vector in some files; HF's is [1, hidden]
        if arch in _PERMUTED_ARCHS:
            heads = {"q_proj": config.num_q_heads, "k_proj": config.num_kv_heads}.get(name.split(".")[-2])
            if heads is not None:
                tensor = map_rows(tensor, lambda w, h=heads: _unpermute_rope_rows(w, h))
        yield name, tensor
        reader.release(t)  # the model holds what it needs of it by now
    if dequantized_experts and keep_quantized:
        log.info("quantized expert weights dequantized at load (folio's expert kernels take dense weights)")


def _dense(t) -> torch.Tensor:
    # dequantize returns rows-major [..., rows, cols]; np.array copies out of the mmap.
    return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))


def _experts(t, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """blk.L.ffn_{gate,up,down}_exps [experts, rows, cols] -> one dense tensor per expert."""
    _, layer, part = t.name.rpartition(".")[0].split(".", 2)
    stacked = _dense(t)
    if stacked.dim() != 3 or stacked.shape[0] != config.num_experts:
        raise ValueError(f"GGUF tensor {t.name!r} of shape {tuple(stacked.shape)} is not {config.num_experts} experts")
    hf, mixtral = _EXPERTS[part]
    block, proj = ("block_sparse_moe", mixtral) if config.architecture == "mixtral" else ("mlp", hf)
    for e in range(config.num_experts):
        yield f"model.layers.{layer}.{block}.experts.{e}.{proj}.weight", stacked[e]


def _unpermute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleave: [H*D, ...] with rows of each head
    ordered (0, D/2, 1, D/2+1, ...) -> ordered (0, 1, ..., D-1)."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str, config: ModelConfig) -> str:
    base, _, kind = gguf_name.rpartition(".")  # kind: weight | bias
    arch = config.architecture
    falcon = arch == "falcon"
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        names = _LAYER_TABLES.get(arch, _LAYER_NAMES)
        if falcon and part == "attn_norm" and config.shared_input_norm:
            return f"transformer.h.{layer}.input_layernorm.{kind}"
        if part in names:
            if falcon:
                return f"transformer.h.{layer}.{names[part]}.{kind}"
            if arch == "mixtral" and part == "ffn_gate_inp":
                return f"model.layers.{layer}.block_sparse_moe.gate.{kind}"
            return f"model.layers.{layer}.{names[part]}.{kind}"
    else:
        top = _FALCON_TOP if falcon else _TOP_NAMES
        if base in top:
            return f"{top[base]}.{kind}"
    raise KeyError(f"GGUF tensor {gguf_name!r} has no place in folio's model")
