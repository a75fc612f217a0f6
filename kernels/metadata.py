"""The one explicit description of a step's attention work, shared by all layers.

The batch is ragged and flattened: the step's tokens of all sequences are laid
end to end (T tokens in all). Sequence i owns query rows
query_start_loc[i] : query_start_loc[i+1]; those tokens sit at positions
seq_lens[i] - query_len_i ... seq_lens[i] - 1 of that sequence, so the rows
before them (context_lens[i] = seq_lens[i] - query_len_i) are already in the
paged KV pool. A decode is simply a sequence with query_len 1; a chunk of
prefill or a prefix-cache hit is one with context_lens > 0.

KV pool layout per layer: k_cache, v_cache of shape
[num_blocks, block_size, num_kv_heads, head_dim]. Token j of sequence i lives in
block block_tables[i, j // block_size] at offset j % block_size; its flat slot
is block_id * block_size + offset (slot_mapping gives it for the new tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32, context + new tokens
    context_lens: torch.Tensor  # [num_seqs] int32, tokens already in the pool
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, pool slot of each new token
    max_query_len: int
    max_seq_len: int
    # Host-side copies, so CPU code never has to sync on a device tensor.
    query_lens_list: tuple[int, ...] = ()
    seq_lens_list: tuple[int, ...] = ()
    # A compiled CPU decode step (worker/decode_graph.py) attends to its sequences as one
    # padded batch (kernels/graph_ops.py padded_batch_decode) rather than through the op;
    # the step decides, a graph variant each way.
    decode_as_one_batch: bool = False
    # What a kernel set derives from the above once per step and reuses in every
    # layer (the CPU path's gather indices and masks), keyed by its own names.
    # Every layer sees the same metadata, so deriving it per layer is wasted work.
    derived: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


def attention_metadata(
    positions: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    block_tables: torch.Tensor,
    block_size: int,
    device: torch.device | str,
) -> AttentionMetadata:
    """A step's metadata from host-side inputs: `positions` [T] int64 (each new token's
    position in its sequence, sequences end to end), the per-sequence query and context
    lengths, and `block_tables` [num_seqs, at least the longest sequence's blocks] int32.
    The model runner builds every step with this, and the tests build theirs with it."""
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    tables = block_tables[:, : -(-max(seq_lens) // block_size)]  # [S, nb]
    q = torch.tensor(query_lens, dtype=torch.int32)
    owner = torch.repeat_interleave(torch.arange(len(query_lens)), q.long())  # [T]
    slots = tables[owner, positions // block_size].long() * block_size + positions % block_size
    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    torch.cumsum(q, 0, out=qsl[1:])
    return AttentionMetadata(
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        slot_mapping=slots.to(device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_list=tuple(query_lens),
        seq_lens_list=tuple(seq_lens),
    )
