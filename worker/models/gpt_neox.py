"""GPT-NeoX (Pythia, GPT-NeoX-20B) over folio's paged KV pool.

What sets it apart from the Llama family:

- LayerNorm with bias (ops.layer_norm) instead of RMSNorm, and no fused
  residual add: the residual wiring is its own;
- parallel residual (use_parallel_residual, Pythia's default): attention and
  MLP both read the layer's input, h + attn(ln1(h)) + mlp(ln2(h)); without it
  the two run one after the other as in Llama;
- partial rotary: only the first rotary_pct of each head's features rotate
  (the rope table is that wide; ops.rotary_embedding passes the rest through);
- a plain GELU MLP (dense_h_to_4h, dense_4h_to_h) with biases, biases on the
  attention projections, and an untied LM head, embed_out.

The checkpoint's query_key_value rows are laid out per head as [heads, 3,
head_dim]; load_weight regroups them into folio's [q; k; v] so that the
attention block (and its tensor-parallel split) is the Llama family's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from folio.kernels.interface import KernelOps
from folio.kernels.metadata import AttentionMetadata
from folio.kernels.quant import map_rows
from folio.worker.config import ModelConfig
from folio.worker.models.common import Attention, PagedCausalLM, RowParallelLinearWithBias, quant_ops_for, split_hf_name
from folio.worker.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPGroup,
    VocabParallelEmbedding,
    empty_parameter,
    split_range,
)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (GPT-NeoX's and Falcon's)."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps, dtype, device):
        super().__init__()
        self.ops, self.eps = ops, cfg.rms_norm_eps
        self.weight = empty_parameter(cfg.hidden_size, dtype=dtype, device=device)
        self.bias = empty_parameter(cfg.hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


class GeluMLP(nn.Module):
    """dense_4h_to_h(gelu(dense_h_to_4h(x))): GPT-NeoX's MLP (biased) and Falcon's."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup, dtype, device, bias: bool = True):
        super().__init__()
        self.ops = ops
        self.approximate = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"
        inter = (cfg.intermediate_size, *split_range(cfg.intermediate_size, tp.world_size, tp.rank))
        quant_ops = quant_ops_for(cfg, ops)
        self.dense_h_to_4h = ColumnParallelLinear([inter], cfg.hidden_size, bias, dtype, device, quant_ops)
        down = RowParallelLinearWithBias if bias else RowParallelLinear
        self.dense_4h_to_h = down(cfg.hidden_size, inter, tp, dtype, device, quant_ops)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.ops.gelu(self.dense_h_to_4h(h), self.approximate))


class _Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup, dtype, device):
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        self.input_layernorm = LayerNorm(cfg, ops, dtype, device)
        self.post_attention_layernorm = LayerNorm(cfg, ops, dtype, device)
        self.attention = Attention(cfg, ops, tp, dtype, device)
        self.mlp = GeluMLP(cfg, ops, tp, dtype, device)

    def forward(self, positions, h, meta, k_cache, v_cache, cos_sin_cache):
        attn = self.attention(positions, self.input_layernorm(h), meta, k_cache, v_cache, cos_sin_cache)
        # Sums in transformers' order, so fp32 results agree to the last bits.
        if self.parallel_residual:
            return self.mlp(self.post_attention_layernorm(h)) + attn + h
        h = attn + h
        return self.mlp(self.post_attention_layernorm(h)) + h


class _NeoXModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup, dtype, device):
        super().__init__()
        self.embed_in = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, tp, dtype, device, quant_ops_for(cfg, ops)
        )
        self.layers = nn.ModuleList(_Layer(cfg, ops, tp, dtype, device) for _ in range(cfg.num_layers))
        self.final_layer_norm = LayerNorm(cfg, ops, dtype, device)


class GPTNeoXForCausalLM(PagedCausalLM):
    """A CausalLM (see worker/models/__init__.py) for gpt_neox; construction,
    loading and tensor parallelism as LlamaForCausalLM's."""

    # query_key_value's part is given per row block by load_weight.
    RENAMES = {"query_key_value": ("qkv_proj", None), "dense": ("o_proj", 0)}
    # Old checkpoints also carry the causal mask and its fill value as buffers.
    IGNORED_SUFFIXES = PagedCausalLM.IGNORED_SUFFIXES + (".attention.bias", ".attention.masked_bias")
    TIED_HEAD = "embed_out.weight"

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        ops: Optional[KernelOps] = None,
        tp: Optional[TPGroup] = None,
    ):
        super().__init__(config, device, ops, tp)
        self.gpt_neox = _NeoXModel(config, self.ops, self.tp, dtype, device)
        if not config.tie_word_embeddings:
            self.embed_out = VocabParallelEmbedding(
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
        h = self.gpt_neox.embed_in(input_ids)  # [T, hidden]
        for layer, (k_cache, v_cache) in zip(self.gpt_neox.layers, kv_caches, strict=True):
            h = layer(positions, h, meta, k_cache, v_cache, self.cos_sin_cache)
        return self.gpt_neox.final_layer_norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] fp32 (on every rank)."""
        head = self.gpt_neox.embed_in if self.config.tie_word_embeddings else self.embed_out
        return head.logits(hidden)

    @property
    def num_kv_heads(self) -> int:
        return self.gpt_neox.layers[0].attention.hkv

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        if split_hf_name(name)[1] != "query_key_value":
            return self.place(name, tensor)
        heads, d = self.config.num_q_heads, self.config.head_dim
        if tensor.shape[0] != 3 * heads * d:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model expects {3 * heads * d} rows")
        # Rows [heads, 3, d] -> three [heads * d] blocks q, k, v.
        for part in range(3):

            def rows(t: torch.Tensor, part=part) -> torch.Tensor:
                return t.unflatten(0, (heads, 3, d))[:, part].flatten(0, 1)

            self.place(name, map_rows(tensor, rows), part)
