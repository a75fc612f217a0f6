"""ModelConfig: the architecture facts folio's model code needs, nothing more.

Built from a Hugging Face config.json (from_hf_config) or from GGUF metadata
(worker/gguf_loader.py). Anything folio's model code cannot run exactly
(another activation, MLP biases on a Llama, mixed full/sliding layers in a
family without them, logit softcapping outside Gemma 2) is rejected here, so
a model that loads is a model that computes what transformers computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

# Architecture -> (norm kind, MLP activations) its model code runs (worker/models).
_FAMILIES = {
    "llama": ("rms", ("silu",)),
    "mistral": ("rms", ("silu",)),
    "qwen2": ("rms", ("silu",)),
    "qwen3": ("rms", ("silu",)),
    "mixtral": ("rms", ("silu",)),
    "qwen2_moe": ("rms", ("silu",)),
    "qwen3_moe": ("rms", ("silu",)),
    "phi3": ("rms", ("silu",)),
    "gemma": ("rms", ("gelu_pytorch_tanh",)),
    "gemma2": ("rms", ("gelu_pytorch_tanh",)),
    "gemma3_text": ("rms", ("gelu_pytorch_tanh",)),
    "gpt_neox": ("layer", ("gelu", "gelu_pytorch_tanh")),
    "falcon": ("layer", ("gelu",)),
}
SUPPORTED_ARCHITECTURES = tuple(_FAMILIES)

# Keys of Gemma 2/3 configs that change what the model computes; transformers'
# Gemma (1) class would ignore them and so compute a different model than the
# checkpoint was trained as.
_GEMMA2_KEYS = (
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "sliding_window",
    "layer_types",
    "use_bidirectional_attention",
)


# transformers' config defaults that differ from the Llama family's, for keys a
# config.json of these families may leave out.
_HF_DEFAULTS = {
    "gemma": dict(head_dim=256, tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=2, eos_token_id=1),
    # Gemma2Config's defaults for what changes the computation; a config.json may
    # leave them out, and an explicit null (no cap) overrides them.
    "gemma2": dict(
        head_dim=256,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        bos_token_id=2,
        eos_token_id=1,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    "gemma3_text": dict(
        head_dim=256, tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=2, eos_token_id=1
    ),
    "falcon": dict(bos_token_id=11, eos_token_id=11, tie_word_embeddings=True, max_position_embeddings=2048),
    "gpt_neox": dict(
        bos_token_id=0,
        eos_token_id=2,
        use_parallel_residual=True,
        attention_bias=True,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
    ),
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float  # epsilon of every norm, RMSNorm or (GPT-NeoX) LayerNorm
    rope_theta: float
    rope_scaling: Optional[dict]  # HF-style dict ("rope_type", "factor", ...) or None
    max_position_embeddings: int
    sliding_window: Optional[int]  # every layer attends to at most this many keys
    tie_word_embeddings: bool
    qkv_bias: bool
    bos_token_id: Optional[int]
    eos_token_ids: tuple[int, ...]
    # Defaults below are the Llama family's, so its configs read exactly as before.
    hidden_act: str = "silu"  # the MLP's activation (gated for all but GPT-NeoX)
    norm_kind: str = "rms"  # "rms" | "layer" (LayerNorm with bias, GPT-NeoX)
    norm_weight_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma's 1.0
    embedding_multiplier: float = 1.0  # embeddings times this (Gemma: sqrt(hidden_size))
    parallel_residual: bool = False  # GPT-NeoX: attention and MLP both read the layer input
    rotary_dim: Optional[int] = None  # leading features of a head that rotate; None: all
    o_bias: bool = False  # the attention output projection has a bias
    qk_norm: bool = False  # each head's q and k are RMS-normed before rope (Qwen3, Gemma 3)
    attn_scale: Optional[float] = None  # scores times this; None: head_dim ** -0.5
    # Per layer, "sliding_attention" (sliding_window keys, rope at local_rope_theta) or
    # "full_attention"; None: every layer alike (Gemma 2 and 3 interleave them).
    layer_types: Optional[tuple[str, ...]] = None
    local_rope_theta: Optional[float] = None  # the sliding layers' rope (unscaled); None: the full layers'
    # Gemma 2's soft caps, c * tanh(x / c): on the scaled attention scores before the
    # mask, and on the LM head's logits; None: uncapped.
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    # Falcon: how the checkpoint's fused query_key_value rows are laid out ("blocks": q
    # then k then v; "per_head": [heads, 3, head_dim]; "per_kv_group": [kv heads, q heads
    # per kv head + 2, head_dim]), and whether attention and MLP share one input norm.
    qkv_layout: str = "blocks"
    shared_input_norm: bool = False
    # Mixture of experts (worker/models/moe.py); num_experts 0: every MLP is dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's
    norm_topk_prob: bool = False  # renormalize the top-k router weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert; 0: none
    dense_layers: tuple[int, ...] = ()  # layers whose MLP is dense in a MoE model
    # The scheme whose weights the model keeps quantized at run time ("gguf", "gptq",
    # ...; worker/loader.py decides); None: dense weights (a quantized checkpoint's
    # are dequantized at load).
    quantization: Optional[str] = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; folio runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads {self.num_q_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        norm_kind, activations = _FAMILIES[self.architecture]
        if self.hidden_act not in activations:
            raise ValueError(
                f"unsupported hidden_act {self.hidden_act!r} for {self.architecture}; "
                f"folio's {self.architecture} MLP runs {', '.join(activations)}"
            )
        if self.norm_kind != norm_kind:
            raise ValueError(f"{self.architecture} uses {norm_kind} norms, not {self.norm_kind!r}")
        if self.parallel_residual and self.architecture not in ("gpt_neox", "falcon"):
            raise ValueError("parallel residual is implemented for gpt_neox and falcon only")
        if self.layer_types is not None and (
            len(self.layer_types) != self.num_layers
            or not set(self.layer_types) <= {"sliding_attention", "full_attention"}
        ):
            raise ValueError(
                f"layer_types must give sliding_attention or full_attention for each of {self.num_layers} layers"
            )
        for cap in (self.attn_logit_softcapping, self.final_logit_softcapping):
            if cap is not None and not cap > 0:
                raise ValueError(f"logit softcapping must be positive or None, got {cap}")
        if self.final_logit_softcapping is not None and self.architecture not in ("gemma2", "gemma3_text"):
            raise ValueError("final logit softcapping is implemented for Gemma 2 and 3 only")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and in (0, head_dim {self.head_dim}]")

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    @property
    def rope_dim(self) -> int:
        """Features of each head that rotate (the cos/sin table's width)."""
        return self.rotary_dim or self.head_dim

    @staticmethod
    def from_hf_config(cfg: dict) -> "ModelConfig":
        """Read a config.json dict (transformers 4.x or 5.x layout)."""
        arch = cfg.get("model_type") or _arch_from_class_names(cfg.get("architectures") or [])
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; folio runs {', '.join(SUPPORTED_ARCHITECTURES)}")
        cfg = {**_HF_DEFAULTS.get(arch, {}), **cfg}
        if arch == "falcon":
            cfg = _falcon_names(cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else () if eos is None else (eos,)
        family = {
            "gemma": _gemma,
            "gemma2": _gemma2,
            "gemma3_text": _gemma3,
            "gpt_neox": _gpt_neox,
            "phi3": _phi3,
            "falcon": _falcon,
        }.get(arch, _llama)
        fields = dict(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
        return ModelConfig(**{**fields, **family(arch, cfg)})  # a family may narrow the context


def _llama(arch: str, cfg: dict) -> dict:
    """llama, mistral, qwen2, qwen3, and their mixtures of experts (mixtral, qwen2_moe, qwen3_moe)."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; folio's MLP is SiLU-gated")
    if cfg.get("mlp_bias", False):
        raise ValueError("MLP biases (mlp_bias=true) are not supported")
    num_q = cfg["num_attention_heads"]
    theta, scaling = _rope(cfg)
    return dict(
        num_q_heads=num_q,
        num_kv_heads=cfg.get("num_key_value_heads") or num_q,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_q,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=_sliding_window(arch, cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Llama-style configs say so explicitly.
        qkv_bias=arch in ("qwen2", "qwen2_moe") or bool(cfg.get("attention_bias", False)),
        # transformers' Llama and Qwen3 bias o_proj with q/k/v; Mistral and Qwen2 never do.
        o_bias=arch in ("llama", "qwen3", "qwen3_moe") and bool(cfg.get("attention_bias", False)),
        qk_norm=arch in ("qwen3", "qwen3_moe"),
        **(_moe(arch, cfg) if arch in ("mixtral", "qwen2_moe", "qwen3_moe") else {}),
    )


def _phi3(arch: str, cfg: dict) -> dict:
    """Phi-3 and Phi-3.5/4-mini: the Llama layer with a partial rotary and LongRoPE.

    LongRoPE switches a sequence to its long factors once it outgrows the original
    context, which changes the keys already cached; folio serves the original
    context only, with the short factors, which is exactly what transformers
    computes for every sequence that fits it."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; folio's MLP is SiLU-gated")
    num_q = cfg["num_attention_heads"]
    head_dim = cfg["hidden_size"] // num_q
    theta, scaling = _rope(cfg)
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rotary_dim = int(head_dim * params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    if rotary_dim % 2 or rotary_dim == 0:
        raise ValueError(f"Phi-3 partial rotary factor gives {rotary_dim} rotary features; folio needs an even number")
    context = cfg.get("max_position_embeddings", 4096)
    if scaling is not None:
        if scaling["rope_type"] not in ("longrope", "su", "yarn"):  # transformers reads all three as LongRoPE
            raise ValueError(f"unsupported Phi-3 rope type {scaling['rope_type']!r} (folio runs default and longrope)")
        scaling, context = _longrope(scaling, cfg, context, rotary_dim)
    return dict(
        num_q_heads=num_q,
        num_kv_heads=cfg.get("num_key_value_heads") or num_q,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=int(cfg["sliding_window"]) if cfg.get("sliding_window") else None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=False,
        rotary_dim=None if rotary_dim == head_dim else rotary_dim,
        max_position_embeddings=context,
    )


def _longrope(scaling: dict, cfg: dict, context: int, rotary_dim: int) -> tuple[dict, int]:
    """(the short-factor rope folio computes, the original context it is exact within)."""
    original = scaling.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    if not original:
        raise ValueError("longrope needs original_max_position_embeddings")
    short = [float(f) for f in scaling["short_factor"]]
    if len(short) != rotary_dim // 2:
        raise ValueError(f"longrope short_factor has {len(short)} entries, expected {rotary_dim // 2}")
    factor = scaling.get("factor") or context / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:  # as transformers derives it
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    rope = {"rope_type": "longrope", "short_factor": short, "attention_factor": float(attention_factor)}
    return rope, min(context, int(original))


def _gemma(arch: str, cfg: dict) -> dict:
    """Gemma 1."""
    present = [k for k in _GEMMA2_KEYS if cfg.get(k) not in (None, False)]
    if present:
        raise ValueError(
            f"Gemma config sets {', '.join(present)}: Gemma 2/3 features that transformers' Gemma (1) "
            "ignores; a Gemma 2 or 3 checkpoint says model_type gemma2 or gemma3_text"
        )
    # transformers 4.x reads hidden_activation (None meaning the tanh GELU) and ignores
    # hidden_act; 5.x reads hidden_act and maps the legacy "gelu" to the tanh GELU.
    # Only values both versions agree on are accepted.
    act = cfg.get("hidden_act", "gelu_pytorch_tanh")
    declared = cfg.get("hidden_activation")
    if act not in ("gelu", "gelu_pytorch_tanh") or declared not in (None, "gelu_pytorch_tanh"):
        raise ValueError(
            f"unsupported Gemma activation (hidden_act {act!r}, hidden_activation "
            f"{declared!r}); folio's Gemma MLP is GeGLU with gelu_pytorch_tanh"
        )
    theta, scaling = _rope(cfg)
    return dict(
        _gemma_fields(cfg, theta, scaling), sliding_window=None, tie_word_embeddings=bool(cfg["tie_word_embeddings"])
    )


def _gemma_fields(cfg: dict, theta: float, scaling: Optional[dict]) -> dict:
    """What Gemma 1, 2 and 3 share: (1 + weight) norms, embeddings times sqrt(hidden), GeGLU."""
    num_q = cfg["num_attention_heads"]
    bias = bool(cfg.get("attention_bias", False))
    return dict(
        num_q_heads=num_q,
        num_kv_heads=cfg.get("num_key_value_heads") or num_q,
        head_dim=cfg["head_dim"],
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=bias,
        o_bias=bias,
        hidden_act="gelu_pytorch_tanh",
        norm_weight_offset=1.0,
        embedding_multiplier=math.sqrt(cfg["hidden_size"]),
    )


def _gemma2(arch: str, cfg: dict) -> dict:
    """Gemma 2: Gemma's norms, embeddings and GeGLU in Gemma 3's layer without q/k norms;
    query_pre_attn_scalar, sliding layers between full ones (one rope for all), and
    soft caps on the attention scores and the final logits."""
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("bidirectional attention (an embedding model's) is not supported")
    # transformers' Gemma 2 reads hidden_activation alone (hidden_act, often beside it, is unused).
    act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"unsupported Gemma 2 activation {act!r}; folio's Gemma MLP is GeGLU with gelu_pytorch_tanh")
    n = cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types")
    if layer_types is None:  # configs before layer_types: even layers slide, odd ones are full
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if not cfg.get("tie_word_embeddings", True):
        raise ValueError("Gemma 2 with an untied LM head is not supported")
    theta, scaling = _rope(cfg)
    return dict(
        _gemma_fields(cfg, theta, scaling),
        sliding_window=_window_of_sliding_layers(cfg, layer_types),
        tie_word_embeddings=True,
        attn_scale=float(cfg["query_pre_attn_scalar"]) ** -0.5,
        layer_types=tuple(layer_types),
        attn_logit_softcapping=_optional_float(cfg.get("attn_logit_softcapping")),
        final_logit_softcapping=_optional_float(cfg.get("final_logit_softcapping")),
    )


def _optional_float(x) -> Optional[float]:
    return None if x is None else float(x)


def _gemma3(arch: str, cfg: dict) -> dict:
    """Gemma 3 (text): Gemma's norms, embeddings and GeGLU; q/k norms, a query scale of
    its own, and sliding layers with their own rope between full ones."""
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("bidirectional attention (an embedding model's) is not supported")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"unsupported Gemma 3 activation {act!r}; folio's Gemma MLP is GeGLU with gelu_pytorch_tanh")
    n = cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types")
    if layer_types is None:  # 4.x configs before layer_types: every pattern-th layer is full
        pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # 5.x: one rope per layer type
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:  # 4.x: rope_theta and rope_scaling for full layers, rope_local_base_freq for sliding ones
        full = {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", 1000000.0)}
        local = {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
    theta, scaling = _rope({"rope_parameters": full})
    local_theta, local_scaling = _rope({"rope_parameters": local}, default_theta=10000.0)
    if local_scaling is not None:
        raise ValueError(f"Gemma 3 sliding layers with rope scaling {local_scaling} are not supported")
    if not cfg.get("tie_word_embeddings", True):
        raise ValueError("Gemma 3 with an untied LM head is not supported")
    return dict(
        _gemma_fields(cfg, theta, scaling),
        sliding_window=_window_of_sliding_layers(cfg, layer_types),
        tie_word_embeddings=True,
        qk_norm=True,
        attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
        layer_types=tuple(layer_types),
        local_rope_theta=local_theta,
        # transformers' Gemma 3 applies a final logit cap its config sets but never
        # passes attn_logit_softcapping to its attention: folio computes the same.
        final_logit_softcapping=_optional_float(cfg.get("final_logit_softcapping")),
    )


def _moe(arch: str, cfg: dict) -> dict:
    """Mixtral's and Qwen2/3-MoE's expert settings."""
    if arch == "mixtral":
        experts, inter, renorm = cfg["num_local_experts"], cfg["intermediate_size"], True
        dense: tuple[int, ...] = ()
    else:
        experts = cfg["num_experts"] if "num_experts" in cfg else cfg["num_local_experts"]  # 4.x, 5.x spellings
        inter, renorm = cfg["moe_intermediate_size"], bool(cfg.get("norm_topk_prob"))
        step, only = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or ())
        n = cfg["num_hidden_layers"]
        dense = tuple(i for i in range(n) if i in only or experts == 0 or (i + 1) % step)
    if not 0 < cfg["num_experts_per_tok"] <= experts:
        raise ValueError(f"num_experts_per_tok {cfg['num_experts_per_tok']} must be in 1..{experts}")
    return dict(
        num_experts=experts,
        num_experts_per_tok=cfg["num_experts_per_tok"],
        moe_intermediate_size=inter,
        norm_topk_prob=renorm,
        shared_expert_intermediate_size=(cfg.get("shared_expert_intermediate_size") or 0) if arch == "qwen2_moe" else 0,
        dense_layers=dense,
    )


def _falcon_names(cfg: dict) -> dict:
    """Falcon configs' own spellings (n_embed, n_layer, n_head, ffn_hidden_size) as the rest's."""
    hidden = cfg.get("hidden_size") or cfg["n_embed"]
    return {
        **cfg,
        "hidden_size": hidden,
        "num_hidden_layers": cfg.get("num_hidden_layers") or cfg["n_layer"],
        "num_attention_heads": cfg.get("num_attention_heads") or cfg["n_head"],
        "intermediate_size": cfg.get("ffn_hidden_size") or 4 * hidden,
    }


def _falcon(arch: str, cfg: dict) -> dict:
    """Falcon: the new decoder architecture (40B/180B: grouped KV heads, a norm each for
    attention and MLP) and the old one (7B: one KV head, one shared norm; RW: per-head
    q/k/v, attention then MLP). Rotary only: ALiBi is refused."""
    if cfg.get("alibi"):
        raise ValueError("Falcon with ALiBi (alibi=true) is not supported: folio's attention is rotary")
    if cfg.get("activation", "gelu") != "gelu":
        raise ValueError(f"unsupported Falcon activation {cfg['activation']!r}; folio's Falcon MLP is GELU")
    hidden, num_q = cfg["hidden_size"], cfg["num_attention_heads"]
    new = bool(cfg.get("new_decoder_architecture", False))
    parallel = bool(cfg.get("parallel_attn", True))
    if new and not parallel:
        raise ValueError("Falcon's new decoder architecture without parallel_attn is not supported")
    if new:
        num_kv, layout = cfg.get("num_kv_heads") or num_q, "per_kv_group"
        shared = (cfg.get("num_ln_in_parallel_attn") or 2) == 1
    elif cfg.get("multi_query", True):
        num_kv, layout, shared = 1, "blocks", parallel
    else:
        num_kv, layout, shared = num_q, "per_head", parallel
        if (cfg.get("num_kv_heads") or num_q) != num_q:
            raise ValueError("Falcon without multi_query or the new architecture has a KV head per query head")
    theta, scaling = _rope(cfg)
    bias = bool(cfg.get("bias", False))
    return dict(
        num_q_heads=num_q,
        num_kv_heads=num_kv,
        head_dim=hidden // num_q,
        rms_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        qkv_bias=bias,
        o_bias=bias,
        hidden_act="gelu",
        norm_kind="layer",
        parallel_residual=parallel,
        qkv_layout=layout,
        shared_input_norm=shared,
    )


def _window_of_sliding_layers(cfg: dict, layer_types) -> Optional[int]:
    if "sliding_attention" not in layer_types:
        return None
    if not cfg.get("sliding_window"):
        raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
    return int(cfg["sliding_window"])


def _gpt_neox(arch: str, cfg: dict) -> dict:
    """GPT-NeoX (Pythia)."""
    num_q = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    head_dim = hidden // num_q
    if hidden % num_q or cfg.get("head_dim") not in (None, head_dim):
        raise ValueError(
            f"GPT-NeoX heads must split hidden_size {hidden} evenly ({num_q} heads, head_dim {cfg.get('head_dim')})"
        )
    # 4.x spells rotary_emb_base and rotary_pct at the top level; 5.x folds them into
    # rope_parameters (rope_theta, partial_rotary_factor).
    theta, scaling = _rope(cfg, default_theta=cfg.get("rotary_emb_base", 10000.0))
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    fraction = params.get("partial_rotary_factor", cfg.get("rotary_pct", 0.25))
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "partial_rotary_factor"}
    rotary_dim = int(head_dim * fraction)
    if rotary_dim % 2 or rotary_dim == 0:
        raise ValueError(
            f"partial rotary factor {fraction} of head_dim {head_dim} gives {rotary_dim} "
            "rotary features; folio needs a positive even number"
        )
    bias = bool(cfg["attention_bias"])
    return dict(
        num_q_heads=num_q,
        num_kv_heads=num_q,
        head_dim=head_dim,
        rms_norm_eps=float(cfg["layer_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bias,
        o_bias=bias,
        hidden_act=cfg["hidden_act"],
        norm_kind="layer",
        parallel_residual=bool(cfg["use_parallel_residual"]),
        rotary_dim=None if rotary_dim == head_dim else rotary_dim,
    )


def _arch_from_class_names(names: list[str]) -> str:
    for name in names:
        for arch in SUPPORTED_ARCHITECTURES:
            prefix = arch.replace("_", "")
            # Gemma2ForCausalLM or GPTNeoXJapaneseForCausalLM are other architectures.
            if name.lower().startswith(prefix) and name.lower()[len(prefix) :].startswith(("for", "model")):
                return arch
    raise ValueError(f"config.json names no supported architecture (model_type missing, architectures={names})")


def _rope(cfg: dict, default_theta: float = 10000.0) -> tuple[float, Optional[dict]]:
    """(theta, scaling dict or None). transformers 5 folds both into rope_parameters."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", default_theta)))
    legacy = params.pop("type", None)  # the pre-4.45 spelling
    params.setdefault("rope_type", legacy or "default")
    if params.get("rope_type", "default") == "default":
        return theta, None
    return theta, params


def _sliding_window(arch: str, cfg: dict) -> Optional[int]:
    """One window for all layers, or None. Mixed full/sliding stacks are refused."""
    window = cfg.get("sliding_window")
    if arch in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        # Qwen2 and 3 only slide when asked to, and then only from max_window_layers up.
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            sliding = [
                cfg.get("use_sliding_window", False) and i >= cfg.get("max_window_layers", 0)
                for i in range(cfg["num_hidden_layers"])
            ]
        else:
            sliding = [t == "sliding_attention" for t in layer_types]
        if not any(sliding):
            return None
        if not all(sliding):
            raise ValueError(f"{arch} with sliding window on only some layers is not supported")
    if arch == "llama":
        return None
    return int(window) if window else None
