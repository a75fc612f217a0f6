"""A step's AttentionMetadata from plain lists, built by the model runner's own builder."""

from __future__ import annotations

import torch

from folio.kernels.metadata import AttentionMetadata, attention_metadata


def metadata_for(
    query_lens: list[int],
    context_lens: list[int],
    tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """tables: each sequence's block ids; shorter rows are padded with block 0."""
    positions = torch.cat([torch.arange(c, c + q) for q, c in zip(query_lens, context_lens)])
    width = max(len(t) for t in tables)
    padded = torch.tensor([list(t) + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return attention_metadata(positions, list(query_lens), list(context_lens), padded, block_size, device)
