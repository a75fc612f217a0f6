"""ModelConfig: the architecture facts folio's model code needs, nothing more.

Built from a Hugging Face config.json (from_hf_config) or from GGUF metadata
(worker/gguf_loader.py). Anything folio's Llama-family model cannot run exactly
(another activation, MLP biases, mixed full/sliding layers) is rejected here,
so a model that loads is a model that computes what transformers computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str                 # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]      # HF-style dict ("rope_type", "factor", ...) or None
    max_position_embeddings: int
    sliding_window: Optional[int]     # every layer attends to at most this many keys
    tie_word_embeddings: bool
    qkv_bias: bool
    bos_token_id: Optional[int]
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; "
                             f"folio runs {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads {self.num_q_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")

    @staticmethod
    def from_hf_config(cfg: dict) -> "ModelConfig":
        """Read a config.json dict (transformers 4.x or 5.x layout)."""
        arch = cfg.get("model_type") or _arch_from_class_names(cfg.get("architectures") or [])
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; folio's MLP is SiLU-gated")
        if cfg.get("mlp_bias", False):
            raise ValueError("MLP biases (mlp_bias=true) are not supported")
        num_q = cfg["num_attention_heads"]
        theta, scaling = _rope(cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else () if eos is None else (eos,)
        return ModelConfig(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_q_heads=num_q,
            num_kv_heads=cfg.get("num_key_value_heads") or num_q,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_q,
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            sliding_window=_sliding_window(arch, cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama-style configs say so explicitly.
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _arch_from_class_names(names: list[str]) -> str:
    for name in names:
        for arch in SUPPORTED_ARCHITECTURES:
            if name.lower().startswith(arch):
                return arch
    raise ValueError(f"config.json names no supported architecture (model_type missing, architectures={names})")


def _rope(cfg: dict) -> tuple[float, Optional[dict]]:
    """(theta, scaling dict or None). transformers 5 folds both into rope_parameters."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    if "type" in params and "rope_type" not in params:   # the pre-4.45 spelling
        params["rope_type"] = params.pop("type")
    if params.get("rope_type", "default") == "default":
        return theta, None
    return theta, params


def _sliding_window(arch: str, cfg: dict) -> Optional[int]:
    """One window for all layers, or None. Mixed full/sliding stacks are refused."""
    window = cfg.get("sliding_window")
    if arch == "qwen2":
        # Qwen2 only slides when asked to, and then only from max_window_layers up.
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            sliding = [cfg.get("use_sliding_window", False) and i >= cfg.get("max_window_layers", 0)
                       for i in range(cfg["num_hidden_layers"])]
        else:
            sliding = [t == "sliding_attention" for t in layer_types]
        if not any(sliding):
            return None
        if not all(sliding):
            raise ValueError("Qwen2 with sliding window on only some layers is not supported")
    if arch == "llama":
        return None
    return int(window) if window else None
