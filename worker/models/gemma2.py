"""Gemma 2: Gemma 3's layer (worker/models/gemma3.py) as it was one generation earlier.

The same four norms a layer, (1 + weight) RMSNorm, embeddings times sqrt(hidden)
(cast to the model's dtype first), GeGLU with the tanh GELU, tied LM head,
scores scaled by query_pre_attn_scalar ** -0.5, and sliding-window layers
between full ones (ModelConfig.layer_types: even layers slide in configs that
predate the field). What differs:
- no q/k norms, and one rope (rope_theta) for every layer;
- the scaled attention scores are soft-capped, c * tanh(s / c) with c =
  attn_logit_softcapping, before the causal and window masks: a kernel
  argument (ops.paged_attention's softcap), carried by the shared Attention;
- the LM head's logits are soft-capped likewise with final_logit_softcapping.
(transformers' Gemma 3 applies the final cap too when its config sets one,
which released ones do not; so that code lives in Gemma 3's.)
"""

from __future__ import annotations

from folio.worker.models.gemma3 import Gemma3ForCausalLM


class Gemma2ForCausalLM(Gemma3ForCausalLM):
    """A CausalLM (see worker/models/__init__.py) for model_type "gemma2"."""
