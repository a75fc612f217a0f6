"""Draft-model speculative decoding: a small model proposes the next k tokens.

The draft model lives beside the target in the same worker, with its own paged
KV pool of the same number of blocks. It uses the target's block tables as they
are: a request's block ids mean the same positions in both pools, so no block
is allocated for the draft and the head schedules as for n-gram drafts (only
the count of drafts crosses the wire, CachedRequest.num_model_drafts).

The draft's K/V is filled lazily. For each request the drafter remembers how
many leading positions its own pool holds (`computed`); when asked for drafts
it first computes the positions it is missing (the whole prompt the first
time, a prefix-cache hit included, in chunks of at most `max_chunk_tokens`
per forward; after a step usually just the last one or two tokens), the last
known token last, and the logits there give draft 1; each further draft is one
more single-token forward. After verification the model runner rolls
`computed` back to what the target kept, so the K/V of rejected drafts is
overwritten later, exactly as in the target's pool. Every position the draft
writes lies below the end of what the head scheduled for the target (the last
known token plus the drafts), so the target's blocks always cover it.

Under tensor parallelism only rank 0 holds a drafter (the draft is small: a
sharded draft would pay two all-reduces per layer per draft token, a
replicated one a second copy of its weights and pool on every rank); rank 0
broadcasts the drafts to the other ranks (worker/model_runner.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch

from folio.kernels.metadata import attention_metadata
from folio.worker.config import ModelConfig
from folio.worker.kv_pool import KVPool
from folio.worker.sampler import Sampler


@dataclass
class DraftJob:
    """One request's ask: k drafts after token_ids (all of its known tokens)."""

    request_id: str
    token_ids: list[int]
    row: int  # its row in the block-table tensor
    k: int


class Drafter:
    def __init__(self, model: torch.nn.Module, pool: KVPool, device: torch.device, max_chunk_tokens: int = 512):
        self.model = model
        self.pool = pool
        self.device = device
        self.bs = pool.block_size
        self.max_positions = model.config.max_position_embeddings
        self.max_chunk_tokens = max_chunk_tokens
        self.computed: dict[str, int] = {}  # request id -> leading positions in the draft's pool

    def drop(self, request_id: str) -> None:
        self.computed.pop(request_id, None)

    def rollback(self, request_id: str, num_valid: int) -> None:
        """The target kept num_valid positions of the request: the draft's K/V past them is stale."""
        c = self.computed.get(request_id)
        if c is not None and c > num_valid:
            self.computed[request_id] = num_valid

    @torch.inference_mode()
    def propose(
        self, jobs: list[DraftJob], block_table: torch.Tensor, sampler: Sampler, vocab_size: int
    ) -> list[tuple[list[int], list[Optional[torch.Tensor]]]]:
        """Per job: its drafts (at most k; fewer only where the draft model runs out of
        positions) and, per draft, the distribution it was drawn from where verification
        needs one (Sampler.propose). The requests must be in the sampler."""
        asked = [j.request_id for j in jobs]
        for job in jobs:  # a position the draft cannot encode is not drafted
            job.k = max(0, min(job.k, self.max_positions - len(job.token_ids) + 1))
        jobs = [j for j in jobs if j.k > 0]
        out: dict[str, tuple[list[int], list[Optional[torch.Tensor]]]] = {j.request_id: ([], []) for j in jobs}
        self._catch_up(jobs, block_table)
        # Round i feeds each job's newest token (its last known one, then its drafts) and
        # samples draft i + 1 from the logits.
        for i in range(max((j.k for j in jobs), default=0)):
            active = [j for j in jobs if j.k > i]
            feeds = [(j, j.token_ids[-1] if i == 0 else out[j.request_id][0][-1]) for j in active]
            logits = self._forward([(j, [t], self.computed[j.request_id]) for j, t in feeds], block_table)
            logits = _to_vocab(logits, vocab_size)
            tokens, probs = sampler.propose(logits, [j.request_id for j in active], i)
            for j, t, q in zip(active, tokens, probs):
                self.computed[j.request_id] += 1
                out[j.request_id][0].append(t)
                out[j.request_id][1].append(q)
        return [out[rid] if rid in out else ([], []) for rid in asked]

    def _catch_up(self, jobs: list[DraftJob], block_table: torch.Tensor) -> None:
        """Compute every job's known positions but the last, in forwards of at most
        max_chunk_tokens tokens (no logits needed)."""
        todo = {j.request_id: self.computed.setdefault(j.request_id, 0) for j in jobs}
        while True:
            batch, budget = [], self.max_chunk_tokens
            for j in jobs:
                start, end = todo[j.request_id], len(j.token_ids) - 1
                n = min(end - start, budget)
                if n > 0:
                    batch.append((j, j.token_ids[start : start + n], start))
                    budget -= n
                    todo[j.request_id] += n
                if budget == 0:
                    break
            if not batch:
                return
            self._forward(batch, block_table, logits=False)
            for j, tokens, _ in batch:
                self.computed[j.request_id] += len(tokens)

    def _forward(
        self, batch: list[tuple[DraftJob, list[int], int]], block_table: torch.Tensor, logits: bool = True
    ) -> Optional[torch.Tensor]:
        """One draft forward: per entry, tokens at positions start, start + 1, ...
        Returns the logits of each entry's last token ([len(batch), V_draft]) when asked."""
        ids, pos, qlens, ctx, rows = [], [], [], [], []
        for j, tokens, start in batch:
            ids.extend(tokens)
            pos.extend(range(start, start + len(tokens)))
            qlens.append(len(tokens))
            ctx.append(start)
            rows.append(j.row)
        positions = torch.tensor(pos, dtype=torch.long)
        tables = block_table.index_select(0, torch.tensor(rows))
        meta = attention_metadata(positions, qlens, ctx, tables, self.bs, self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, positions.to(self.device), meta, self.pool.caches)  # [T, H]
        if not logits:
            return None
        last = torch.tensor(list(itertools.accumulate(qlens)), device=hidden.device) - 1
        return self.model.compute_logits(hidden[last])


