"""PyTorch reference implementations of folio's kernels.

These are the CPU path of the model runner and the ground truth every Triton
kernel is tested against. Shapes follow kernels/metadata.py:
  q: [T, num_q_heads, head_dim]; k, v (new tokens): [T, num_kv_heads, head_dim];
  k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
Query head h reads KV head h // (num_q_heads // num_kv_heads) (GQA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from folio.kernels.metadata import AttentionMetadata
from folio.kernels.quant import (
    QuantizedWeight,
    amx_granted,
    dequantized_linear,
    linear,
    table_path,
    wide_path,
)


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
    softcap: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Causal attention of every new token over its sequence's paged context.

    The new tokens' K/V must already be written to the pool (write_kv).
    softcap (Gemma 2's attn_logit_softcapping): the scaled scores become
    softcap * tanh(scores / softcap) before the causal and window masks, as
    transformers computes them; None: uncapped.
    Returns [T, num_q_heads, head_dim] in q's dtype. Every row computes in
    compute_dtype (fp32: a 16-bit pool's K/V widened after the gather), the
    result rounded once, at the end; capped scores always in fp32.
    """
    check_softcap(softcap)
    dt = torch.float32 if softcap is not None else compute_dtype
    gqa = q.shape[1] != k_cache.shape[2]
    groups = _decode_plan(meta, k_cache.shape[1], sliding_window, dt)
    if groups and groups[0].tokens is None:  # a pure-decode step, rows in order
        return _decode_group(q, k_cache, v_cache, groups[0], scale, softcap, gqa, dt).to(q.dtype)
    out = torch.empty_like(q)
    for g in groups:
        o = _decode_group(q.index_select(0, g.tokens), k_cache, v_cache, g, scale, softcap, gqa, dt)
        out.index_copy_(0, g.tokens, o.to(out.dtype))
    _prefill(q, k_cache, v_cache, meta, scale, sliding_window, softcap, out, dt)
    return out


def cpu_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """paged_attention in the dtype this CPU runs it fastest in (folio's CPU kernels).

    Over a bf16 pool where torch's attention runs on AMX tiles, in bf16: 0.41-0.66x
    the time of the fp32 path, and the pool's bf16 K/V are read as they are. Without
    AMX, torch's CPU SDPA at one query row is 2-4x slower in bf16 than the gather,
    the widening and an fp32 SDPA together, so every other pool computes in fp32
    (`folio bench kernels` on a machine without a GPU measures both)."""
    return paged_attention(
        q, k_cache, v_cache, meta, scale, sliding_window, softcap, cpu_attention_dtype(k_cache.dtype)
    )


def cpu_attention_dtype(cache_dtype: torch.dtype) -> torch.dtype:
    """What cpu_paged_attention computes in over a pool of cache_dtype on this CPU."""
    return torch.bfloat16 if cache_dtype == torch.bfloat16 and amx_granted() else torch.float32


def check_softcap(softcap: Optional[float]) -> None:
    """A cap of zero or below would divide by zero or flip the scores' sign."""
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")


