"""Model implementations and the CausalLM protocol the model runner calls.

Every model runs one step over a flattened ragged batch (kernels/metadata.py)
and reads/writes its KV through the paged pool; the runner never sees layers.
"""

from __future__ import annotations

from typing import Protocol

import torch

from folio.kernels.metadata import AttentionMetadata
from folio.worker.models.falcon import FalconForCausalLM
from folio.worker.models.gemma import GemmaForCausalLM
from folio.worker.models.gemma2 import Gemma2ForCausalLM
from folio.worker.models.gemma3 import Gemma3ForCausalLM
from folio.worker.models.gpt_neox import GPTNeoXForCausalLM
from folio.worker.models.llama import LlamaForCausalLM, MoeForCausalLM
from folio.worker.models.phi3 import Phi3ForCausalLM


class CausalLM(Protocol):
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids, positions: [T] long -> [T, hidden] final-normed hidden states."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] fp32."""

    @property
    def num_kv_heads(self) -> int:
        """KV heads this (tensor-parallel) rank holds: the width of its KV pool."""

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Place one checkpoint tensor, named as in Hugging Face."""

    def expected_weight_names(self) -> set[str]:
        """Hugging Face names of every tensor a complete checkpoint provides."""

    def is_ignored_weight(self, name: str) -> bool:
        """A checkpoint tensor that is fine to skip."""


# ModelConfig.architecture -> implementation.
MODEL_CLASSES: dict[str, type] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "mixtral": MoeForCausalLM,
    "qwen2_moe": MoeForCausalLM,
    "qwen3_moe": MoeForCausalLM,
    "phi3": Phi3ForCausalLM,
    "gemma": GemmaForCausalLM,
    "gemma2": Gemma2ForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
    "gpt_neox": GPTNeoXForCausalLM,
    "falcon": FalconForCausalLM,
}
