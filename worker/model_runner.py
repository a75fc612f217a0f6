"""Turns a StepRequest into one forward pass and a StepResult.

The runner caches each request's state (its token ids and block table), so a
step only carries diffs. Block tables live in one persistent tensor with a row
per live request: a step writes only the new block ids and gathers the rows it
needs, so host work per step follows the tokens scheduled, not the tokens held.

Speculative decoding: a CachedRequest may carry draft tokens. They join the
request's tokens for this step's forward pass, the sampler verifies them
(Sampler.verify), and afterwards the request keeps only the accepted drafts
and the one token sampled after them; num_computed_tokens stops after the
accepted drafts, so the K/V written for rejected ones is simply overwritten
later.

Under tensor parallelism every rank runs the same steps; only rank 0 samples
and it broadcasts the sampled ids, so every rank appends the same tokens even
for unseeded random sampling (per-process random state would otherwise
diverge). Rank 0's StepResult is the one the head reads.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kernels.metadata import AttentionMetadata
from protos.messages import (CachedRequest, NewRequest, SampledRequest, SamplingParams,
                             StepRequest, StepResult)
from worker.kv_pool import KVPool
from worker.parallel import TPGroup
from worker.sampler import Sampler


@dataclass
class _State:
    """The worker's copy of one request."""
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    row: int                 # row in the block-table tensor
    num_blocks: int
    num_computed_tokens: int
    num_drafts: int = 0      # this step's drafts, at the end of token_ids until verified

    @property
    def drafts(self) -> list[int]:
        return self.token_ids[len(self.token_ids) - self.num_drafts:]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pool: KVPool, sampler: Sampler,
                 device: torch.device | str = "cpu", max_blocks_per_seq: int = 128,
                 tp: TPGroup | None = None):
        self.model = model
        self.tp = tp or TPGroup()
        self.pool = pool
        self.sampler = sampler
        self.device = torch.device(device)
        self.bs = pool.block_size
        self.states: dict[str, _State] = {}
        self.block_table = torch.zeros((16, max_blocks_per_seq), dtype=torch.int32)
        self._free_rows = list(range(15, -1, -1))

    # ---------------------------------------------------------------- state diffs
    def _apply_diff(self, step: StepRequest) -> list[tuple[str, int]]:
        """Update cached state from the step; return (request_id, num_tokens) in step order."""
        for rid in step.finished_ids:
            st = self.states.pop(rid, None)
            if st is not None:
                self._free_rows.append(st.row)
                self.sampler.remove_request(rid)
        order = []
        for r in step.new_requests:
            self._add(r)
            order.append((r.request_id, r.num_scheduled_tokens))
        for c in step.cached_requests:
            self._extend(c)
            order.append((c.request_id, c.num_scheduled_tokens))
        return order

    def _add(self, r: NewRequest) -> None:
        if r.request_id in self.states:
            raise ValueError(f"request {r.request_id} is already on this worker")
        row = self._take_row()
        st = _State(list(r.token_ids), r.num_prompt_tokens, r.sampling_params, row, 0,
                    r.num_computed_tokens)
        self.states[r.request_id] = st
        self._write_blocks(st, r.block_ids)
        self.sampler.add_request(r.request_id, r.sampling_params,
                                 r.token_ids[: r.num_prompt_tokens], r.token_ids[r.num_prompt_tokens:])

    def _extend(self, c: CachedRequest) -> None:
        st = self.states[c.request_id]
        if st.num_computed_tokens != c.num_computed_tokens:
            raise RuntimeError(f"request {c.request_id}: head says {c.num_computed_tokens} tokens "
                               f"computed, worker has {st.num_computed_tokens}")
        if c.draft_token_ids:
            if c.num_computed_tokens + 1 != len(st.token_ids) or \
                    c.num_scheduled_tokens != 1 + len(c.draft_token_ids):
                raise RuntimeError(f"request {c.request_id}: drafts must follow its last token")
            st.token_ids.extend(c.draft_token_ids)
            st.num_drafts = len(c.draft_token_ids)
        self._write_blocks(st, c.new_block_ids)

    def _write_blocks(self, st: _State, block_ids: list[int]) -> None:
        if not block_ids:
            return
        end = st.num_blocks + len(block_ids)
        if end > self.block_table.shape[1]:
            grown = torch.zeros((self.block_table.shape[0], max(end, 2 * self.block_table.shape[1])),
                                dtype=torch.int32)
            grown[:, : self.block_table.shape[1]] = self.block_table
            self.block_table = grown
        self.block_table[st.row, st.num_blocks:end] = torch.tensor(block_ids, dtype=torch.int32)
        st.num_blocks = end

    def _take_row(self) -> int:
        if not self._free_rows:
            n = self.block_table.shape[0]
            self.block_table = torch.cat([self.block_table, torch.zeros_like(self.block_table)])
            self._free_rows = list(range(2 * n - 1, n - 1, -1))
        return self._free_rows.pop()

    # ---------------------------------------------------------------- the step
    @torch.inference_mode()
    def execute(self, step: StepRequest) -> StepResult:
        t0 = time.perf_counter()
        order = self._apply_diff(step)
        if not order:
            return StepResult(step_id=step.step_id)
        input_ids, positions, meta = self._prepare(order)
        hidden = self.model(input_ids, positions, meta, self.pool.caches)   # [T, H]

        # Rows whose logits we need: the last token of each request that samples (and
        # the positions of its drafts before it), and every prompt-predicting position
        # of requests that asked for prompt logprobs.
        sample_idx, sample_ids, prompt_jobs = [], [], []
        end = 0
        for rid, n in order:
            st = self.states[rid]
            start, end = end, end + n
            c = st.num_computed_tokens
            if c + n == len(st.token_ids):
                sample_idx.extend(range(end - 1 - st.num_drafts, end))
                sample_ids.append(rid)
            if st.params.prompt_logprobs is not None and c + 1 < st.num_prompt_tokens:
                last = min(c + n, st.num_prompt_tokens - 1)       # positions c .. last-1 predict a prompt token
                prompt_jobs.append((rid, start, last - c, c))
        outputs = {rid: SampledRequest(request_id=rid) for rid, _ in order}
        if sample_idx:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_idx, device=hidden.device)])
            self._sample(logits, sample_ids, outputs)
        for rid, start, count, c in prompt_jobs:
            st = self.states[rid]
            logits = self.model.compute_logits(hidden[start: start + count])   # a collective: every rank
            if self.tp.rank != 0:
                continue
            targets = torch.tensor(st.token_ids[c + 1: c + 1 + count], device=logits.device)
            outputs[rid].prompt_logprobs = self.sampler.prompt_logprobs(
                logits, targets, st.params.prompt_logprobs)
        for rid, n in order:
            st = self.states[rid]
            tokens = outputs[rid].token_ids
            if st.num_drafts:                 # keep the accepted drafts, then the new token
                del st.token_ids[len(st.token_ids) - st.num_drafts:]
                n -= st.num_drafts - (len(tokens) - 1)
                st.num_drafts = 0
            st.num_computed_tokens += n
            st.token_ids.extend(tokens)
        return StepResult(step_id=step.step_id, outputs=[outputs[rid] for rid, _ in order],
                          execute_ms=(time.perf_counter() - t0) * 1e3)

    def _sample(self, logits: torch.Tensor, request_ids: list[str],
                outputs: dict[str, SampledRequest]) -> None:
        """Rank 0 samples (verifying drafts); every rank ends with the token ids in outputs."""
        drafts = [self.states[rid].drafts for rid in request_ids]
        if self.tp.rank == 0:
            for rid, picked in zip(request_ids, self.sampler.verify(logits, request_ids, drafts)):
                outputs[rid].token_ids = [tok for tok, _ in picked]
                outputs[rid].logprobs = [lp for _, lp in picked if lp is not None]
        if self.tp.world_size > 1:
            # [R, 1 + most drafts], -1 past each request's tokens: the same shape on every rank.
            ids = torch.full((len(request_ids), 1 + max(map(len, drafts))), -1, dtype=torch.long)
            for i, rid in enumerate(request_ids):
                ids[i, :len(outputs[rid].token_ids)] = torch.tensor(outputs[rid].token_ids)
            for rid, row in zip(request_ids, self.tp.broadcast_from_first(ids.to(logits.device)).tolist()):
                outputs[rid].token_ids = [t for t in row if t >= 0]

    def _prepare(self, order: list[tuple[str, int]]):
        """Flatten the step's tokens and describe them for attention."""
        ids: list[int] = []
        pos: list[int] = []
        rows, qlens, ctx = [], [], []
        for rid, n in order:
            st = self.states[rid]
            c = st.num_computed_tokens
            ids.extend(st.token_ids[c: c + n])
            pos.extend(range(c, c + n))
            rows.append(st.row)
            qlens.append(n)
            ctx.append(c)
        positions = torch.tensor(pos, dtype=torch.long)
        q = torch.tensor(qlens, dtype=torch.int32)
        seq_lens_list = [a + b for a, b in zip(ctx, qlens)]
        max_blocks = -(-max(seq_lens_list) // self.bs)
        tables = self.block_table.index_select(0, torch.tensor(rows))[:, :max_blocks]   # [S, nb]
        owner = torch.repeat_interleave(torch.arange(len(order)), q.long())              # [T]
        slots = tables[owner, positions // self.bs].long() * self.bs + positions % self.bs
        qsl = torch.zeros(len(order) + 1, dtype=torch.int32)
        torch.cumsum(q, 0, out=qsl[1:])
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=qsl.to(dev), seq_lens=torch.tensor(seq_lens_list, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev), block_tables=tables.to(dev),
            slot_mapping=slots.to(dev), max_query_len=max(qlens), max_seq_len=max(seq_lens_list),
            query_lens_list=tuple(qlens), seq_lens_list=tuple(seq_lens_list))
        return torch.tensor(ids, dtype=torch.long, device=dev), positions.to(dev), meta
