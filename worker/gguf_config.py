"""ModelConfig from a llama.cpp GGUF file's metadata ({arch}.* and tokenizer.ggml.* keys).

A GGUF file holds only what llama.cpp's converter (convert_hf_to_gguf.py) wrote;
what it leaves out, llama.cpp's runtime fills in with defaults of its own, and
folio fills in the same ones, so a file computes here what it computes there:

- Gemma 2 and 3 scale queries by head_dim ** -0.5 (by hidden_size / heads on the
  46-layer Gemma 2 27B and the 62-layer Gemma 3 27B: query_pre_attn_scalar is not
  stored); Gemma 2's layers alternate sliding and full (even ones slide), its soft
  caps default to 50 and 30 and its window to 4096; Gemma 3 attends fully on every
  sixth layer, with rope base 10000 on the sliding ones.
- Falcon (7B and 40B; llama.cpp's falcon arch) runs attention beside the MLP,
  with one input norm or, where attn_norm_2 is present, one each; its q/k/v rows
  are stored [q; k; v] (the converter regroups them), without biases.
- Phi-3's LongRoPE is stored as rope_factors_long/short tensors; folio serves the
  original context with the short factors, which is what llama.cpp runs for any
  context up to the original one.
- Mixture-of-experts files: Mixtral is the llama arch with ffn_gate_inp routers;
  Mixtral and Qwen3-MoE renormalize the top-k weights, Qwen2-MoE does not. A layer
  without a router is dense (Qwen2-MoE's mlp_only_layers).
"""

from __future__ import annotations

import math
from typing import Optional

import gguf

from folio.worker.config import ModelConfig
from folio.worker.gguf_file import GGUFFile

# GGUF general.architecture -> folio's (Hugging Face's) model_type; "llama" with
# expert routers is Mixtral.
ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "falcon": "falcon",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
}
_MOE_ARCHS = ("qwen2moe", "qwen3moe")
# Whether llama.cpp renormalizes the top-k router weights, per architecture.
_RENORMALIZE = {"llama": True, "qwen2moe": False, "qwen3moe": True}


def gguf_config(reader: GGUFFile) -> ModelConfig:
    """ModelConfig from GGUF metadata; a feature folio does not compute exactly is refused."""
    arch = reader.field("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r} (folio reads {', '.join(ARCHITECTURES)})")

    def meta(key: str, default=None):
        return reader.field(f"{arch}.{key}", default)

    tensors = {t.name: t for t in reader.tensors}
    hidden = meta("embedding_length")
    num_q = meta("attention.head_count")
    head_dim = meta("attention.key_length") or hidden // num_q
    rot_dim = meta("rope.dimension_count", head_dim)
    if rot_dim != head_dim and arch != "phi3":
        raise ValueError(f"partial rotary (rope dims {rot_dim} of head_dim {head_dim}) is not supported")
    eos = [reader.field(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    fields = dict(
        architecture=ARCHITECTURES[arch],
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # GGUF shapes are [cols, rows]
        hidden_size=hidden,
        num_layers=meta("block_count"),
        num_q_heads=num_q,
        num_kv_heads=meta("attention.head_count_kv", num_q),
        head_dim=head_dim,
        intermediate_size=meta("feed_forward_length"),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 0.0)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch, tensors),
        max_position_embeddings=meta("context_length"),
        sliding_window=None,
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        bos_token_id=reader.field("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
    )
    if arch in ("qwen3", "qwen3moe"):
        fields["qk_norm"] = True
    if arch in ("gemma", "gemma2", "gemma3"):
        fields |= _gemma_fields(reader, arch, hidden, num_q, head_dim)
    elif arch == "phi3":
        fields |= _phi3_fields(reader, tensors, head_dim, rot_dim, fields["max_position_embeddings"])
    elif arch == "falcon":
        fields |= _falcon_fields(reader, tensors)
    if arch in _MOE_ARCHS or (arch == "llama" and "blk.0.ffn_gate_inp.weight" in tensors):
        fields |= _moe_fields(reader, arch, tensors, fields["num_layers"])
    return ModelConfig(**fields)


def _gemma_fields(reader: GGUFFile, arch: str, hidden: int, num_q: int, head_dim: int) -> dict:
    """What Gemma 1, 2 and 3 files leave to llama.cpp's defaults (see the module docstring)."""
    out = dict(
        hidden_act="gelu_pytorch_tanh",
        norm_weight_offset=1.0,  # stored as 1 + weight; gguf_tensors subtracts it
        embedding_multiplier=math.sqrt(hidden),
    )
    if arch == "gemma":
        return out
    layers = reader.field(f"{arch}.block_count")
    big = 46 if arch == "gemma2" else 62  # the 27B, whose queries are scaled by hidden / heads
    out["attn_scale"] = (hidden / num_q if layers == big else head_dim) ** -0.5
    out["sliding_window"] = int(reader.field(f"{arch}.attention.sliding_window", 4096))
    if arch == "gemma2":
        out["layer_types"] = tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers))
        out["attn_logit_softcapping"] = float(reader.field("gemma2.attn_logit_softcapping", 50.0))
        out["final_logit_softcapping"] = float(reader.field("gemma2.final_logit_softcapping", 30.0))
    else:
        out["qk_norm"] = True
        out["layer_types"] = tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers))
        out["local_rope_theta"] = 10000.0
    return out


