"""Phi-3 (and Phi-3.5/Phi-4-mini): the Llama layer, read from fused checkpoints.

The model is folio's Llama (worker/models/llama.py), whose q/k/v and gate/up
projections are already fused; Phi-3 checkpoints store them fused too
(`qkv_proj`, `gate_up_proj`), so each such tensor is cut into its row blocks
and every block placed as a Llama checkpoint's q/k/v or gate/up would be, which
keeps tensor parallelism's slicing in one place. Partial rotary and LongRoPE
are configuration (worker/config.py, worker/models/rope.py).
"""

from __future__ import annotations

import torch

from folio.kernels.quant import QuantizedTensor
from folio.worker.models.common import split_hf_name
from folio.worker.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    RENAMES = {}  # the checkpoint's names are folio's fused ones

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        _, proj, kind = split_hf_name(name)
        if proj not in ("qkv_proj", "gate_up_proj"):
            return self.place(name, tensor)
        if kind != "weight" or isinstance(tensor, QuantizedTensor):  # packed (qweight, scales, ...) or GGUF blocks
            raise ValueError(f"{name}: folio reads Phi-3's fused projections dense only")
        cfg = self.config
        if proj == "qkv_proj":
            q, kv = cfg.num_q_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            blocks = (q, kv, kv)
        else:
            blocks = (cfg.intermediate_size, cfg.intermediate_size)
        if tensor.shape[0] != sum(blocks):
            raise ValueError(f"{name}: checkpoint has {tensor.shape[0]} rows, the config implies {sum(blocks)}")
        for part, block in enumerate(tensor.split(blocks, dim=0)):
            self.place(name, block, part=part)
