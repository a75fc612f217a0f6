"""What folio's model families share: the attention block over the paged KV
pool, the gated MLP, and a base class that builds the rope table and places
Hugging Face checkpoint tensors.

Every family keeps Hugging Face's parameter names except where folio fuses
projections (q/k/v into qkv_proj, gate/up into gate_up_proj) or shares a block
under its own names; a family's RENAMES maps the Hugging Face projection name
to folio's module and the index of its row block, so loading and the list of
expected checkpoint tensors are derived from one table.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from folio.kernels.interface import KernelOps
from folio.kernels.metadata import AttentionMetadata
from folio.kernels.ops import select_ops
from folio.kernels.quant import QuantizedTensor
from folio.worker.config import ModelConfig
from folio.worker.models.rope import build_cos_sin_cache
from folio.worker.parallel import (
    ColumnParallelLinear,
    PackedWeight,
    RowParallelLinear,
    TPGroup,
    empty_parameter,
    head_partition,
    split_range,
)


def quant_ops_for(cfg: ModelConfig, ops: KernelOps) -> Optional[KernelOps]:
    """The kernels a layer multiplies its kept-quantized weights with; None when
    this model's weights are dense (worker/loader.py decides)."""
    return ops if cfg.quantization is not None else None


class RowParallelLinearWithBias(RowParallelLinear):
    """RowParallelLinear plus a replicated bias. Rank 0 alone adds it to its
    partial sum, so the all-reduce counts it once; on one rank this is exactly
    nn.Linear's fused bias-add."""

    def __init__(self, out_features: int, in_slice: tuple[int, int, int], tp: TPGroup, dtype, device, quant_ops=None):
        super().__init__(out_features, in_slice, tp, dtype, device, quant_ops)
        self.bias = empty_parameter(out_features, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.matmul(x, self.bias if self.tp.rank == 0 else None))

    def load(self, part: int, kind: str, tensor: torch.Tensor) -> None:
        if kind != "bias":
            return super().load(part, kind, tensor)
        if tensor.shape != self.bias.shape:
            raise ValueError(f"checkpoint shape {tuple(tensor.shape)}, model expects {tuple(self.bias.shape)}")
        self.bias.data.copy_(tensor)


class RMSNormWeight(nn.Module):
    """The weight of an RMSNorm (the norm itself is KernelOps.rms_norm)."""

    def __init__(self, size: int, dtype, device):
        super().__init__()
        self.weight = empty_parameter(size, dtype=dtype, device=device)


class Attention(nn.Module):
    """Fused q/k/v, (Qwen3, Gemma 3) per-head q/k norms, rope, paged KV write and
    attention (scores soft-capped where the config says: Gemma 2), output projection.

    Rope rotates the first cos_sin_cache.shape[-1] features of each head (all of
    them but for GPT-NeoX's partial rotary).
    """

    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup, dtype, device):
        super().__init__()
        self.ops = ops
        quant_ops = quant_ops_for(cfg, ops)
        heads = head_partition(cfg.num_q_heads, cfg.num_kv_heads, tp)
        self.hq, self.hkv, self.d = heads.num_q, heads.num_kv, cfg.head_dim  # this rank's heads
        self.qkv_sizes = (self.hq * self.d, self.hkv * self.d, self.hkv * self.d)
        d, q_rows, kv_rows = self.d, cfg.num_q_heads * self.d, cfg.num_kv_heads * self.d
        kv_part = (kv_rows, heads.kv_start * d, self.hkv * d)
        self.qkv_proj = ColumnParallelLinear(
            [(q_rows, heads.q_start * d, self.hq * d), kv_part, kv_part],
            cfg.hidden_size,
            cfg.qkv_bias,
            dtype,
            device,
            quant_ops,
        )
        o_proj = RowParallelLinearWithBias if cfg.o_bias else RowParallelLinear
        self.o_proj = o_proj(cfg.hidden_size, (q_rows, heads.q_start * d, self.hq * d), tp, dtype, device, quant_ops)
        self.scale = cfg.attn_scale or self.d**-0.5
        self.sliding_window = cfg.sliding_window
        self.softcap = cfg.attn_logit_softcapping
        self.eps, self.norm_offset = cfg.rms_norm_eps, cfg.norm_weight_offset
        if cfg.qk_norm:  # over head_dim, shared by all heads: replicated on every rank
            self.q_norm = RMSNormWeight(self.d, dtype, device)
            self.k_norm = RMSNormWeight(self.d, dtype, device)

    def forward(
        self,
        positions: torch.Tensor,
        h: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cos_sin_cache: torch.Tensor,
    ) -> torch.Tensor:
        T = h.shape[0]
        q, k, v = self.qkv_proj(h).split(self.qkv_sizes, dim=-1)  # [T, H*D] each
        q = q.view(T, self.hq, self.d)
        k = k.view(T, self.hkv, self.d)
        v = v.view(T, self.hkv, self.d)
        if hasattr(self, "q_norm"):
            q = self._head_norm(q, self.q_norm.weight)
            k = self._head_norm(k, self.k_norm.weight)
        q, k = self.ops.rotary_embedding(positions, q, k, cos_sin_cache)
        self.ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        o = self.ops.paged_attention(q, k_cache, v_cache, meta, self.scale, self.sliding_window, self.softcap)
        return self.o_proj(o.reshape(T, self.hq * self.d))  # [T, hidden]

    def _head_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm of each head's features: [T, H, D] -> [T, H, D]."""
        T, H, D = x.shape
        return self.ops.rms_norm(x.reshape(T * H, D), weight, self.eps, None, self.norm_offset)[0].view(T, H, D)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate/up fused: SwiGLU (silu) or GeGLU (Gemma)."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup, dtype, device):
        super().__init__()
        self.act_and_mul = {"silu": ops.silu_and_mul, "gelu_pytorch_tanh": ops.gelu_tanh_and_mul}[cfg.hidden_act]
        inter = (cfg.intermediate_size, *split_range(cfg.intermediate_size, tp.world_size, tp.rank))
        quant_ops = quant_ops_for(cfg, ops)
        self.gate_up_proj = ColumnParallelLinear([inter, inter], cfg.hidden_size, False, dtype, device, quant_ops)
        self.down_proj = RowParallelLinear(cfg.hidden_size, inter, tp, dtype, device, quant_ops)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(h)))  # [T, 2I] -> [T, hidden]