def _attend(q, k, v, mask, scale: float, softcap: Optional[float], gqa: bool) -> torch.Tensor:
    """q [B, hq, n, d], k and v [B, hkv, S, d], mask (bool, True where visible, or
    additive in q's dtype) broadcastable to [B, hq, n, S] or None -> [B, hq, n, d],
    all in one dtype."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    # SDPA cannot cap scores: spelled out, in transformers' eager order (scale, cap,
    # then mask, so that a hidden key stays -inf rather than becoming -softcap).
    B, hq, n, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(B, hkv, hq // hkv, n, d)  # each KV head's query group
    s = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * scale  # [B, hkv, group, n, S]
    s = (torch.tanh(s / softcap) * softcap).view(B, hq, n, -1)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    p = torch.softmax(s, dim=-1).view(B, hkv, hq // hkv, n, -1)
    return torch.matmul(p, v.unsqueeze(2)).view(B, hq, n, d)


def _prefill(q, k_cache, v_cache, meta, scale, sliding_window, softcap, out, dt) -> None:
    """Every sequence with more than one new token, one masked attention each, in dt."""
    hq, hkv, bs = q.shape[1], k_cache.shape[2], k_cache.shape[1]
    starts = meta.query_start_loc.tolist()
    for i, n in enumerate(meta.query_lens_list):
        if n <= 1:
            continue
        s = meta.seq_lens_list[i]
        blocks = meta.block_tables[i, : (s + bs - 1) // bs].long()
        k = _as(_gather(k_cache, blocks, s), dt).transpose(0, 1)  # [hkv, s, d]
        v = _as(_gather(v_cache, blocks, s), dt).transpose(0, 1)
        qi = _as(q[starts[i] : starts[i] + n], dt).transpose(0, 1)  # [hq, n, d]
        q_pos = torch.arange(s - n, s).unsqueeze(1)
        k_pos = torch.arange(s).unsqueeze(0)
        mask = _allowed(q_pos, k_pos, torch.tensor(s), sliding_window)
        o = _attend(qi.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask, scale, softcap, hq != hkv)
        out[starts[i] : starts[i] + n] = o[0].transpose(0, 1).to(q.dtype)


@dataclass
class _DecodeGroup:
    """Single-token sequences attended to in one padded batch."""

    tokens: Optional[torch.Tensor]  # [B] their query rows; None for the one group of an in-order pure-decode step
    blocks: torch.Tensor  # [B * nb] pool blocks, each sequence's first nb blocks in turn
    mask: Optional[torch.Tensor]  # [B, 1, 1, nb * block_size] additive, None when every key is visible
    # Where every layer gathers its K and V blocks, the step's plan lives as long as the
    # step: fresh buffers for each of 60 gathers cost more than the copies (see _gather_into).
    scratch: Optional[tuple[torch.Tensor, torch.Tensor]] = None


def _decode_plan(meta: AttentionMetadata, block_size: int, sliding_window, dt) -> list[_DecodeGroup]:
    """The step's decode groups, built once and reused by every layer (meta.derived);
    their masks in dt, SDPA's compute dtype."""
    key = ("reference-decode", block_size, sliding_window, dt)
    plan = meta.derived.get(key)
    if plan is None:
        qlens, slens = meta.query_lens_list, meta.seq_lens_list
        rows = [i for i, n in enumerate(qlens) if n == 1]
        groups = _length_groups(sorted(rows, key=lambda i: slens[i]), slens, block_size)
        if len(groups) == 1:
            groups = [rows]  # one group needs no sorting; in order, a pure-decode step needs no scatter
        in_order = len(groups) == 1 and len(rows) == len(qlens) == meta.num_tokens
        plan = [_decode_group_plan(meta, g, block_size, sliding_window, in_order, dt) for g in groups]
        meta.derived[key] = plan
    return plan


def _decode_group_plan(meta, rows, block_size, sliding_window, in_order, dt) -> _DecodeGroup:
    idx = torch.tensor(rows, dtype=torch.long)
    lens = [meta.seq_lens_list[i] for i in rows]
    nb = (max(lens) + block_size - 1) // block_size
    blocks = meta.block_tables.index_select(0, idx)[:, :nb].reshape(-1).long()
    S = nb * block_size
    mask = None
    if min(lens) < S or (sliding_window is not None and max(lens) > sliding_window):
        mask = decode_mask(torch.tensor(lens), S, sliding_window, dt)
    tokens = None if in_order else meta.query_start_loc[idx].long()
    return _DecodeGroup(tokens, blocks, mask)


