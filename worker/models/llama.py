"""The Llama family (Llama 2/3, Mistral, Qwen2 and 3, and Gemma 1) over folio's paged KV pool.

Differences between them are configuration, not code: Qwen2 adds q/k/v
biases (ModelConfig.qkv_bias), Qwen3 RMS-norms each head's q and k
(qk_norm), Mistral a sliding window, Llama-3 rope scaling
(worker/models/rope.py), small models tie lm_head to the embedding; Gemma
scales its norms by (1 + weight), its embeddings by sqrt(hidden_size), and
gates its MLP with the tanh GELU (worker/models/gemma.py).

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

from folio.kernels.interface import KernelOps
from folio.kernels.metadata import AttentionMetadata
from folio.worker.config import ModelConfig
from folio.worker.models.common import Attention, GatedMLP, PagedCausalLM, RMSNormWeight, quant_ops_for
from folio.worker.models.moe import EXPERT_PROJECTIONS, SparseMoE
from folio.worker.parallel import TPGroup, VocabParallelEmbedding

# Hugging Face projection -> (folio's fused projection, index of its row block).
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class _DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup, dtype, device, moe: bool = False):
        super().__init__()
        self.ops, self.eps, self.offset = ops, cfg.rms_norm_eps, cfg.norm_weight_offset
        self.input_layernorm = RMSNormWeight(cfg.hidden_size, dtype, device)
        self.self_attn = Attention(cfg, ops, tp, dtype, device)
        self.post_attention_layernorm = RMSNormWeight(cfg.hidden_size, dtype, device)
        self.mlp = (SparseMoE if moe else GatedMLP)(cfg, ops, tp, dtype, device)

    def forward(self, positions, h, residual, meta, k_cache, v_cache, cos_sin_cache):
        # The residual stream is carried separately so each norm fuses its add.
        h, residual = self.ops.rms_norm(h, self.input_layernorm.weight, self.eps, residual, self.offset)
        h = self.self_attn(positions, h, meta, k_cache, v_cache, cos_sin_cache)
        h, residual = self.ops.rms_norm(h, self.post_attention_layernorm.weight, self.eps, residual, self.offset)
        return self.mlp(h), residual


class _LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup, dtype, device):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, tp, dtype, device, quant_ops_for(cfg, ops)
        )
        self.layers = nn.ModuleList(
            _DecoderLayer(cfg, ops, tp, dtype, device, cfg.is_moe_layer(i)) for i in range(cfg.num_layers)
        )
        self.norm = RMSNormWeight(cfg.hidden_size, dtype, device)


class LlamaForCausalLM(PagedCausalLM):
    """A CausalLM (see worker/models/__init__.py) for llama, mistral, qwen2, qwen3 and gemma.

    Parameters are created uninitialised on `device` in `dtype`; fill them with
    load_weight (worker/loader.py does) before calling forward. With a `tp`
    group of several ranks this is one rank's shard, and forward and
    compute_logits are collectives: every rank calls them with the same input.
    """

    RENAMES = _FUSED

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        ops: Optional[KernelOps] = None,
        tp: Optional[TPGroup] = None,
    ):
        super().__init__(config, device, ops, tp)
        self.model = _LlamaModel(config, self.ops, self.tp, dtype, device)
        if not config.tie_word_embeddings:
            self.lm_head = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, self.tp, dtype, device, quant_ops_for(config, self.ops)
            )
        # transformers multiplies by the multiplier cast to the model's dtype first
        # (Gemma's sqrt(3072) becomes 55.5 in bf16), so folio does too.
        self.register_buffer(
            "embed_scale",
            None
            if config.embedding_multiplier == 1.0
            else torch.tensor(config.embedding_multiplier, dtype=dtype, device=device),
            persistent=False,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids, positions: [T] long -> [T, hidden] final-normed hidden states.

        kv_caches[i] = (k_cache, v_cache) of layer i, each
        [num_blocks, block_size, num_kv_heads, head_dim]; the step's new K/V
        are written into them at meta.slot_mapping.
        """
        h = self.model.embed_tokens(input_ids)  # [T, hidden]
        if self.embed_scale is not None:
            h = h * self.embed_scale
        residual = None
        for layer, (k_cache, v_cache) in zip(self.model.layers, kv_caches, strict=True):
            h, residual = layer(positions, h, residual, meta, k_cache, v_cache, self.cos_sin_cache)
        h, _ = self.ops.rms_norm(
            h, self.model.norm.weight, self.config.rms_norm_eps, residual, self.config.norm_weight_offset
        )
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] fp32 (on every rank)."""
        head = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return head.logits(hidden)

    @property
    def num_kv_heads(self) -> int:
        """KV heads this rank holds (its KV pool's width)."""
        return self.model.layers[0].self_attn.hkv


class MoeForCausalLM(LlamaForCausalLM):
    """Mixtral, Qwen2-MoE and Qwen3-MoE: the Llama family's model with SparseMoE MLPs
    (ModelConfig.is_moe_layer). Checkpoints name each expert's tensors; they are
    placed into the stacked expert weights here. Mixtral calls the block
    block_sparse_moe where folio (like Qwen) says mlp."""

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        parts = name.split(".")
        if "experts" not in parts:
            return self.place(name, tensor)
        i = parts.index("experts")  # model.layers.L.mlp.experts.E.proj.weight
        moe = self.get_submodule(".".join(parts[:i]))
        if not isinstance(moe, SparseMoE) or parts[-1] != "weight" or parts[i + 2] not in EXPERT_PROJECTIONS:
            raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
        try:
            moe.load_expert(int(parts[i + 1]), parts[i + 2], tensor)
        except (ValueError, IndexError) as e:
            raise ValueError(f"{name}: {e}") from None

    def expected_weight_names(self) -> set[str]:
        mixtral = self.config.architecture == "mixtral"
        names = set()
        for name in super().expected_weight_names():
            if name.endswith((".mlp.w13", ".mlp.w2")):
                continue  # the stacked experts: named per expert below
            names.add(name.replace(".mlp.gate.", ".block_sparse_moe.gate.") if mixtral else name)
        for i, layer in enumerate(self.model.layers):
            if isinstance(layer.mlp, SparseMoE):
                block = "block_sparse_moe" if mixtral else "mlp"
                names |= layer.mlp.expert_names(f"model.layers.{i}.{block}", self.config.num_experts, mixtral)
        return names
