"""Gemma (1): the Llama architecture with four differences, each a ModelConfig
field that the Llama family's code (worker/models/llama.py) reads:

- RMSNorm scales by (1 + weight), in fp32 before the cast back
  (norm_weight_offset = 1.0; ops.rms_norm's weight_offset);
- embeddings are multiplied by sqrt(hidden_size), cast to the model's dtype
  first as transformers does (embedding_multiplier);
- the MLP is GeGLU with the tanh GELU (hidden_act "gelu_pytorch_tanh";
  ops.gelu_tanh_and_mul);
- head_dim is explicit (Gemma-7B: 16 x 256 = 4096 query features on a 3072
  hidden size), KV heads may be one (MQA, Gemma-2B), the LM head is tied.

Gemma 2 and 3 are worker/models/gemma2.py and gemma3.py; worker/config.py
refuses their features in a Gemma (1) config.
"""

from __future__ import annotations

from folio.worker.models.llama import LlamaForCausalLM


class GemmaForCausalLM(LlamaForCausalLM):
    """A CausalLM for model_type "gemma"; the code is the Llama family's, the
    differences are its configuration (see the module docstring)."""