def _to_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The draft's logits [N, V_draft] as [N, vocab_size] float32: the two models share a
    tokenizer, so only padding rows of the embedding may differ (cut, or never drafted)."""
    logits = logits.float()
    width = logits.shape[1]
    if width >= vocab_size:
        return logits[:, :vocab_size]
    return torch.nn.functional.pad(logits, (0, vocab_size - width), value=float("-inf"))


@dataclass
class DraftModel:
    """A replica's draft model as one rank sees it: every rank knows its config (each
    rank's pool budget pays for the draft's blocks, so all ranks size their pools
    alike); rank 0 alone holds its weights."""

    config: ModelConfig
    model: Optional[torch.nn.Module]
    device: torch.device
    dtype: torch.dtype

    def bytes_per_block(self, block_size: int) -> int:
        c = self.config
        return KVPool.bytes_per_block(c.num_layers, c.num_kv_heads, c.head_dim, block_size, self.dtype)

    def drafter(self, num_blocks: int, block_size: int, max_chunk_tokens: int) -> Optional[Drafter]:
        if self.model is None:
            return None
        c = self.config
        pool = KVPool.allocate(
            c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, self.dtype, self.device
        )
        return Drafter(self.model, pool, self.device, max_chunk_tokens)


def load_draft(path: str, target_path: str, dtype: torch.dtype, device: torch.device, ops, rank: int) -> DraftModel:
    """The draft model at `path`, checked to share the target's tokenizer. ValueError
    (the reason) when it does not, or when it cannot be loaded.

    A draft is there to be cheap, and its precision cannot change the output (every
    draft is verified exactly): a quantized draft keeps its weights quantized wherever a
    kernel pays (quantization "auto"), whatever the target does, and on CPU runs in
    bfloat16 even beside a float32 target: torch's CPU int4 kernel multiplies bfloat16
    anyway, and its attention and KV pool cost half the bytes."""
    from folio.worker.loader import load_model, load_model_config, quantization_scheme

    why = tokenizer_mismatch(target_path, path)
    if why:
        raise ValueError(f"the speculative model {path} cannot draft for {target_path}: {why}")
    if device.type == "cpu" and dtype == torch.float32 and quantization_scheme(path) is not None:
        dtype = torch.bfloat16
    if rank != 0:
        return DraftModel(load_model_config(path), None, device, dtype)
    model, config = load_model(path, dtype=dtype, device=device, ops=ops, quantization="auto")
    return DraftModel(config, model, device, dtype)


def tokenizer_mismatch(target_path: str, draft_path: str) -> Optional[str]:
    """Why the two models' token ids do not mean the same text, or None. Models without
    a tokenizer (token-id-only checkpoints) must agree on their vocabulary size."""
    from folio.worker.loader import load_model_config, load_tokenizer

    vocabs = []
    for path in (target_path, draft_path):
        try:
            vocabs.append(load_tokenizer(path).get_vocab())
        except (OSError, ValueError):
            vocabs.append(None)
    target, draft = vocabs
    if target is None and draft is None:
        a, b = load_model_config(target_path).vocab_size, load_model_config(draft_path).vocab_size
        return None if a == b else f"neither has a tokenizer and their vocabularies differ ({a} and {b} tokens)"
    if target is None or draft is None:
        return "only one of them has a tokenizer"
    if target != draft:
        differ = sum(1 for t, i in target.items() if draft.get(t) != i) + len(draft.keys() - target.keys())
        return f"their tokenizers differ ({differ} tokens map to other ids or exist in one only)"
    return None
