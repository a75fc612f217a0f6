"""Falcon over folio's paged KV pool: GPT-NeoX's pieces (LayerNorm, GELU MLP,
worker/models/gpt_neox.py) around the shared attention block.

Its variants are configuration (worker/config.py):
- Falcon-7B: one KV head (multi-query), attention and MLP side by side reading
  one shared LayerNorm: h + (mlp(ln(h)) + attn(ln(h)));
- the new decoder architecture (Falcon-40B/180B): grouped KV heads, and a
  LayerNorm each for attention and MLP (ln_attn, ln_mlp);
- Falcon-RW: a KV head per query head, attention then MLP, as in Llama.
The checkpoint fuses q/k/v in query_key_value in one of three row layouts
(ModelConfig.qkv_layout); load_weight regroups them into folio's [q; k; v], so
the attention block and its tensor-parallel split are the Llama family's.
ALiBi Falcons are refused at load.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from folio.kernels.interface import KernelOps
from folio.kernels.metadata import AttentionMetadata
from folio.kernels.quant import map_rows
from folio.worker.config import ModelConfig
from folio.worker.models.common import Attention, PagedCausalLM, quant_ops_for, split_hf_name
from folio.worker.models.gpt_neox import GeluMLP, LayerNorm
from folio.worker.parallel import TPGroup, VocabParallelEmbedding


class _Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup, dtype, device):
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.two_norms = cfg.parallel_residual and not cfg.shared_input_norm
        if self.two_norms:
            self.ln_attn = LayerNorm(cfg, ops, dtype, device)
            self.ln_mlp = LayerNorm(cfg, ops, dtype, device)
        else:
            self.input_layernorm = LayerNorm(cfg, ops, dtype, device)
        if not self.parallel:
            self.post_attention_layernorm = LayerNorm(cfg, ops, dtype, device)
        self.self_attention = Attention(cfg, ops, tp, dtype, device)
        self.mlp = GeluMLP(cfg, ops, tp, dtype, device, bias=cfg.o_bias)

    def forward(self, positions, h, meta, k_cache, v_cache, cos_sin_cache):
        if self.two_norms:
            x_attn, x_mlp = self.ln_attn(h), self.ln_mlp(h)
        else:
            x_attn = x_mlp = self.input_layernorm(h)
        attn = self.self_attention(positions, x_attn, meta, k_cache, v_cache, cos_sin_cache)
        # Sums in transformers' order, so fp32 results agree to the last bits.
        if self.parallel:
            return h + (self.mlp(x_mlp) + attn)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class _FalconModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup, dtype, device):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, tp, dtype, device, quant_ops_for(cfg, ops)
        )
        self.h = nn.ModuleList(_Layer(cfg, ops, tp, dtype, device) for _ in range(cfg.num_layers))
        self.ln_f = LayerNorm(cfg, ops, dtype, device)


class FalconForCausalLM(PagedCausalLM):
    """A CausalLM (see worker/models/__init__.py) for model_type "falcon"."""

    # query_key_value's part is given per row block by load_weight.
    RENAMES = {"query_key_value": ("qkv_proj", None), "dense": ("o_proj", 0)}

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        ops: Optional[KernelOps] = None,
        tp: Optional[TPGroup] = None,
    ):
        super().__init__(config, device, ops, tp)
        self.transformer = _FalconModel(config, self.ops, self.tp, dtype, device)
        if not config.tie_word_embeddings:
            self.lm_head = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, self.tp, dtype, device, quant_ops_for(config, self.ops)
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids, positions: [T] long -> [T, hidden] final-normed hidden states."""
        h = self.transformer.word_embeddings(input_ids)
        for layer, (k_cache, v_cache) in zip(self.transformer.h, kv_caches, strict=True):
            h = layer(positions, h, meta, k_cache, v_cache, self.cos_sin_cache)
        return self.transformer.ln_f(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] fp32 (on every rank)."""
        head = self.transformer.word_embeddings if self.config.tie_word_embeddings else self.lm_head
        return head.logits(hidden)

    @property
    def num_kv_heads(self) -> int:
        return self.transformer.h[0].self_attention.hkv

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        if split_hf_name(name)[1] != "query_key_value":
            return self.place(name, tensor)
        cfg = self.config
        hq, hkv, d = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
        if tensor.shape[0] != (hq + 2 * hkv) * d:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model expects {(hq + 2 * hkv) * d} rows")
        for part in range(3):
            self.place(
                name, map_rows(tensor, lambda t, part=part: _qkv_rows(t, part, cfg.qkv_layout, hq, hkv, d)), part
            )


def _qkv_rows(t: torch.Tensor, part: int, layout: str, hq: int, hkv: int, d: int) -> torch.Tensor:
    """Rows of q (part 0), k (1) or v (2) out of query_key_value's layout."""
    if layout == "blocks":  # [q; k; v]
        return t.split((hq * d, hkv * d, hkv * d))[part]
    if layout == "per_head":  # [heads, 3, d]
        return t.unflatten(0, (hq, 3, d))[:, part].flatten(0, 1)
    groups = t.unflatten(0, (hkv, hq // hkv + 2, d))  # per_kv_group: each KV head's queries, then its k, v
    if part == 0:
        return groups[:, : hq // hkv].flatten(0, 2)
    return groups[:, hq // hkv + part - 1].flatten(0, 1)