def _phi3_fields(reader: GGUFFile, tensors: dict, head_dim: int, rot_dim: int, context: int) -> dict:
    if rot_dim % 2:
        raise ValueError(f"Phi-3 rope dims {rot_dim}: folio needs an even number")
    window = reader.field("phi3.attention.sliding_window")
    out = dict(rotary_dim=None if rot_dim == head_dim else rot_dim, sliding_window=int(window) if window else None)
    if "rope_factors_short.weight" in tensors:
        original = reader.field("phi3.rope.scaling.original_context_length")
        if not original:
            raise ValueError("Phi-3 rope factors without rope.scaling.original_context_length")
        short = [float(x) for x in tensors["rope_factors_short.weight"].data]
        if len(short) != rot_dim // 2:
            raise ValueError(f"rope_factors_short has {len(short)} entries, expected {rot_dim // 2}")
        attention_factor = float(reader.field("phi3.rope.scaling.attn_factor", 1.0))
        out["rope_scaling"] = {"rope_type": "longrope", "short_factor": short, "attention_factor": attention_factor}
        out["max_position_embeddings"] = min(context, int(original))
    return out


def _falcon_fields(reader: GGUFFile, tensors: dict) -> dict:
    biases = [n for n in tensors if n.startswith("blk.") and n.endswith(".bias") and "norm" not in n]
    if biases:  # llama.cpp's Falcon graph has none, so such a file means something else there
        raise ValueError(f"Falcon GGUF with linear biases ({biases[0]}, ...) is not supported")
    return dict(
        rms_norm_eps=float(reader.field("falcon.attention.layer_norm_epsilon")),
        hidden_act="gelu",
        norm_kind="layer",
        parallel_residual=True,  # llama.cpp's falcon graph is always parallel (7B, 40B)
        qkv_layout="blocks",  # the converter regroups q/k/v rows so
        shared_input_norm="blk.0.attn_norm_2.weight" not in tensors,
        qkv_bias=False,
        o_bias=False,
    )


def _moe_fields(reader: GGUFFile, arch: str, tensors: dict, layers: int) -> dict:
    experts = reader.field(f"{arch}.expert_count")
    top_k = reader.field(f"{arch}.expert_used_count")
    if not experts or not top_k or top_k > experts:
        raise ValueError(f"GGUF expert_count {experts} / expert_used_count {top_k} are not a mixture of experts")
    gating = reader.field(f"{arch}.expert_gating_func")
    if gating not in (None, gguf.ExpertGatingFuncType.SOFTMAX):  # folio's routers are softmax top-k
        raise ValueError(f"GGUF expert gating function {gating} is not supported (folio routes by softmax)")
    up = tensors.get("blk.0.ffn_up_exps.weight")
    if up is None:
        raise ValueError("GGUF mixture of experts without stacked ffn_*_exps tensors is not supported")
    shared = tensors.get("blk.0.ffn_up_shexp.weight")
    return dict(
        architecture="mixtral" if arch == "llama" else ARCHITECTURES[arch],
        num_experts=int(experts),
        num_experts_per_tok=int(top_k),
        moe_intermediate_size=int(up.shape[1]),  # [hidden, I, experts]
        norm_topk_prob=bool(reader.field(f"{arch}.expert_weights_norm", _RENORMALIZE[arch])),
        shared_expert_intermediate_size=0 if shared is None else int(shared.shape[1]),
        dense_layers=tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensors),
    )


def _rope_scaling(reader: GGUFFile, arch: str, tensors: dict) -> Optional[dict]:
    if "rope_freqs.weight" in tensors:
        # Llama-3.1-style scaling, stored by llama.cpp as one divisor per frequency.
        factors = tensors["rope_freqs.weight"].data
        return {"rope_type": "freq_factors", "factors": [float(x) for x in factors]}
    kind = reader.field(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    # Anything but linear is refused by worker/models/rope.py with a clear error.
    return {"rope_type": kind, "factor": float(reader.field(f"{arch}.rope.scaling.factor", 1.0))}