def _decode_group(q, k_cache, v_cache, g: _DecodeGroup, scale: float, softcap, gqa: bool, dt) -> torch.Tensor:
    """q [B, hq, d] -> [B, hq, d] in dt: one gather per cache, one attention in dt.

    index_select of whole blocks is a row copy (3-10x faster than advanced
    indexing here); SDPA reads the gathered K/V through a transposed view, where
    an einsum would copy them once more.
    """
    B, hq, d = q.shape
    hkv = k_cache.shape[2]
    k, v = _gather_into(g, k_cache, v_cache)
    k = _as(k, dt).view(B, -1, hkv, d).transpose(1, 2)  # [B, hkv, S, d]
    v = _as(v, dt).view(B, -1, hkv, d).transpose(1, 2)
    if gqa and softcap is None and dt == torch.float32:
        # Each KV head's query group as the rows of one query: torch's fp32 CPU attention
        # then reads each K/V block once for the group, not once per query head (1.4-1.6x
        # faster at 16 and 64 sequences). In bf16 (AMX tiles) the GQA form is 7-10% faster.
        o = F.scaled_dot_product_attention(_as(q, dt).view(B, hkv, hq // hkv, d), k, v, attn_mask=g.mask, scale=scale)
        return o.view(B, hq, d)
    o = _attend(_as(q, dt).view(B, hq, 1, d), k, v, g.mask, scale, softcap, gqa)
    return o.view(B, hq, d)


def decode_mask(seq_lens: torch.Tensor, padded_len: int, sliding_window, dt) -> torch.Tensor:
    """[B, 1, 1, padded_len] additive mask in dt: what each of B decoding sequences of
    seq_lens [B] tokens (the new one last) sees of its padded keys."""
    lens = seq_lens.unsqueeze(1)  # [B, 1]
    allowed = _allowed(lens - 1, torch.arange(padded_len).unsqueeze(0), lens, sliding_window)
    mask = torch.zeros(seq_lens.shape[0], 1, 1, padded_len, dtype=dt)
    return mask.masked_fill_(~allowed[:, None, None, :], float("-inf"))


def _gather_into(g: _DecodeGroup, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's K and V blocks, gathered into buffers that every layer of the step
    reuses (its attention reads them before the next layer gathers). Into a fresh
    buffer, a 2.2 MB gather (16 sequences of 368 tokens) took 95 us against 58, and a
    16-stream step of the bundled model 78.3 ms against 76.4 (AMX VM)."""
    if g.scratch is None or g.scratch[0].dtype != k_cache.dtype or g.scratch[0].shape[1:] != k_cache.shape[1:]:
        shape = (g.blocks.shape[0], *k_cache.shape[1:])
        g.scratch = (k_cache.new_empty(shape), v_cache.new_empty(shape))
    k, v = g.scratch
    return torch.index_select(k_cache, 0, g.blocks, out=k), torch.index_select(v_cache, 0, g.blocks, out=v)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


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
    # The no-op casts are skipped and the temporaries updated in place: at decode
    # sizes each torch call costs more in dispatch than in arithmetic.
    h = x if x.dtype == torch.float32 else x.float()
    h = h * h.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    if weight_offset:
        return (h * (weight.float() + weight_offset)).to(x.dtype), x
    if x.dtype == torch.float32:
        return h.mul_(weight), x
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
    T, rot_dim = cs.shape
    half = rot_dim // 2
    cs = cs.view(T, 1, 2, half)
    cos, sin = cs[:, :, :1], cs[:, :, 1:]  # [T, 1, 1, half], broadcast over heads and halves

    def rot(x: torch.Tensor) -> torch.Tensor:
        # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) as x * cos + flip(x) * (-sin, sin):
        # nine torch calls where slicing out each half took sixteen.
        heads, d = x.shape[1], x.shape[2]
        xr = x if rot_dim == d else x[..., :rot_dim]
        x4 = xr.float().reshape(T, heads, 2, half)
        y = x4.flip(2) * sin
        y[:, :, 0].neg_()
        y = torch.addcmul(y, x4, cos).view(T, heads, rot_dim)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if rot_dim == d else torch.cat((y, x[..., rot_dim:]), dim=-1)

    # Inside a torch.compile graph inductor fuses the two rotations anyway, and the
    # storage pointers _adjacent_heads compares cannot be traced.
    qk = None if torch.compiler.is_compiling() else _adjacent_heads(q, k)
    if qk is None:
        return rot(q), rot(k)
    return rot(qk).split((q.shape[1], k.shape[1]), dim=1)  # one pass for both


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> Optional[torch.Tensor]:
    """q and k as one [T, Hq + Hkv, D] view when k's heads follow q's in memory,
    as they do when both are column blocks of one fused qkv output."""
    if q.dtype != k.dtype or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.stride()[1:] != k.stride()[1:]:
        return None
    if q.shape[0] > 1 and q.stride(0) != k.stride(0):  # one token's views may carry any row stride
        return None
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        return None
    if k.untyped_storage().data_ptr() != q.untyped_storage().data_ptr():  # adjacent allocations are not one tensor
        return None
    if k.data_ptr() != q.data_ptr() + q.shape[1] * q.stride(1) * q.element_size():
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> [T, I]: silu(gate) * up, gate first (Llama's fused gate_up)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Mixture-of-experts SwiGLU MLPs: x [T, H], w13 [E, 2I, H] (gate rows, then up
    rows), w2 [E, H, I], the router's topk_weights and topk_ids [T, k] -> [T, H],
    each token's k expert outputs scaled by their weights and summed.

    One F.linear pair per expert that has tokens, so the Python work follows the
    batch, not the expert count; experts in ascending order, as transformers
    sums them. kernels/fused_moe.py is the GPU's grouped-GEMM form of this.
    """
    out = torch.zeros_like(x)
    for e in torch.unique(topk_ids).tolist():
        tokens, slot = torch.where(topk_ids == e)  # [n] each: the (token, slot) pairs routed to e
        y = silu_and_mul(linear(x[tokens], w13[e]))  # [n, I]
        y = linear(y, w2[e]) * topk_weights[tokens, slot, None]  # [n, H]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


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
    packed for it (KernelOps.int4pack_dtypes), from wide_path().rows rows on GEMMs
    over the weight decoded from that packed form, or a GEMM over its bf16 copy where
    it has one (QuantizedWeight._exact_bf16_copy; for the rows table_path gives it
    where it has both), else dequantize and multiply."""
    if w.int4pack is None and w.bf16_copy is None:
        return dequantized_linear(x, w, bias)
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    if w.bf16_copy is not None and (w.int4pack is None or table_path().copy_for(x.shape[0])):
        y = _bf16_copy_matmul(x.to(torch.bfloat16), w.bf16_copy, w.dtype)
        return y if bias is None else y + bias
    wide = wide_path()
    y = w.int4pack_dense_matmul(x, wide.dtype) if x.shape[0] >= wide.rows else None
    # Rounded to bf16 as the kernel rounds its output, so that a row computes (nearly)
    # the same whichever path its step's width picks (in a float32 model too).
    y = w.int4pack_matmul(x) if y is None else y.to(torch.bfloat16).to(w.dtype)
    return y if bias is None else y + bias


# Up to this many rows the product over a bf16 copy is computed as copy @ x^T and
# transposed back (see _bf16_copy_matmul); from there on oneDNN's x @ copy^T wins.
BF16_COPY_TRANSPOSED_ROWS = 32


def _bf16_copy_matmul(x: torch.Tensor, copy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [T, K] bf16 @ copy [N, K]^T -> [T, N] in dtype. For an LM head (N = 49152, K =
    576) oneDNN's GEMM with the few rows as M took 3.0-3.6 ms from 2 to 16 rows on the
    AMX VM, where copy @ x^T (the vocabulary as M) took 1.4 ms and its transpose back
    into a fresh [T, N] 0.1-0.4 ms more, to the same sums; at one row torch.mv reads
    the copy 1.7x faster than either. Without AMX (AVX512-BF16 alone) the order turns:
    on a Zen 5 EPYC oneDNN's x @ copy^T took 1.8 / 2.6 ms at 1 / 16 rows, torch.mv and
    copy @ x^T 4.0 / 4.4 ms. With AVX2 alone torch itself takes x @ copy^T of one or two
    rows (1.1 ms a row), widening the copy to fp32 as it reads it."""
    rows = x.shape[0]
    if amx_granted() and rows == 1:
        return torch.mv(copy, x[0]).unsqueeze(0).to(dtype)
    if amx_granted() and rows <= BF16_COPY_TRANSPOSED_ROWS:
        return torch.empty(rows, copy.shape[0], dtype=dtype).copy_(torch.mm(copy, x.T).T)
    return linear(x, copy).to(dtype)
