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

With a draft model (worker/drafter.py) a CachedRequest carries num_model_drafts
instead: rank 0's drafter proposes them at the start of the step, every rank
appends them as if the head had sent them, and verification then proceeds as
above, rejection-sampling the unseeded random rows against the draft's own
distributions.

Structured output: a request whose grammar is still compiling (on the
sampler's thread) when it would sample is deferred, not waited for: it gets no
token this step and counts its last token as not computed, so the scheduler
(which sees the empty sample) schedules that token again. A step where every
request is deferred waits up to GRAMMAR_WAIT_S first, since nothing else would
run meanwhile.

Under tensor parallelism every rank runs the same steps; only rank 0 samples
and it broadcasts the sampled ids, so every rank appends the same tokens even
for unseeded random sampling (per-process random state would otherwise
diverge), and every rank defers or fails the requests rank 0 deferred or
failed. Rank 0's StepResult is the one the head reads.

Nothing in a step is trusted: before a request's diff is applied, every block
id is checked against the pool, every token id against the vocabulary, and its
counts against the tokens and blocks it holds (_check_new, _check_cached). A
request that fails a check, or whose own setup raises ValueError (e.g. the
sampler refusing its parameters), is dropped from this worker and reported in
StepResult.errors; the rest of the step runs. The checks look only at what the
step carries and are deterministic, so every tensor-parallel rank drops the
same requests and the ranks' batches stay identical.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from folio.kernels.metadata import attention_metadata
from folio.protos.config import MAX_SPECULATIVE_TOKENS
from folio.protos.messages import (
    CachedRequest,
    NewRequest,
    RequestError,
    SampledRequest,
    SamplingParams,
    StepRequest,
    StepResult,
)
from folio.worker.decode_graph import DecodeGraph
from folio.worker.drafter import Drafter, DraftJob
from folio.worker.kv_pool import KVPool
from folio.worker.parallel import TPGroup
from folio.worker.sampler import Sampler

MAX_REQUEST_ID_CHARS = 1024
# A step whose every request waits for its grammar may wait this long for it; a step
# with other work never waits (the request is deferred to a later step instead).
GRAMMAR_WAIT_S = 0.05
_FAILED = -2  # in the tensor-parallel broadcast of sampled ids: the request's grammar failed


class Refused(ValueError):
    """A request this worker will not run; the message goes back to the head."""


@dataclass
class _State:
    """The worker's copy of one request."""

    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    row: int  # row in the block-table tensor
    num_blocks: int
    num_computed_tokens: int
    num_drafts: int = 0  # this step's drafts, at the end of token_ids until verified
    num_model_drafts: int = 0  # drafts this step asks of the draft model, until it proposes them

    @property
    def drafts(self) -> list[int]:
        return self.token_ids[len(self.token_ids) - self.num_drafts :]


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        pool: KVPool,
        sampler: Sampler,
        device: torch.device | str = "cpu",
        max_blocks_per_seq: int = 128,
        tp: TPGroup | None = None,
        max_positions: int | None = None,
        drafter: Drafter | None = None,
        draft_model: bool = False,
        decode_graph: DecodeGraph | None = None,
    ):
        """max_positions: positions the model can encode (default: its config's
        max_position_embeddings); no request may compute past it.
        draft_model: steps may ask for model drafts; rank 0 then has the drafter.
        decode_graph: the compiled forward of the steps it takes (worker/decode_graph.py)."""
        self.model = model
        self.decode_graph = decode_graph
        self.tp = tp or TPGroup()
        self.pool = pool
        self.sampler = sampler
        self.drafter = drafter
        self.draft_model = draft_model or drafter is not None
        self._draft_probs: dict[str, list] = {}  # this step's draft distributions, rank 0
        self.device = torch.device(device)
        self.bs = pool.block_size
        self.max_positions = max_positions or model.config.max_position_embeddings
        self.states: dict[str, _State] = {}
        self.block_table = torch.zeros((16, max_blocks_per_seq), dtype=torch.int32)
        self._free_rows = list(range(15, -1, -1))

    # ---------------------------------------------------------------- state diffs
    def _apply_diff(self, step: StepRequest) -> tuple[list[tuple[str, int]], list[RequestError]]:
        """Update cached state from the step. Returns (request_id, num_tokens) in step
        order for the requests that run, and the refused ones (already dropped)."""
        for rid in step.finished_ids:
            self._drop(rid)
        diffs = [(r, self._add) for r in step.new_requests]
        diffs += [(c, self._extend) for c in step.cached_requests]
        order, errors, seen = [], [], set()
        for diff, apply in diffs:
            rid = diff.request_id
            try:
                if rid in seen:
                    raise Refused("the request appears twice in one step")
                seen.add(rid)
                apply(diff)
            except ValueError as e:  # Refused, or the request's own setup
                self._drop(rid)
                errors.append(RequestError(rid, str(e)))
            else:
                order.append((rid, diff.num_scheduled_tokens))
        if errors:  # a repeated id drops its first appearance too
            dropped = {e.request_id for e in errors}
            order = [o for o in order if o[0] not in dropped]
        return order, errors

    def _drop(self, request_id: str) -> None:
        """Forget a request (finished, preempted or refused); unknown ids are ignored."""
        st = self.states.pop(request_id, None)
        if st is not None:
            self._free_rows.append(st.row)
            self.sampler.remove_request(request_id)
            if self.drafter is not None:
                self.drafter.drop(request_id)

    def _add(self, r: NewRequest) -> None:
        self._check_new(r)
        row = self._take_row()
        st = _State(list(r.token_ids), r.num_prompt_tokens, r.sampling_params, row, 0, r.num_computed_tokens)
        self.states[r.request_id] = st
        self._write_blocks(st, r.block_ids)
        self.sampler.add_request(
            r.request_id, r.sampling_params, r.token_ids[: r.num_prompt_tokens], r.token_ids[r.num_prompt_tokens :]
        )

    def _extend(self, c: CachedRequest) -> None:
        st = self._check_cached(c)
        if c.draft_token_ids:
            st.token_ids.extend(c.draft_token_ids)
            st.num_drafts = len(c.draft_token_ids)
        st.num_model_drafts = c.num_model_drafts
        self._write_blocks(st, c.new_block_ids)

    # ---------------------------------------------------------------- checks
    # Each raises Refused before anything is changed; costs follow the step's own contents.
    def _check_new(self, r: NewRequest) -> None:
        if not 0 < len(r.request_id) <= MAX_REQUEST_ID_CHARS:
            raise Refused(f"a request id must have 1 to {MAX_REQUEST_ID_CHARS} characters")
        if r.request_id in self.states:
            raise Refused("the request is already on this worker")
        known = len(r.token_ids)
        if known > self.max_positions:
            raise Refused(f"{known} tokens exceed the model's {self.max_positions} positions")
        if not 0 < r.num_prompt_tokens <= known or r.num_output_tokens != known - r.num_prompt_tokens:
            raise Refused(
                f"{r.num_prompt_tokens} prompt and {r.num_output_tokens} output tokens "
                f"do not make up its {known} tokens"
            )
        self._check_token_ids("token", r.token_ids)
        self._check_token_ids("stop token", r.sampling_params.stop_token_ids)
        # logit_bias keys: Sampler.add_request refuses them (ValueError), which drops the request.
        self._check_blocks(r.block_ids, 0)
        self._check_span(r.num_computed_tokens, r.num_scheduled_tokens, known, len(r.block_ids))

    def _check_cached(self, c: CachedRequest) -> _State:
        st = self.states.get(c.request_id)
        if st is None:
            raise Refused("the request is not on this worker")
        if st.num_computed_tokens != c.num_computed_tokens:
            raise Refused(
                f"the head says {c.num_computed_tokens} tokens computed, the worker has {st.num_computed_tokens}"
            )
        known = len(st.token_ids)
        drafts = len(c.draft_token_ids) + c.num_model_drafts
        if drafts:
            if c.draft_token_ids and c.num_model_drafts:
                raise Refused("draft tokens and model drafts in one step")
            if c.num_model_drafts and not self.draft_model:
                raise Refused("model drafts asked of a worker without a draft model")
            if not 0 < drafts <= MAX_SPECULATIVE_TOKENS:
                raise Refused(f"{drafts} drafts: at most {MAX_SPECULATIVE_TOKENS} per step")
            if c.num_computed_tokens + 1 != known or c.num_scheduled_tokens != 1 + drafts:
                raise Refused("draft tokens must follow its last token")
            self._check_token_ids("draft token", c.draft_token_ids)
            known += drafts
        self._check_blocks(c.new_block_ids, st.num_blocks)
        self._check_span(c.num_computed_tokens, c.num_scheduled_tokens, known, st.num_blocks + len(c.new_block_ids))
        return st

    def _check_token_ids(self, what: str, ids: list[int]) -> None:
        vocab = self.sampler.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise Refused(f"{what} id {bad} is outside the vocabulary (size {vocab})")

    def _check_blocks(self, block_ids: list[int], held: int) -> None:
        size = self.pool.num_blocks
        if held + len(block_ids) > size:
            raise Refused(f"{held + len(block_ids)} blocks exceed the pool's {size}")
        if block_ids and (min(block_ids) < 0 or max(block_ids) >= size):
            bad = next(b for b in block_ids if not 0 <= b < size)
            raise Refused(f"block id {bad} is outside the pool of {size} blocks")

    def _check_span(self, computed: int, scheduled: int, known: int, blocks: int) -> None:
        """Computing tokens [computed, computed + scheduled) of `known` in `blocks` blocks."""
        end = computed + scheduled
        if computed < 0 or scheduled < 1 or end > known:
            raise Refused(f"cannot compute tokens {computed} to {end} of its {known}")
        if end > self.max_positions:
            raise Refused(f"position {end - 1} is beyond the model's {self.max_positions}")
        if blocks * self.bs < end:
            raise Refused(f"{blocks} blocks of {self.bs} cannot hold {end} tokens")

    def _write_blocks(self, st: _State, block_ids: list[int]) -> None:
        if not block_ids:
            return
        end = st.num_blocks + len(block_ids)
        if end > self.block_table.shape[1]:
            grown = torch.zeros((self.block_table.shape[0], max(end, 2 * self.block_table.shape[1])), dtype=torch.int32)
            grown[:, : self.block_table.shape[1]] = self.block_table
            self.block_table = grown
        self.block_table[st.row, st.num_blocks : end] = torch.tensor(block_ids, dtype=torch.int32)
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
        order, errors = self._apply_diff(step)
        if not order:
            return StepResult(step_id=step.step_id, errors=errors)
        if self.draft_model and any(self.states[rid].num_model_drafts for rid, _ in order):
            order = self._propose_drafts(order)
        input_ids, positions, meta = self._prepare(order)
        if self.decode_graph is not None and self.decode_graph.takes(meta):
            hidden = self.decode_graph(input_ids, positions, meta)  # [T, H]
        else:
            hidden = self.model(input_ids, positions, meta, self.pool.caches)

        # Rows whose logits we need: the last token of each request that samples (and
        # the positions of its drafts before it), and every prompt-predicting position
        # of requests that asked for prompt logprobs.
        sampling, prompt_jobs = [], []
        end = 0
        for rid, n in order:
            st = self.states[rid]
            start, end = end, end + n
            c = st.num_computed_tokens
            if c + n == len(st.token_ids):
                sampling.append((rid, range(end - 1 - st.num_drafts, end)))
            if st.params.prompt_logprobs is not None and c + 1 < st.num_prompt_tokens:
                last = min(c + n, st.num_prompt_tokens - 1)  # positions c .. last-1 predict a prompt token
                prompt_jobs.append((rid, start, last - c, c))
        sample_idx = [i for _, rows in sampling for i in rows]
        outputs = {rid: SampledRequest(request_id=rid) for rid, _ in order}
        deferred: set[str] = set()
        if sample_idx:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_idx, device=hidden.device)])
            # Grammars compile on their own thread from the moment their request arrives;
            # a request whose grammar is not ready yet is deferred, not waited for (below).
            wait_s = GRAMMAR_WAIT_S if len(sampling) == len(order) else 0.0
            deferred, failed = self._sample(logits, sampling, outputs, wait_s)
            if failed:
                errors = errors + [RequestError(rid, why) for rid, why in failed.items()]
                for rid in failed:
                    self._drop(rid)
                prompt_jobs = [j for j in prompt_jobs if j[0] not in failed]
                order = [o for o in order if o[0] not in failed]
        for rid, start, count, c in prompt_jobs:
            st = self.states[rid]
            logits = self.model.compute_logits(hidden[start : start + count])  # a collective: every rank
            if self.tp.rank != 0:
                continue
            targets = torch.tensor(st.token_ids[c + 1 : c + 1 + count], device=logits.device)
            outputs[rid].prompt_logprobs = self.sampler.prompt_logprobs(logits, targets, st.params.prompt_logprobs)
        for rid, n in order:
            st = self.states[rid]
            tokens = outputs[rid].token_ids
            if rid in deferred:  # nothing sampled: its last token is computed again when it can sample
                n -= 1 + st.num_drafts
            elif st.num_drafts:  # keep the accepted drafts, then the new token
                n -= st.num_drafts - (len(tokens) - 1)
            if st.num_drafts:
                del st.token_ids[len(st.token_ids) - st.num_drafts :]
                st.num_drafts = 0
            st.num_computed_tokens += n
            st.token_ids.extend(tokens)
            if self.drafter is not None:
                self.drafter.rollback(rid, st.num_computed_tokens)
        self._draft_probs.clear()
        return StepResult(step_id=step.step_id, outputs=[outputs[rid] for rid, _ in order], errors=errors)

    def _sample(
        self, logits: torch.Tensor, sampling: list[tuple[str, range]], outputs: dict[str, SampledRequest], wait_s: float
    ) -> tuple[set[str], dict[str, str]]:
        """Rank 0 samples (verifying drafts); every rank ends with the token ids in outputs.
        logits has the rows of `sampling`, in order. Returns the requests deferred because
        their grammar is still compiling and those whose grammar failed, as rank 0 saw
        them: every rank acts on rank 0's view, so their states stay the same."""
        request_ids = [rid for rid, _ in sampling]
        deferred: set[str] = set()
        failed: dict[str, str] = {}
        if self.tp.rank == 0:
            deferred, failed = self.sampler.ready(request_ids, wait_s)
            if deferred or failed:  # sample only the rows of the requests that are ready
                keep = [i for i, (rid, _) in enumerate(sampling) if rid not in deferred and rid not in failed]
                starts = list(itertools.accumulate((len(rows) for _, rows in sampling), initial=0))
                rows = [r for i in keep for r in range(starts[i], starts[i + 1])]
                logits = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
                request_ids = [request_ids[i] for i in keep]
            drafts = [self.states[rid].drafts for rid in request_ids]
            probs = [self._draft_probs.get(rid) for rid in request_ids] if self._draft_probs else None
            for rid, picked in zip(request_ids, self.sampler.verify(logits, request_ids, drafts, probs)):
                outputs[rid].token_ids = [tok for tok, _ in picked]
                outputs[rid].logprobs = [lp for _, lp in picked if lp is not None]
        if self.tp.world_size > 1:
            # [R, 1 + most drafts], -1 past each request's tokens (a deferred request has
            # none), FAILED first for a failed one: the same shape on every rank.
            all_ids = [rid for rid, _ in sampling]
            width = 1 + max(self.states[rid].num_drafts for rid in all_ids)
            ids = torch.full((len(all_ids), width), -1, dtype=torch.long)
            for i, rid in enumerate(all_ids):
                if rid in failed:
                    ids[i, 0] = _FAILED
                elif outputs[rid].token_ids:
                    ids[i, : len(outputs[rid].token_ids)] = torch.tensor(outputs[rid].token_ids)
            for rid, row in zip(all_ids, self.tp.broadcast_from_first(ids.to(logits.device)).tolist()):
                if row[0] == _FAILED:
                    failed.setdefault(rid, "the request's grammar failed on rank 0")
                elif row[0] < 0:
                    deferred.add(rid)
                else:
                    outputs[rid].token_ids = [t for t in row if t >= 0]
        return deferred, failed

    def _propose_drafts(self, order: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Turn each request's num_model_drafts into drafts at the end of its tokens, the
        same on every rank (rank 0 drafts and broadcasts them). Returns the order with each
        request's token count cut to what was drafted (the drafter may propose fewer)."""
        asked = [rid for rid, _ in order if self.states[rid].num_model_drafts]
        if self.tp.rank == 0:
            jobs = [
                DraftJob(rid, self.states[rid].token_ids, self.states[rid].row, self.states[rid].num_model_drafts)
                for rid in asked
            ]
            proposed = self.drafter.propose(jobs, self.block_table, self.sampler, self.sampler.vocab_size)
            drafts = [tokens for tokens, _ in proposed]
            for rid, (_, probs) in zip(asked, proposed):
                if probs and probs[0] is not None:  # a request's rows all have q or none do
                    self._draft_probs[rid] = torch.stack(probs)
        if self.tp.world_size > 1:
            ids = torch.full((len(asked), MAX_SPECULATIVE_TOKENS), -1, dtype=torch.long)
            if self.tp.rank == 0:
                for i, d in enumerate(drafts):
                    ids[i, : len(d)] = torch.tensor(d, dtype=torch.long)
            rows = self.tp.broadcast_from_first(ids.to(self.device)).tolist()
            drafts = [[t for t in row if t >= 0] for row in rows]
        for rid, d in zip(asked, drafts):
            st = self.states[rid]
            st.token_ids.extend(d)
            st.num_drafts, st.num_model_drafts = len(d), 0
        cut = {rid: 1 + len(d) for rid, d in zip(asked, drafts)}
        return [(rid, cut.get(rid, n)) for rid, n in order]

    def _prepare(self, order: list[tuple[str, int]]):
        """Flatten the step's tokens and describe them for attention."""
        ids: list[int] = []
        pos: list[int] = []
        rows, qlens, ctx = [], [], []
        for rid, n in order:
            st = self.states[rid]
            c = st.num_computed_tokens
            ids.extend(st.token_ids[c : c + n])
            pos.extend(range(c, c + n))
            rows.append(st.row)
            qlens.append(n)
            ctx.append(c)
        positions = torch.tensor(pos, dtype=torch.long)
        tables = self.block_table.index_select(0, torch.tensor(rows))
        meta = attention_metadata(positions, qlens, ctx, tables, self.bs, self.device)
        return torch.tensor(ids, dtype=torch.long, device=self.device), positions.to(self.device), meta