def split_hf_name(name: str) -> tuple[str, str, str]:
    """Split "model.layers.0.self_attn.q_proj.weight" into
    ("model.layers.0.self_attn", "q_proj", "weight")."""
    module, _, kind = name.rpartition(".")
    parent, _, proj = module.rpartition(".")
    return parent, proj, kind


class PagedCausalLM(nn.Module):
    """Base of every family's CausalLM (the protocol in worker/models/__init__.py).

    Picks the kernels and the tensor-parallel group, builds the rope table
    shared by all layers, and places checkpoint tensors by Hugging Face name.
    Subclasses set RENAMES, IGNORED_SUFFIXES and TIED_HEAD (the checkpoint name
    of the LM head, skipped when it is tied to the embedding).
    """

    RENAMES: dict[str, tuple[str, Optional[int]]] = {}
    IGNORED_SUFFIXES: tuple[str, ...] = ("rotary_emb.inv_freq",)  # recomputed by folio
    TIED_HEAD = "lm_head.weight"

    def __init__(
        self, config: ModelConfig, device: torch.device | str, ops: Optional[KernelOps], tp: Optional[TPGroup]
    ):
        super().__init__()
        self.config = config
        self.ops = ops or select_ops(device)
        self.tp = tp or TPGroup()
        # fp32 whatever the model dtype (the kernel rotates in fp32); its width is
        # the number of rotated features.
        self.register_buffer(
            "cos_sin_cache",
            build_cos_sin_cache(
                config.rope_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling, device
            ),
            persistent=False,
        )

    def expected_weight_names(self) -> set[str]:
        """Every Hugging Face tensor name a complete checkpoint must provide."""
        names = set()
        for module_name, module in self.named_modules():
            kinds = [n for n, _ in module.named_parameters(recurse=False)]
            kinds += [n for n, child in module.named_children() if isinstance(child, PackedWeight)]
            for kind in kinds:
                parent, proj, kind = split_hf_name(f"{module_name}.{kind}")
                parts = [p for p, (fused, _) in self.RENAMES.items() if fused == proj] or [proj]
                names.update(".".join(filter(None, (parent, p, kind))) for p in parts)
        return names

    def is_ignored_weight(self, name: str) -> bool:
        """Checkpoint tensors that are fine to skip (recomputed or tied away)."""
        return name.endswith(self.IGNORED_SUFFIXES) or (name == self.TIED_HEAD and self.config.tie_word_embeddings)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one full checkpoint tensor, named as in Hugging Face, into its place."""
        self.place(name, tensor)

    def place(self, name: str, tensor: torch.Tensor, part: Optional[int] = None) -> None:
        """Copy `tensor` into the parameter that `name` maps to (row block `part`
        of a fused projection; RENAMES' when None). Sharded layers keep only this
        rank's slice of it (their load method); norms are replicated and copied whole.
        """
        parent, proj, kind = split_hf_name(name)
        module_name, renamed_part = self.RENAMES.get(proj, (proj, 0))
        try:
            module = self.get_submodule(f"{parent}.{module_name}" if parent else module_name)
            if not isinstance(getattr(module, kind), (nn.Parameter, PackedWeight)):
                raise AttributeError(kind)
        except AttributeError:
            raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}") from None
        try:
            if hasattr(module, "load"):
                module.load(renamed_part if part is None else part, kind, tensor)
            else:
                if isinstance(tensor, QuantizedTensor):  # a replicated tensor (norm) is kept dense
                    tensor = tensor.dequantize()
                dst = getattr(module, kind).data
                if dst.shape != tensor.shape:
                    raise ValueError(f"checkpoint shape {tuple(tensor.shape)}, model expects {tuple(dst.shape)}")
                dst.copy_(tensor)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
