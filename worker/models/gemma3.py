"""Gemma 3 (text): Gemma's pieces (worker/models/gemma.py) in another layer.

- Each block's output is normed before it joins the residual stream, and the
  MLP's input has a norm of its own: four norms a layer ("sandwich" norms).
- Each head's q and k are RMS-normed (Gemma's 1 + weight) before rope, and the
  scores are scaled by query_pre_attn_scalar ** -0.5, not head_dim's.
- Layers alternate between sliding-window attention (sliding_window keys, rope
  at local_rope_theta, unscaled) and full attention (rope_theta, with the
  config's scaling), as ModelConfig.layer_types lists them; each kind has its
  own cos/sin table.
Everything else (attention, GeGLU MLP, embeddings times sqrt(hidden), tied LM
head, tensor parallelism) is the shared code in worker/models/common.py.
Gemma 2 (worker/models/gemma2.py) is this model without q/k norms, with one
rope for every layer (local_rope_theta None) and soft-capped logits.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from folio.kernels.interface import KernelOps
from folio.kernels.metadata import AttentionMetadata
from folio.worker.config import ModelConfig
from folio.worker.models.common import Attention, GatedMLP, PagedCausalLM, RMSNormWeight, quant_ops_for
from folio.worker.models.llama import LlamaForCausalLM
from folio.worker.models.rope import build_cos_sin_cache
from folio.worker.parallel import TPGroup, VocabParallelEmbedding


class _Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding: bool, ops: KernelOps, tp: TPGroup, dtype, device):
        super().__init__()
        self.ops, self.eps, self.sliding = ops, cfg.rms_norm_eps, sliding
        size = cfg.hidden_size
        self.input_layernorm = RMSNormWeight(size, dtype, device)
        self.self_attn = Attention(
            cfg if sliding else dataclasses.replace(cfg, sliding_window=None), ops, tp, dtype, device
        )
        self.post_attention_layernorm = RMSNormWeight(size, dtype, device)
        self.pre_feedforward_layernorm = RMSNormWeight(size, dtype, device)
        self.mlp = GatedMLP(cfg, ops, tp, dtype, device)
        self.post_feedforward_layernorm = RMSNormWeight(size, dtype, device)

    def forward(self, positions, h, residual, meta, k_cache, v_cache, cos_sin_cache):
        """h: the previous layer's output, not yet in the stream `residual`."""
        x, residual = self._norm(h, self.input_layernorm, residual)  # residual += h
        a = self.self_attn(positions, x, meta, k_cache, v_cache, cos_sin_cache)
        a, _ = self._norm(a, self.post_attention_layernorm)
        x, residual = self._norm(a, self.pre_feedforward_layernorm, residual)  # residual += a
        m, _ = self._norm(self.mlp(x), self.post_feedforward_layernorm)
        return m, residual

    def _norm(self, x, norm: RMSNormWeight, residual=None):
        return self.ops.rms_norm(x, norm.weight, self.eps, residual, 1.0)


class _Gemma3Model(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup, dtype, device):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, tp, dtype, device, quant_ops_for(cfg, ops)
        )
        self.layers = nn.ModuleList(
            _Layer(cfg, kind == "sliding_attention", ops, tp, dtype, device) for kind in cfg.layer_types
        )
        self.norm = RMSNormWeight(cfg.hidden_size, dtype, device)


class Gemma3ForCausalLM(PagedCausalLM):
    """A CausalLM (see worker/models/__init__.py) for model_type "gemma3_text"."""

    RENAMES = LlamaForCausalLM.RENAMES  # the same fused q/k/v and gate/up

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        ops: Optional[KernelOps] = None,
        tp: Optional[TPGroup] = None,
    ):
        super().__init__(config, device, ops, tp)  # cos_sin_cache: the full layers' rope
        self.model = _Gemma3Model(config, self.ops, self.tp, dtype, device)
        local = config.local_rope_theta  # None: the sliding layers share the full layers' rope (Gemma 2)
        self.register_buffer(
            "local_cos_sin_cache",
            self.cos_sin_cache
            if local is None
            else build_cos_sin_cache(config.rope_dim, config.max_position_embeddings, local, None, device),
            persistent=False,
        )
        # transformers casts sqrt(hidden) to the model's dtype before multiplying (Gemma's rule)
        self.register_buffer(
            "embed_scale", torch.tensor(config.embedding_multiplier, dtype=dtype, device=device), persistent=False
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids, positions: [T] long -> [T, hidden] final-normed hidden states."""
        h = self.model.embed_tokens(input_ids) * self.embed_scale
        residual = None
        for layer, (k_cache, v_cache) in zip(self.model.layers, kv_caches, strict=True):
            table = self.local_cos_sin_cache if layer.sliding else self.cos_sin_cache
            h, residual = layer(positions, h, residual, meta, k_cache, v_cache, table)
        h, _ = self.ops.rms_norm(h, self.model.norm.weight, self.config.rms_norm_eps, residual, 1.0)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] fp32 (on every rank); the LM head is the embedding.
        With final_logit_softcapping (Gemma 2's, and Gemma 3's when its config sets it)
        the logits are soft-capped as transformers does: cap * tanh(logits / cap)."""
        logits = self.model.embed_tokens.logits(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @property
    def num_kv_heads(self) -> int:
        return self.model.layers[0].self_attn.hkv
