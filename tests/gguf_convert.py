"""Tiny GGUF files of the families beyond Llama/Qwen, written as llama.cpp's
convert_hf_to_gguf.py writes them (its GemmaModel, Gemma2Model, Phi3MiniModel,
FalconModel, LlamaModel for Mixtral, Qwen2MoeModel and Qwen3MoeModel): the same
architecture names, metadata keys, tensor names and tensor transforms:

- Gemma norms stored as 1 + weight; no LM head (tied);
- Phi-3's fused qkv and gate_up kept fused (attn_qkv, ffn_up), LongRoPE as
  rope_factors_long/short tensors plus the original context and attention factor;
- Falcon's query_key_value regrouped from [kv groups, queries + k + v, D] rows
  into [q; k; v], feed_forward_length written as 4 * hidden;
- Mixtral's q/k rows interleaved per head (llama arch), experts stacked into
  ffn_{gate,up,down}_exps [experts, rows, cols], routers as ffn_gate_inp,
  Qwen2-MoE's shared expert as ffn_*_shexp and ffn_gate_inp_shexp.

Where llama.cpp fixes what a tiny checkpoint varies, the file is converted from a
variant that llama.cpp would run as transformers does (gguf_source).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from tests.gguf_fixtures import _gguf_name, _interleave_rope_rows
from tests.model_fixtures import _hf_config, make_tiny_model, save_random_model

ARCHS = {
    "gemma": "gemma",
    "gemma2": "gemma2",
    "phi3": "phi3",
    "falcon": "falcon",
    "falcon_new": "falcon",
    "mixtral": "llama",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    # The tiny Qwen2-MoE as it is, dense layer 1 included: what llama.cpp's converter
    # writes for it (ffn_gate/up/down, no router), which llama.cpp itself cannot run.
    "qwen2_moe_mlp_only": "qwen2moe",
}
_AS = {"qwen2_moe_mlp_only": "qwen2_moe"}
# Families whose file stores these weights as Q8_0 blocks (the rest F32): every 2-D
# weight of Gemma 2; Phi-3's fused ones among others; Qwen3-MoE's stacked experts
# and attention (k left F32 beside Q8_0 q and v).
Q8_0_PARTS = {
    "gemma2": ("token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
    "phi3": ("attn_qkv", "attn_output", "ffn_up", "ffn_down"),
    "qwen3_moe": ("attn_q", "attn_v", "attn_output", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"),
}


def gguf_source(family: str, path) -> str:
    """The HF checkpoint a family's GGUF file is converted from: the tiny model,
    or a variant where llama.cpp cannot express the tiny model's setting:
    Gemma 2's query_pre_attn_scalar (not stored: llama.cpp scales by head_dim),
    Falcon-7B's MLP width (llama.cpp assumes 4 * hidden), Falcon-40B's biases
    (llama.cpp's Falcon has none), Qwen2-MoE's dense layer (llama.cpp's qwen2moe
    has experts in every layer)."""
    if family in _AS:
        return make_tiny_model(_AS[family], path)
    config = _hf_config(family)
    if family == "gemma2":
        config.query_pre_attn_scalar = config.head_dim
    elif family == "falcon":
        config.ffn_hidden_size = 4 * config.hidden_size
    elif family == "falcon_new":
        config.bias = False
    elif family == "qwen2_moe":
        config.mlp_only_layers = []  # llama.cpp's qwen2moe needs a router in every layer
    else:
        return make_tiny_model(family, path)
    return save_random_model(config, os.path.join(str(path), f"{family}-llamacpp"), seed=100 + len(family))


def convert(family: str, path) -> str:
    """make_tiny_gguf for the families of ARCHS; returns the .gguf path."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    kind = "Q8_0" if family in Q8_0_PARTS else "F32"
    out = os.path.join(str(path), f"{family}-gguf", f"tiny-{family}.{kind}.gguf")
    if os.path.isfile(out):
        return out
    src = gguf_source(family, path)
    config = AutoConfig.from_pretrained(src)
    arch, family = ARCHS[family], _AS.get(family, family)
    state = load_file(os.path.join(src, "model.safetensors"))
    if arch == "falcon":
        tensors = _falcon_tensors(state, config)
    else:
        tensors = _llama_style_tensors(family, state, config)
    _write(out, arch, _metadata(family, arch, config), tensors, Q8_0_PARTS.get(family, ()))
    return out


def _llama_style_tensors(family: str, state: dict, config):
    """(GGUF name, fp32 array) of the Llama-layered families, as llama.cpp renames them."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    experts: dict[str, list] = {}
    if family == "phi3":
        params = config.rope_parameters
        yield "rope_factors_long.weight", np.asarray(params["long_factor"], dtype=np.float32)
        yield "rope_factors_short.weight", np.asarray(params["short_factor"], dtype=np.float32)
    for name, t in state.items():
        if family in ("gemma", "gemma2") and name.endswith("norm.weight"):
            t = t + 1.0  # GemmaModel.modify_tensors
        if family == "mixtral" and (".q_proj." in name or ".k_proj." in name):
            t = _interleave_rope_rows(t, heads if ".q_proj." in name else kv_heads)
        if ".experts." in name:  # model.layers.L.{mlp|block_sparse_moe}.experts.E.proj.weight
            parts = name.split(".")
            experts.setdefault(f"blk.{parts[2]}.{_EXPERT_PARTS[parts[6]]}.weight", []).append((int(parts[5]), t))
            continue
        yield _llama_gguf_name(family, name), t.numpy()
    for name, items in experts.items():  # stacked in expert order, as the converter does
        yield name, torch.stack([t for _, t in sorted(items, key=lambda x: x[0])]).numpy()


_EXPERT_PARTS = {
    "gate_proj": "ffn_gate_exps",
    "w1": "ffn_gate_exps",
    "up_proj": "ffn_up_exps",
    "w3": "ffn_up_exps",
    "down_proj": "ffn_down_exps",
    "w2": "ffn_down_exps",
}
_EXTRA_NAMES = {
    "self_attn.qkv_proj": "attn_qkv",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
_GEMMA2_NAMES = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def _llama_gguf_name(family: str, hf: str) -> str:
    base, _, kind = hf.rpartition(".")
    if base.startswith("model.layers."):
        _, _, layer, part = base.split(".", 3)
        table = {**_EXTRA_NAMES, **(_GEMMA2_NAMES if family == "gemma2" else {})}
        if part in table:
            return f"blk.{layer}.{table[part]}.{kind}"
    return _gguf_name(hf)


_FALCON_NAMES = {
    "input_layernorm": "attn_norm",
    "ln_attn": "attn_norm",
    "ln_mlp": "attn_norm_2",
    "self_attention.query_key_value": "attn_qkv",
    "self_attention.dense": "attn_output",
    "mlp.dense_h_to_4h": "ffn_up",
    "mlp.dense_4h_to_h": "ffn_down",
}


def _falcon_tensors(state: dict, config):
    n_head, hidden = config.num_attention_heads, config.hidden_size
    # The converter reads n_head_kv from config.json, which a Falcon-7B's leaves out (1).
    n_kv = config.num_kv_heads if config.new_decoder_architecture else 1
    d = hidden // n_head
    top = {"transformer.word_embeddings": "token_embd", "transformer.ln_f": "output_norm", "lm_head": "output"}
    for name, t in state.items():
        base, _, kind = name.rpartition(".")
        if base in top:
            yield f"{top[base]}.{kind}", t.numpy()
            continue
        _, _, layer, part = base.split(".", 3)  # transformer.h.L.part
        if part == "self_attention.query_key_value":  # FalconModel.modify_tensors
            qkv = t.view(n_kv, n_head // n_kv + 2, d, hidden)
            q = qkv[:, :-2].reshape(n_head * d, hidden)
            k = qkv[:, [-2]].reshape(n_kv * d, hidden)
            v = qkv[:, [-1]].reshape(n_kv * d, hidden)
            t = torch.cat((q, k, v)).reshape_as(t)
        yield f"blk.{layer}.{_FALCON_NAMES[part]}.{kind}", t.numpy()


def _metadata(family: str, arch: str, config) -> dict:
    """{key under the arch's prefix: value}, as the converter's set_gguf_parameters writes."""
    if arch == "falcon":
        return {
            "context_length": 2048,  # FalconModel writes 2048: not in config.json
            "embedding_length": config.hidden_size,
            "feed_forward_length": 4 * config.hidden_size,
            "block_count": config.num_hidden_layers,
            "attention.head_count": config.num_attention_heads,
            "attention.head_count_kv": config.num_kv_heads if config.new_decoder_architecture else 1,
            "attention.layer_norm_epsilon": config.layer_norm_epsilon,
        }
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    meta = {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "block_count": config.num_hidden_layers,
        "attention.head_count": heads,
        "attention.head_count_kv": config.num_key_value_heads,
        "attention.layer_norm_rms_epsilon": config.rms_norm_eps,
    }
    params = getattr(config, "rope_parameters", None) or {}
    if family in ("gemma", "gemma2", "qwen3_moe"):
        meta |= {"attention.key_length": head_dim, "attention.value_length": head_dim}
    if family == "gemma2":
        meta |= {
            "attn_logit_softcapping": config.attn_logit_softcapping,
            "final_logit_softcapping": config.final_logit_softcapping,
            "attention.sliding_window": config.sliding_window,
        }
    if family not in ("gemma", "gemma2"):  # Gemma's converter leaves the rope base at llama.cpp's 10000
        meta |= {"rope.freq_base": params["rope_theta"], "rope.dimension_count": head_dim}
    if family == "phi3":
        original = config.original_max_position_embeddings
        scale = config.max_position_embeddings / original
        meta |= {
            "rope.dimension_count": int(head_dim * params["partial_rotary_factor"]),
            "rope.scaling.original_context_length": original,
            "rope.scaling.attn_factor": float(np.sqrt(1 + np.log(scale) / np.log(original))) if scale > 1 else 1.0,
            "attention.sliding_window": config.sliding_window,
        }
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        experts = config.num_local_experts if family == "mixtral" else config.num_experts
        meta |= {"expert_count": experts, "expert_used_count": config.num_experts_per_tok}
        if family != "mixtral":
            meta["expert_feed_forward_length"] = config.moe_intermediate_size
        if family == "qwen2_moe":
            meta["expert_shared_feed_forward_length"] = config.shared_expert_intermediate_size
    return meta


def _write(out: str, arch: str, meta: dict, tensors, q8_parts: tuple[str, ...]) -> None:
    import gguf
    from gguf.quants import quantize

    os.makedirs(os.path.dirname(out), exist_ok=True)
    w = gguf.GGUFWriter(out + ".partial", arch)
    for key, value in meta.items():
        if isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", int(value))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, array in tensors:
        part = name.rpartition(".")[0].split(".")[-1]
        if part in q8_parts and name.endswith(".weight"):
            qtype = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), raw_dtype=qtype)
        else:  # squeezed as the converter does: Qwen2-MoE's [1, hidden] shared gate is stored [hidden]
            w.add_tensor(name, np.ascontiguousarray(array.squeeze(), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(out + ".partial", out)
