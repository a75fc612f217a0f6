"""Read a llama.cpp GGUF file: ModelConfig from its metadata, tensors by HF name.

Tensors come out one at a time, renamed to Hugging Face names so the model's
load_weight places them exactly as it places safetensors: kept quantized
(QuantizedTensor, worker/gguf_quant.py) when the model keeps its weights so and
the block type is one folio computes with, else dequantized to fp32 by gguf-py
(Q4_1, Q8_0, K-quants, F16, ...).

llama.cpp's converter reorders the rows of Llama's q and k projections: inside
each head it interleaves the two rotary halves (row i, row i + D/2, row i+1, ...)
because llama.cpp rotates adjacent pairs, while folio (like HF) rotates halves.
gguf_tensors puts the rows back. Qwen2, Qwen3 and Gemma 3 files are converted
without reordering.

Gemma 3 files hold only what differs from Gemma 3's defaults, and llama.cpp
fills in the rest as transformers' config does: full attention on every sixth
layer, 10000 as the sliding layers' rope base, and queries scaled by head_dim
(by hidden_size / heads on the 62-layer 27B). Their norm weights are stored as
1 + weight, the factor Gemma's norm applies; folio keeps weight, as
transformers does, and subtracts the 1 back out.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import gguf
import numpy as np
import torch
from gguf.quants import dequantize

from kernels.quant import QuantizedTensor, map_rows
from worker.config import ModelConfig
from worker.gguf_quant import KEPT_QUANTIZED, quantized_tensor


def gguf_reader(path: str) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


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
}
# Gemma 3 normalizes each block's input and output, so its ffn_norm is the MLP's input norm.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# GGUF general.architecture -> folio's (Hugging Face's) model_type.
_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Architectures whose q/k rows llama.cpp interleaved for its pairwise rope.
_PERMUTED_ARCHS = ("llama",)


def gguf_config(reader: gguf.GGUFReader) -> ModelConfig:
    """ModelConfig from GGUF metadata ({arch}.* and tokenizer.ggml.* keys)."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r} (folio reads {', '.join(_ARCHITECTURES)})")

    def meta(key: str, default=None):
        return _field(reader, f"{arch}.{key}", default)

    tensors = {t.name: t for t in reader.tensors}
    hidden = meta("embedding_length")
    num_q = meta("attention.head_count")
    head_dim = meta("attention.key_length") or hidden // num_q
    rot_dim = meta("rope.dimension_count", head_dim)
    if rot_dim != head_dim:
        raise ValueError(f"partial rotary (rope dims {rot_dim} of head_dim {head_dim}) is not supported")
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    family = _gemma3_fields(reader, hidden, num_q, head_dim) if arch == "gemma3" else {}
    if arch == "qwen3":  # q/k norms; attention_bias biases o_proj too
        family = dict(qk_norm=True, o_bias="blk.0.attn_output.bias" in tensors)
    fields = dict(
        architecture=_ARCHITECTURES[arch],
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # GGUF shapes are [cols, rows]
        hidden_size=hidden,
        num_layers=meta("block_count"),
        num_q_heads=num_q,
        num_kv_heads=meta("attention.head_count_kv", num_q),
        head_dim=head_dim,
        intermediate_size=meta("feed_forward_length"),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch, tensors),
        max_position_embeddings=meta("context_length"),
        sliding_window=None,
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
    )
    return ModelConfig(**{**fields, **family})


def _gemma3_fields(reader: gguf.GGUFReader, hidden: int, num_q: int, head_dim: int) -> dict:
    """What a Gemma 3 file leaves to llama.cpp's defaults (see the module docstring)."""
    layers = _field(reader, "gemma3.block_count")
    window = _field(reader, "gemma3.attention.sliding_window")
    return dict(
        sliding_window=int(window),
        hidden_act="gelu_pytorch_tanh",
        norm_weight_offset=1.0,
        embedding_multiplier=math.sqrt(hidden),
        qk_norm=True,
        attn_scale=(hidden / num_q if layers == 62 else head_dim) ** -0.5,
        layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)),
        local_rope_theta=10000.0,
    )


def gguf_quantized(reader: gguf.GGUFReader) -> bool:
    """Whether any weight is stored in a block type folio can keep quantized."""
    return any(t.tensor_type.name in KEPT_QUANTIZED for t in reader.tensors)


def gguf_tensors(
    reader: gguf.GGUFReader, config: ModelConfig, keep_quantized: bool = False
) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """(Hugging Face name, tensor) for every weight, one at a time: fp32, or with
    keep_quantized a QuantizedTensor for each 2-D weight in a block type folio keeps."""
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # already folded into config.rope_scaling
            continue
        name = _hf_name(t.name, config.architecture)
        tensor = None
        if keep_quantized and len(t.shape) == 2:
            tensor = quantized_tensor(t.data, t.tensor_type, rows=int(t.shape[1]), cols=int(t.shape[0]))
        if tensor is None:
            # dequantize returns rows-major [rows, cols]; np.array copies out of the mmap.
            tensor = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        if config.architecture == "gemma3_text" and name.endswith("norm.weight"):
            tensor = tensor - 1.0  # stored as 1 + weight
        if config.architecture in _PERMUTED_ARCHS:
            heads = {"q_proj": config.num_q_heads, "k_proj": config.num_kv_heads}.get(name.split(".")[-2])
            if heads is not None:
                tensor = map_rows(tensor, lambda w, h=heads: _unpermute_rope_rows(w, h))
        yield name, tensor


def _unpermute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleave: [H*D, ...] with rows of each head
    ordered (0, D/2, 1, D/2+1, ...) -> ordered (0, 1, ..., D-1)."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str, architecture: str) -> str:
    base, _, kind = gguf_name.rpartition(".")  # kind: weight | bias
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        names = _GEMMA3_LAYER_NAMES if architecture == "gemma3_text" else _LAYER_NAMES
        if part in names:
            return f"model.layers.{layer}.{names[part]}.{kind}"
    elif base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{kind}"
    raise KeyError(f"GGUF tensor {gguf_name!r} has no place in folio's model")


def _rope_scaling(reader: gguf.GGUFReader, arch: str, tensors: dict) -> Optional[dict]:
    if "rope_freqs.weight" in tensors:
        # Llama-3.1-style scaling, stored by llama.cpp as one divisor per frequency.
        factors = tensors["rope_freqs.weight"].data
        return {"rope_type": "freq_factors", "factors": [float(x) for x in factors]}
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    # Anything but linear is refused by worker/models/rope.py with a clear error.
    return {"rope_type": kind, "factor": float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))}


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()
