"""PyTorch reference implementations of folio's kernels.

These are the CPU path of the model runner and the ground truth every Triton
kernel is tested against. Shapes follow kernels/metadata.py:
  q: [T, num_q_heads, head_dim]; k, v (new tokens): [T, num_kv_heads, head_dim];
  k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
Query head h reads KV head h // (num_q_heads // num_kv_heads) (GQA).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kernels.metadata import AttentionMetadata
from kernels.quant import QuantizedWeight, dequantized_linear


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the new tokens' K and V in their pool slots (in place)."""
    block_size = k_cache.shape[1]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    assert flat_k.shape[0] == k_cache.shape[0] * block_size
    flat_k.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """[num_blocks_used] block ids -> [length, H, D] rows of one sequence."""
    rows = cache.index_select(0, blocks)  # [nb, bs, H, D]
    return rows.reshape(-1, *cache.shape[2:])[:length]


def _allowed(
    q_pos: torch.Tensor, k_pos: torch.Tensor, seq_len: torch.Tensor, sliding_window: Optional[int]
) -> torch.Tensor:
    """Boolean mask: key position k_pos is visible from query position q_pos."""
    ok = (k_pos <= q_pos) & (k_pos < seq_len)
    if sliding_window is not None:
        ok &= (q_pos - k_pos) < sliding_window
    return ok


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: Optional[int] = None,
) -> torch.Tensor:
    """Causal attention of every new token over its sequence's paged context.

    The new tokens' K/V must already be written to the pool (write_kv).
    Returns [T, num_q_heads, head_dim] in q's dtype; math in fp32.
    """
    T, hq, d = q.shape
    hkv = k_cache.shape[2]
    bs = k_cache.shape[1]
    out = torch.empty_like(q)
    qlens, slens = meta.query_lens_list, meta.seq_lens_list
    for rows in _length_groups(
        sorted((i for i, n in enumerate(qlens) if n == 1), key=lambda i: slens[i]), slens, k_cache.shape[1]
    ):
        _decode_batch(q, k_cache, v_cache, meta, scale, sliding_window, rows, out)
    starts = meta.query_start_loc.tolist()
    for i, n in enumerate(qlens):
        if n <= 1:
            continue
        s = slens[i]
        nblocks = (s + bs - 1) // bs
        blocks = meta.block_tables[i, :nblocks].long()
        k = _gather(k_cache, blocks, s).float().transpose(0, 1)  # [hkv, s, d]
        v = _gather(v_cache, blocks, s).float().transpose(0, 1)
        qi = q[starts[i] : starts[i] + n].float().transpose(0, 1)  # [hq, n, d]
        q_pos = torch.arange(s - n, s).unsqueeze(1)
        k_pos = torch.arange(s).unsqueeze(0)
        mask = _allowed(q_pos, k_pos, torch.tensor(s), sliding_window)
        o = F.scaled_dot_product_attention(
            qi.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=hq != hkv
        )
        out[starts[i] : starts[i] + n] = o[0].transpose(0, 1).to(q.dtype)
    return out


def _length_groups(rows: list[int], seq_lens, block_size: int) -> list[list[int]]:
    """Split length-sorted decode rows into groups padded to at most ~1.25x their shortest.

    One padded batch for all rows costs the longest context times the row
    count; one long sequence among short ones made decode attention 6x slower.
    """
    groups: list[list[int]] = []
    for i in rows:
        if groups and seq_lens[i] <= 1.25 * seq_lens[groups[-1][0]] + block_size:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _decode_batch(q, k_cache, v_cache, meta, scale, sliding_window, rows, out) -> None:
    """All single-token sequences at once: one padded gather, one masked SDPA.

    SDPA reads the gathered K/V through a transposed view; an einsum here
    would copy them once more, and on CPU that copy was half the step.
    """
    hq, d = q.shape[1], q.shape[2]
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    idx = torch.tensor(rows, dtype=torch.long)
    seq_lens = meta.seq_lens.index_select(0, idx).long()  # [B]
    nblocks = (int(seq_lens.max()) + bs - 1) // bs
    bt = meta.block_tables.index_select(0, idx)[:, :nblocks].long()  # [B, nb]
    B, S = len(rows), nblocks * bs
    k = k_cache[bt].reshape(B, S, hkv, d).transpose(1, 2).float()  # [B, hkv, S, d]
    v = v_cache[bt].reshape(B, S, hkv, d).transpose(1, 2).float()
    tok = meta.query_start_loc.index_select(0, idx).long()
    qd = q.index_select(0, tok).float().view(B, hq, 1, d)
    k_pos = torch.arange(S).unsqueeze(0)  # [1, S]
    q_pos = (seq_lens - 1).unsqueeze(1)  # [B, 1]
    mask = _allowed(q_pos, k_pos, seq_lens.unsqueeze(1), sliding_window)  # [B, S]
    o = F.scaled_dot_product_attention(qd, k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=hq != hkv)
    out.index_copy_(0, tok, o.view(B, hq, d).to(out.dtype))


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor] = None,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm. Returns (normed, new_residual).

    new_residual = x + residual (or x when residual is None); normed is computed
    from it in fp32 and cast back, matching Hugging Face's LlamaRMSNorm.
    weight_offset=1.0 gives Gemma's (1 + weight) scaling.
    """
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight_offset:
        return (h * (weight.float() + weight_offset)).to(x.dtype), x
    return weight * h.to(x.dtype), x


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half (NeoX-style) rotary embedding, as Hugging Face Llama applies it.

    positions: [T] int; q: [T, Hq, D]; k: [T, Hkv, D];
    cos_sin_cache: [max_positions, rot_dim] = cat(cos, sin) of the rot_dim/2
    frequencies. Only the first rot_dim features of each head rotate.
    """
    cs = cos_sin_cache.index_select(0, positions.long())  # [T, rot]
    half = cs.shape[-1] // 2
    cos, sin = cs[:, :half].unsqueeze(1), cs[:, half:].unsqueeze(1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        xr, xp = x[..., : 2 * half].float(), x[..., 2 * half :]
        x1, x2 = xr[..., :half], xr[..., half:]
        y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
        return torch.cat((y, xp), dim=-1) if xp.shape[-1] else y

    return rot(q), rot(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> [T, I]: silu(gate) * up, gate first (Llama's fused gate_up)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# The ops below are torch's own functions, on every device: they are what
# transformers calls, so folio computes the same values to the last bit, and
# on a GPU torch's fused kernels for them are already memory-bound.


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> [T, I]: gelu_tanh(gate) * up, gate first (Gemma's GeGLU)."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU, exact ("none") or its tanh approximation ("tanh"), as F.gelu."""
    return F.gelu(x, approximate=approximate)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension, with weight and bias (nn.LayerNorm's)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def quantized_linear(x: torch.Tensor, w: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [T, K] -> [T, N] through a group-quantized weight (kernels/quant.py), in
    the weight's compute dtype: torch's CPU int4 kernel where the weight was
    packed for it (CPU, bfloat16), else dequantize and multiply."""
    if w.int4pack is None:
        return dequantized_linear(x, w, bias)
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    y = w.int4pack_matmul(x)
    return y if bias is None else y + bias
