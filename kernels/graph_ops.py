"""folio's CPU attention as one opaque op, so that torch.compile can take a decode
step's whole forward as one graph (worker/decode_graph.py).

Everything else a layer does on CPU (norms, rope, the int4 kernel's casts, the KV
write, the gated MLP) traces into inductor's fused C++; the paged attention cannot:
its plan (kernels/reference.py _decode_plan) groups sequences by length from host
lists, and a graph that branched on them would recompile at every step. So, inside
a graph, the attention is the op folio::cpu_paged_attention over the step's
metadata tensors, and runs reference.cpu_paged_attention as it runs outside one.
Outside a graph, cpu_paged_attention calls it directly. A graph of one row (one
sequence decoding) has no plan to make: there the attention traces inline
(one_sequence_decode below), and inductor fuses it whole. A step of several rows whose
sequences are about as long as each other needs no plan either: padded to the longest,
they attend as one batch (padded_batch_decode), which DecodeGraph chooses per step
(AttentionMetadata.decode_as_one_batch), a graph for each choice.

The op cannot take the step's AttentionMetadata (an op's arguments are tensors and
numbers), so it rebuilds one from the tensors; every layer of a step passes the
same tensors, so it is rebuilt once a step and each layer reuses it and the
decode plan it carries (keyed on the tensors' contents, never on their identity:
a later step's tensors may reuse a freed one's memory).
"""

from __future__ import annotations

from typing import Optional

import torch

from folio.kernels import reference
from folio.kernels.metadata import AttentionMetadata

_LIB = torch.library.Library("folio", "DEF")
# Registered as a plain CPU kernel rather than through torch.library.custom_op, whose
# Python wrapper cost about 30 us a call (30 calls a step) where this costs a few.
_LIB.define(
    "cpu_paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor query_start_loc, Tensor seq_lens, "
    "Tensor block_tables, float scale, int? sliding_window, float? softcap) -> Tensor"
)


class _StepMetadata:
    """The last step's metadata, rebuilt from its tensors (see the module docstring)."""

    key: Optional[tuple] = None
    meta: Optional[AttentionMetadata] = None

    @classmethod
    def of(cls, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor):
        key = (
            query_start_loc.numpy().tobytes(),
            seq_lens.numpy().tobytes(),
            tuple(block_tables.shape),
            block_tables.numpy().tobytes(),
        )
        if key != cls.key:
            qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
            query_lens = [b - a for a, b in zip(qsl, qsl[1:])]
            cls.meta = AttentionMetadata(
                query_start_loc=query_start_loc,
                seq_lens=seq_lens,
                context_lens=torch.tensor([s - n for s, n in zip(lens, query_lens)], dtype=torch.int32),
                block_tables=block_tables,
                # its length alone is read here: the KV write is in the graph
                slot_mapping=torch.empty(qsl[-1], dtype=torch.long),
                max_query_len=max(query_lens),
                max_seq_len=max(lens),
                query_lens_list=tuple(query_lens),
                seq_lens_list=tuple(lens),
            )
            cls.key = key
        return cls.meta


def _cpu_kernel(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window, softcap):
    meta = _StepMetadata.of(query_start_loc, seq_lens, block_tables)
    return reference.cpu_paged_attention(q, k_cache, v_cache, meta, scale, sliding_window, softcap)


_LIB.impl("cpu_paged_attention", _cpu_kernel, "CPU")
torch.library.register_fake(
    "folio::cpu_paged_attention", lambda q, *args: torch.empty_like(q), lib=_LIB
)  # the output's shape and dtype are q's

# A row copy of whole pool blocks, as an op so that inductor leaves it one: lowered, the
# gather fused into the loops that read it, which then read the pool a key at a time
# through the block table (3.3 against 2.3 ms a layer for 16 sequences of 2,000 tokens).
_LIB.define("gather_blocks(Tensor cache, Tensor blocks) -> Tensor")
_LIB.impl("gather_blocks", lambda cache, blocks: cache.index_select(0, blocks), "CPU")
torch.library.register_fake(
    "folio::gather_blocks", lambda cache, blocks: cache.new_empty((blocks.shape[0], *cache.shape[1:])), lib=_LIB
)


