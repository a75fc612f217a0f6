"""The Llama family (Llama 2/3, Mistral, Qwen2) over folio's paged KV pool.

Differences between the three are configuration, not code: Qwen2 adds q/k/v
biases (ModelConfig.qkv_bias), Mistral a sliding window, Llama-3 rope scaling
(worker/models/rope.py), small models tie lm_head to the embedding.

q/k/v live in one fused matrix and gate/up in another: one GEMM instead of
three (two) per layer. Parameter names otherwise mirror Hugging Face's, and
load_weight accepts Hugging Face tensor names, so every loader (safetensors,
GGUF) speaks one naming and the fused layout is known in this file only.

Under tensor parallelism (worker/parallel.py) each rank builds only its shard:
its heads, its slice of the MLP and of the vocabulary; load_weight hands each
full checkpoint tensor to the layer that keeps its slice.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kernels.metadata import AttentionMetadata
from kernels.ops import KernelOps, select_ops
from worker.config import ModelConfig
from worker.models.rope import build_cos_sin_cache
from worker.parallel import (ColumnParallelLinear, RowParallelLinear, TPGroup,
                             VocabParallelEmbedding, empty_parameter, head_partition,
                             split_range)

# Hugging Face projection -> (folio's fused projection, index of its row block).
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
# Tensors some checkpoints carry that folio recomputes or does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _split_name(name: str) -> tuple[str, str, str]:
    """Split "model.layers.0.self_attn.q_proj.weight" into
    ("model.layers.0.self_attn", "q_proj", "weight")."""
    module, _, kind = name.rpartition(".")
    parent, _, proj = module.rpartition(".")
    return parent, proj, kind


class _RMSNorm(nn.Module):
    def __init__(self, size: int, dtype, device):
        super().__init__()
        self.weight = empty_parameter(size, dtype=dtype, device=device)


class _Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup, dtype, device):
        super().__init__()
        self.ops = ops
        heads = head_partition(cfg.num_q_heads, cfg.num_kv_heads, tp)
        self.hq, self.hkv, self.d = heads.num_q, heads.num_kv, cfg.head_dim   # this rank's heads
        self.qkv_sizes = (self.hq * self.d, self.hkv * self.d, self.hkv * self.d)
        d, q_rows, kv_rows = self.d, cfg.num_q_heads * self.d, cfg.num_kv_heads * self.d
        kv_part = (kv_rows, heads.kv_start * d, self.hkv * d)
        self.qkv_proj = ColumnParallelLinear([(q_rows, heads.q_start * d, self.hq * d), kv_part, kv_part],
                                             cfg.hidden_size, cfg.qkv_bias, dtype, device)
        self.o_proj = RowParallelLinear(cfg.hidden_size, (q_rows, heads.q_start * d, self.hq * d),
                                        tp, dtype, device)
        self.scale = self.d ** -0.5
        self.sliding_window = cfg.sliding_window

    def forward(self, positions: torch.Tensor, h: torch.Tensor, meta: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                cos_sin_cache: torch.Tensor) -> torch.Tensor:
        T = h.shape[0]
        q, k, v = self.qkv_proj(h).split(self.qkv_sizes, dim=-1)      # [T, H*D] each
        q = q.view(T, self.hq, self.d)
        k = k.view(T, self.hkv, self.d)
        v = v.view(T, self.hkv, self.d)
        q, k = self.ops.rotary_embedding(positions, q, k, cos_sin_cache)
        self.ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        o = self.ops.paged_attention(q, k_cache, v_cache, meta, self.scale, self.sliding_window)
        return self.o_proj(o.reshape(T, self.hq * self.d))              # [T, hidden]


class _MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup, dtype, device):
        super().__init__()
        self.ops = ops
        inter = (cfg.intermediate_size, *split_range(cfg.intermediate_size, tp.world_size, tp.rank))
        self.gate_up_proj = ColumnParallelLinear([inter, inter], cfg.hidden_size, False, dtype, device)
        self.down_proj = RowParallelLinear(cfg.hidden_size, inter, tp, dtype, device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(h)))   # [T, 2I] -> [T, hidden]


class _DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup, dtype, device):
        super().__init__()
        self.ops, self.eps = ops, cfg.rms_norm_eps
        self.input_layernorm = _RMSNorm(cfg.hidden_size, dtype, device)
        self.self_attn = _Attention(cfg, ops, tp, dtype, device)
        self.post_attention_layernorm = _RMSNorm(cfg.hidden_size, dtype, device)
        self.mlp = _MLP(cfg, ops, tp, dtype, device)

    def forward(self, positions, h, residual, meta, k_cache, v_cache, cos_sin_cache):
        # The residual stream is carried separately so each norm fuses its add.
        h, residual = self.ops.rms_norm(h, self.input_layernorm.weight, self.eps, residual)
        h = self.self_attn(positions, h, meta, k_cache, v_cache, cos_sin_cache)
        h, residual = self.ops.rms_norm(h, self.post_attention_layernorm.weight, self.eps, residual)
        return self.mlp(h), residual


class _LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup, dtype, device):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype, device)
        self.layers = nn.ModuleList(_DecoderLayer(cfg, ops, tp, dtype, device) for _ in range(cfg.num_layers))
        self.norm = _RMSNorm(cfg.hidden_size, dtype, device)


class LlamaForCausalLM(nn.Module):
    """A CausalLM (see worker/models/__init__.py) for llama, mistral and qwen2.

    Parameters are created uninitialised on `device` in `dtype`; fill them with
    load_weight (worker/loader.py does) before calling forward. With a `tp`
    group of several ranks this is one rank's shard, and forward and
    compute_logits are collectives: every rank calls them with the same input.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", ops: Optional[KernelOps] = None,
                 tp: Optional[TPGroup] = None):
        super().__init__()
        self.config = config
        self.ops = ops or select_ops(device)
        self.tp = tp or TPGroup()
        self.model = _LlamaModel(config, self.ops, self.tp, dtype, device)
        if not config.tie_word_embeddings:
            self.lm_head = VocabParallelEmbedding(config.vocab_size, config.hidden_size, self.tp,
                                                  dtype, device)
        # Shared by all layers; fp32 whatever the model dtype (the kernel rotates in fp32).
        self.register_buffer("cos_sin_cache", build_cos_sin_cache(
            config.head_dim, config.max_position_embeddings, config.rope_theta,
            config.rope_scaling, device), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """input_ids, positions: [T] long -> [T, hidden] final-normed hidden states.

        kv_caches[i] = (k_cache, v_cache) of layer i, each
        [num_blocks, block_size, num_kv_heads, head_dim]; the step's new K/V
        are written into them at meta.slot_mapping.
        """
        h = self.model.embed_tokens(input_ids)                             # [T, hidden]
        residual = None
        for layer, (k_cache, v_cache) in zip(self.model.layers, kv_caches, strict=True):
            h, residual = layer(positions, h, residual, meta, k_cache, v_cache, self.cos_sin_cache)
        h, _ = self.ops.rms_norm(h, self.model.norm.weight, self.config.rms_norm_eps, residual)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] fp32 (on every rank)."""
        head = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return head.logits(hidden)

    @property
    def num_kv_heads(self) -> int:
        """KV heads this rank holds (its KV pool's width)."""
        return self.model.layers[0].self_attn.hkv

    # ------------------------------------------------------------- loading

    def expected_weight_names(self) -> set[str]:
        """Every Hugging Face tensor name a complete checkpoint must provide."""
        names = set()
        for name, _ in self.named_parameters():
            parent, proj, kind = _split_name(name)
            parts = [p for p, (fused, _) in _FUSED.items() if fused == proj] or [proj]
            names.update(".".join(filter(None, (parent, p, kind))) for p in parts)
        return names

    def is_ignored_weight(self, name: str) -> bool:
        """Checkpoint tensors that are fine to skip (recomputed or tied away)."""
        return name.endswith(_IGNORED_SUFFIXES) or (
            name == "lm_head.weight" and self.config.tie_word_embeddings)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one full checkpoint tensor, named as in Hugging Face, into its place.

        Sharded layers keep only this rank's slice of it (their load method);
        norms are replicated and copied whole.
        """
        parent, proj, kind = _split_name(name)
        fused, part = _FUSED.get(proj, (proj, 0))
        try:
            module = self.get_submodule(f"{parent}.{fused}" if parent else fused)
            if not isinstance(getattr(module, kind), nn.Parameter):
                raise AttributeError(kind)
        except AttributeError:
            raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}") from None
        try:
            if hasattr(module, "load"):
                module.load(part, kind, tensor)
            else:
                dst = getattr(module, kind).data
                if dst.shape != tensor.shape:
                    raise ValueError(f"checkpoint shape {tuple(tensor.shape)}, model expects {tuple(dst.shape)}")
                dst.copy_(tensor)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
