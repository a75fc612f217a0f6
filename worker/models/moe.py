"""Mixture-of-experts MLPs: Mixtral's and Qwen2/Qwen3-MoE's sparse blocks.

A router picks each token's top-k experts by softmax probability (renormalized
over the k when the config says so, as Mixtral and Qwen3-MoE do); each chosen
expert, a SwiGLU MLP, runs on just its tokens, and the outputs are summed with
the router's weights. Qwen2-MoE adds a shared expert that every token passes
through, scaled by sigmoid(shared_expert_gate(x)).

Experts are stored stacked ([experts, 2 * I, hidden] gate/up rows and
[experts, hidden, I] down), and under tensor parallelism every rank holds its
slice of every expert's intermediate dimension, as the dense MLP is split: the
expert sum is a partial sum, all-reduced once. The router and the shared
expert's gate are replicated.

The experts run through KernelOps.fused_moe. The reference (CPU) is one
F.linear pair per expert that has tokens this step (kernels/reference.py), so
its Python work follows the batch, not the expert count. The Triton form (on
CUDA, or kernels="triton") is kernels/fused_moe.py: the (token, slot) rows
sorted by expert and padded per expert to the GEMM tile, then two grouped GEMMs
over all experts at once, SiLU(gate) * up fused into the first and the router
weight into the second, and each token's k slots summed. Quantized expert
weights are refused at load.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from folio.kernels.interface import KernelOps
from folio.kernels.quant import QuantizedTensor, linear
from folio.worker.config import ModelConfig
from folio.worker.models.common import GatedMLP
from folio.worker.parallel import TPGroup, empty_parameter, split_range

# A checkpoint expert tensor's projection -> (stacked parameter, row block of w13 or None).
EXPERT_PROJECTIONS = {
    "gate_proj": ("w13", 0),
    "up_proj": ("w13", 1),
    "down_proj": ("w2", None),
    "w1": ("w13", 0),  # Mixtral's names
    "w3": ("w13", 1),
    "w2": ("w2", None),
}


class _Weight(nn.Module):
    def __init__(self, *shape: int, dtype, device):
        super().__init__()
        self.weight = empty_parameter(*shape, dtype=dtype, device=device)


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup, dtype, device):
        super().__init__()
        self.ops, self.tp = ops, tp
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        # Qwen's routers hand their weights back in the model's dtype, Mixtral's in fp32.
        self.weights_in_model_dtype = cfg.architecture != "mixtral"
        E, H = cfg.num_experts, cfg.hidden_size
        self.inter_start, self.inter = split_range(cfg.moe_intermediate_size, tp.world_size, tp.rank)
        self.gate = _Weight(E, H, dtype=dtype, device=device)
        self.w13 = empty_parameter(E, 2 * self.inter, H, dtype=dtype, device=device)
        self.w2 = empty_parameter(E, H, self.inter, dtype=dtype, device=device)
        if cfg.shared_expert_intermediate_size:
            shared = dataclasses.replace(cfg, intermediate_size=cfg.shared_expert_intermediate_size)
            self.shared_expert = GatedMLP(shared, ops, tp, dtype, device)
            self.shared_expert_gate = _Weight(1, H, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        probs = torch.softmax(linear(x, self.gate.weight).float(), dim=-1)  # [T, E]
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.renormalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        if self.weights_in_model_dtype:
            weights = weights.to(x.dtype)
        out = self.tp.all_reduce(self.ops.fused_moe(x, self.w13, self.w2, weights, experts))  # [T, hidden]
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(linear(x, self.shared_expert_gate.weight)) * self.shared_expert(x)
        return out

    def load_expert(self, expert: int, proj: str, tensor: torch.Tensor) -> None:
        """One checkpoint tensor of one expert (gate/up/down, or Mixtral's w1/w3/w2), full size."""
        if isinstance(tensor, QuantizedTensor):
            raise ValueError("quantized expert weights are not supported")
        param, block = EXPERT_PROJECTIONS[proj]
        s, n = self.inter_start, self.inter
        if param == "w2":
            dst, src = self.w2[expert], tensor[:, s : s + n]
        else:
            dst, src = self.w13[expert, block * n : (block + 1) * n], tensor[s : s + n]
        if src.shape != dst.shape:
            raise ValueError(f"checkpoint slice {tuple(src.shape)}, model expects {tuple(dst.shape)}")
        dst.copy_(src)

    def expert_names(self, prefix: str, num_experts: int, mixtral: bool) -> set[str]:
        projs = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        return {f"{prefix}.experts.{e}.{p}.weight" for e in range(num_experts) for p in projs}