def cpu_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """reference.cpu_paged_attention; inside a torch.compile graph, through the op, or
    inline where the graph is one row's or the step attends as one padded batch."""
    if not torch.compiler.is_compiling():
        return reference.cpu_paged_attention(q, k_cache, v_cache, meta, scale, sliding_window, softcap)
    if q.shape[0] == 1:  # a graph of one row (its size specialized): one sequence decoding, traced inline
        return one_sequence_decode(
            q, k_cache, v_cache, meta.seq_lens, meta.block_tables[0], scale, sliding_window, softcap
        )
    if meta.decode_as_one_batch:
        return padded_batch_decode(
            q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale, sliding_window, softcap
        )
    return torch.ops.folio.cpu_paged_attention(
        q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale, sliding_window, softcap
    )


def one_sequence_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_len: torch.Tensor,
    blocks: torch.Tensor,
    scale: float,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """cpu_paged_attention of a step whose one row decodes one sequence, from tensors
    alone: q [1, hq, d], seq_len [1] (its length with the new token), blocks [nb] (its
    blocks; keys past seq_len are masked).

    Written to be traced, not run eagerly: the scores and the weighted sum are products
    summed over a broadcast, which inductor turns into two loops that read the pool's
    blocks where they lie, cast as they load, and accumulate in fp32. Gathering the
    blocks, casting them and calling SDPA (what the plan does for wider steps) copied
    every key and value twice: 112 us a layer at 300 tokens of context against 43 us
    this way, in one compiled call each (fp16 pool, 9 query and 3 KV heads).
    """
    hq, d = q.shape[1:]
    hkv = k_cache.shape[2]
    k = k_cache[blocks].flatten(0, 1).transpose(0, 1).unsqueeze(1)  # [hkv, 1, S, d]
    v = v_cache[blocks].flatten(0, 1).transpose(0, 1).unsqueeze(1)
    if torch.compiler.is_compiling():
        # Stored once: inductor otherwise recomputes the query's rope inside the score loop,
        # at every key (76 against 91 us a layer at 1,050 tokens). The prim is inductor's,
        # registered once torch.compile is asked for inductor.
        q = torch.ops.prims.inductor_force_stride_order(q, q.stride())
    qg = q.view(hkv, hq // hkv, 1, d).float()  # each KV head's query group
    s = (qg * k.float()).sum(-1) * scale  # [hkv, group, S]
    if softcap is not None:  # transformers' order: scale, cap, then mask
        s = torch.tanh(s / softcap) * softcap
    s = s + reference.decode_mask(seq_len, s.shape[-1], sliding_window, torch.float32).view(1, 1, -1)
    p = torch.softmax(s, dim=-1)
    o = (p.unsqueeze(-1) * v.float()).sum(-2)  # [hkv, group, d]
    return o.reshape(1, hq, d).to(q.dtype)


def padded_batch_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """cpu_paged_attention of a step whose B rows decode B sequences, as one padded batch:
    q [B, hq, d], seq_lens [B], block_tables [B, nb] (keys past a sequence's length masked).

    Written to be traced: every row's nb blocks are gathered in one row copy
    (folio::gather_blocks), and inductor turns the rest into loops that read the gathered
    K/V in the pool's dtype and accumulate in fp32. The op's plan instead widens the
    gathered K/V to fp32 in a second copy and calls SDPA, whose small matrix products
    (a KV head's 3 query rows) cost more than the arithmetic: for 16 sequences of 1,800-2,200
    tokens, 2.3 against 6.3 ms a layer on a Zen 5 EPYC, a decode step of the bundled model
    80 against 179 ms (158 against 192 held to AVX2); about equal at 60-160 tokens.
    Padding is paid for every row, so the step takes this only when its sequences are
    about as long as each other (decode_graph.ONE_BATCH_PADDING).
    """
    B, hq, d = q.shape
    hkv = k_cache.shape[2]
    blocks = block_tables.flatten().long()
    k = torch.ops.folio.gather_blocks(k_cache, blocks).view(B, -1, hkv, d)  # [B, S, hkv, d]
    v = torch.ops.folio.gather_blocks(v_cache, blocks).view(B, -1, hkv, d)
    qg = q.view(B, 1, hkv, hq // hkv, d).float()  # each KV head's query group
    s = (qg * k.unsqueeze(3).float()).sum(-1) * scale  # [B, S, hkv, group]
    if softcap is not None:  # transformers' order: scale, cap, then mask
        s = torch.tanh(s / softcap) * softcap
    s = s + reference.decode_mask(seq_lens, s.shape[1], sliding_window, torch.float32).view(B, -1, 1, 1)
    p = torch.softmax(s, dim=1)
    o = (p.unsqueeze(-1) * v.unsqueeze(3).float()).sum(1)  # [B, hkv, group, d]
    return o.reshape(B, hq, d).to(q.dtype)
