"""Rotary position embedding tables.

build_cos_sin_cache returns the [max_positions, head_dim] table that
ops.rotary_embedding reads: row p = cat(cos(p * inv_freq), sin(p * inv_freq)).
It is computed once, in fp32, the way transformers computes cos/sin
(fp32 position times fp32 inverse frequency), so both rotate identically.

Scaling types (ModelConfig.rope_scaling["rope_type"]):
  default / None  plain inv_freq = theta ** (-2i / dim)
  linear          positions divided by factor, i.e. inv_freq / factor
  llama3          Llama-3.1's wavelength-dependent interpolation
  freq_factors    inv_freq / factors[i], factors given per frequency: how GGUF
                  files store Llama-3.1 scaling (the rope_freqs tensor)
  longrope        inv_freq / short_factor[i], cos and sin times attention_factor:
                  Phi-3's LongRoPE within its original context (worker/config.py)
Others (dynamic NTK, YaRN) depend on sequence length or rescale attention, so
they are refused rather than computed wrongly.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[dict]) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    if kind in ("freq_factors", "longrope"):
        key = "factors" if kind == "freq_factors" else "short_factor"
        factors = torch.tensor(scaling[key], dtype=torch.float32)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"rope {key} has {factors.numel()} entries, expected {inv_freq.numel()}")
        # transformers' own order of operations for each, so the tables agree to the bit
        return inv_freq / factors if kind == "freq_factors" else 1.0 / (factors * theta**exponents)
    raise NotImplementedError(
        f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3, longrope)"
    )


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Long wavelengths slow down by `factor`, short ones stay; the band between
    the two cut-offs blends the two linearly in (context / wavelength)."""
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    blend = (context / wavelen - lo) / (hi - lo)  # in [0, 1] inside the band
    out = (1 - blend) * inv_freq / factor + blend * inv_freq
    out = torch.where(wavelen < context / hi, inv_freq, out)
    return torch.where(wavelen > context / lo, inv_freq / factor, out)


def build_cos_sin_cache(
    head_dim: int, max_positions: int, theta: float, scaling: Optional[dict], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cat(cos, sin) of position * inv_freq."""
    inv_freq = inverse_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, D/2]
    table = torch.cat((angles.cos(), angles.sin()), dim=-1)
    attention_factor = (scaling or {}).get("attention_factor", 1.0)
    return (table if attention_factor == 1.0 else table * attention_factor).to(device)
